"""The "iterative refine" SFT objective: noise the response with the fill token, then refine.

Round 0 feeds the prompt plus a response in which a fraction ``t ~ U[noise_min, noise_max]`` of
tokens is replaced by the fill (EOS) token. Each later round feeds the prompt plus the previous
round's greedy predictions, shifted by one, in place of the response, the way a refine pass feeds
the drafted block. Every round is scored with next-token cross-entropy against the clean sequence
on response positions only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def trailing_fill_run(input_ids: torch.Tensor, response_mask: torch.Tensor, fill_id: int) -> torch.Tensor:
    """Mask of each row's trailing run of fill tokens inside the response (its EOS tail)."""
    is_fill = (input_ids == fill_id) & response_mask
    # A position is in the tail when it and every response position after it is fill.
    not_fill_after = (response_mask & ~is_fill).flip(1).cumsum(1).flip(1) > 0
    return is_fill & ~not_fill_after


def noise_mask(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fill_id: int,
    noise_min: float,
    noise_max: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which positions to replace: a fraction ``t ~ U[noise_min, noise_max]`` (per row) of the response.

    The prompt is never chosen. The trailing EOS run is chosen as a unit: all of it or none.
    """
    rows, length = input_ids.shape
    device = input_ids.device
    t = torch.rand(rows, 1, generator=generator, device=device) * (noise_max - noise_min) + noise_min
    chosen = (torch.rand(rows, length, generator=generator, device=device) < t) & response_mask
    tail = trailing_fill_run(input_ids, response_mask, fill_id)
    first_of_tail = torch.where(tail.any(1), tail.int().argmax(1), 0)
    tail_chosen = chosen.gather(1, first_of_tail[:, None])
    return torch.where(tail, tail_chosen.expand_as(chosen), chosen)


def noise_response(input_ids: torch.Tensor, response_mask: torch.Tensor, *, fill_id: int, **noise) -> torch.Tensor:
    """``input_ids`` with the :func:`noise_mask` positions replaced by ``fill_id``."""
    chosen = noise_mask(input_ids, response_mask, fill_id=fill_id, **noise)
    return torch.where(chosen, torch.full_like(input_ids, fill_id), input_ids)


def response_cross_entropy(logits: torch.Tensor, clean_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` against ``clean_ids`` on response positions.

    Only the scored positions are taken to float32 (about half of a batch's logits, the largest
    tensors of a step), and a batch with none scores 0.
    """
    scored = response_mask[:, 1:]
    picked = logits[:, :-1][scored].float()
    if picked.shape[0] == 0:
        return logits.sum() * 0.0  # keeps the graph, so backward still runs on every rank
    return F.cross_entropy(picked, clean_ids[:, 1:][scored])


def iterative_refine_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fill_id: int,
    num_iterations: int = 2,
    noise_min: float = 0.0,
    noise_max: float = 1.0,
    generator: torch.Generator | None = None,
    clean_loss: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One loss per round; round ``k > 0`` feeds round ``k - 1``'s greedy predictions shifted by one.

    Args:
        model: A causal LM.
        input_ids: ``[batch, length]`` clean prompt + response (+ EOS tail), right-padded.
        response_mask: True on response positions (the only ones noised and scored).
        fill_id: The fill token (EOS).
        num_iterations: Rounds; 1 with ``noise_max=0`` is plain SFT.
        noise_min: Lower bound of the per-row noise fraction.
        noise_max: Upper bound of the per-row noise fraction.
        generator: Random generator for the noise.
        clean_loss: Also score the clean (un-noised) rows, the autoregressive loss, in the same
            forward as round 0 (stacked along the batch: one pass fewer per step).

    Returns:
        The rounds' losses, and the autoregressive loss (None unless ``clean_loss``).
    """
    response_mask = response_mask.bool()
    rows = input_ids.shape[0]
    inputs = noise_response(
        input_ids, response_mask, fill_id=fill_id, noise_min=noise_min, noise_max=noise_max, generator=generator
    )
    losses, clean = [], None
    for round_index in range(num_iterations):
        stack_clean = clean_loss and round_index == 0
        logits = model(input_ids=torch.cat([inputs, input_ids]) if stack_clean else inputs).logits
        if stack_clean:
            logits, clean_logits = logits[:rows], logits[rows:]
            clean = response_cross_entropy(clean_logits, input_ids, response_mask)
        losses.append(response_cross_entropy(logits, input_ids, response_mask))
        if round_index + 1 < num_iterations:
            predicted = logits.argmax(-1).detach()
            shifted = torch.cat([input_ids[:, :1], predicted[:, :-1]], dim=1)  # token p <- prediction at p-1
            inputs = torch.where(response_mask, shifted, input_ids)
    return losses, clean


def weighted_total(losses: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """``sum(w_k * loss_k)``; equal weights of 1 when ``weights`` is None."""
    weights = list(weights) if weights is not None else [1.0] * len(losses)
    if len(weights) != len(losses):
        raise ValueError(f"loss_weights has {len(weights)} entries but num_iterations is {len(losses)}.")
    return sum(w * loss for w, loss in zip(weights, losses))
