"""The "iterative refine" SFT objective: noise the response with the fill token, then refine.

Round 0 feeds the prompt plus a response in which a fraction ``t ~ U[noise_min, noise_max]`` of
tokens is replaced by the fill (EOS) token. Each later round feeds the prompt plus the previous
round's greedy predictions, shifted by one, in place of the response, the way a refine pass feeds
the drafted block. Every round is scored with next-token cross-entropy against the clean sequence
on response positions only.

With ``block_size`` set, the noise has the layout decoding sees instead ("blocks"): the response is cut
into blocks of ``block_size`` positions, each opened by a clean token and filled after it, and each
block attends only to the clean sequence before it and to itself. One forward covers every block: the
model reads ``[clean copy, block copy]`` under a block-causal mask, and the clean copy's predictions
are the autoregressive loss for free. Later rounds read only a new block copy against the clean copy's
cached keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from dllm_lit.attention import attention_bias


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


def predicting_response(logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[scored positions, vocab]``: the logits that predict response tokens, in float32 (only these:
    about half of a batch's logits, the largest tensors of a step)."""
    return logits[:, :-1][response_mask[:, 1:]].float()


def response_cross_entropy(logits: torch.Tensor, clean_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` against ``clean_ids`` on response positions; a batch
    with none scores 0."""
    picked = predicting_response(logits, response_mask)
    if picked.shape[0] == 0:
        return logits.sum() * 0.0  # keeps the graph, so backward still runs on every rank
    return F.cross_entropy(picked, clean_ids[:, 1:][response_mask[:, 1:]])


def response_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(teacher || model)`` of the next-token distributions on response positions; a batch with
    none scores 0."""
    picked = predicting_response(logits, response_mask)
    if picked.shape[0] == 0:
        return logits.sum() * 0.0
    teacher = predicting_response(teacher_logits, response_mask).log_softmax(-1)
    return F.kl_div(picked.log_softmax(-1), teacher, log_target=True, reduction="batchmean")


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
    clean_logits: bool = False,
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
        clean_logits: Also read the clean (un-noised) rows, for the autoregressive loss, in the same
            forward as round 0 (stacked along the batch: one pass fewer per step).

    Returns:
        The rounds' losses, and the clean rows' logits (None unless ``clean_logits``).
    """
    response_mask = response_mask.bool()
    rows = input_ids.shape[0]
    inputs = noise_response(
        input_ids, response_mask, fill_id=fill_id, noise_min=noise_min, noise_max=noise_max, generator=generator
    )
    losses, clean = [], None
    for round_index in range(num_iterations):
        stack_clean = clean_logits and round_index == 0
        logits = model(input_ids=torch.cat([inputs, input_ids]) if stack_clean else inputs).logits
        if stack_clean:
            logits, clean = logits[:rows], logits[rows:]
        losses.append(response_cross_entropy(logits, input_ids, response_mask))
        if round_index + 1 < num_iterations:
            predicted = logits.argmax(-1).detach()
            shifted = torch.cat([input_ids[:, :1], predicted[:, :-1]], dim=1)  # token p <- prediction at p-1
            inputs = torch.where(response_mask, shifted, input_ids)
    return losses, clean


def block_starts(
    response_mask: torch.Tensor, block_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For every position, the position of the clean token that opens its decoding block.

    The last prompt token opens the first block, as a decoding pass feeds it and then fills. The
    blocks after it lie on a grid shifted by a random offset in ``[0, block_size)`` per row (the first
    block is that much shorter), so training also sees the windows a sliding (lossless) decoder meets.
    Prompt positions open their own block (they are never noised).
    """
    rows, length = response_mask.shape
    device = response_mask.device
    positions = torch.arange(length, device=device).expand(rows, length)
    first = response_mask.int().argmax(1, keepdim=True) - 1
    grid = first + torch.randint(block_size, (rows, 1), generator=generator, device=device)
    on_grid = grid + (positions - grid).div(block_size, rounding_mode="floor") * block_size
    return torch.where(positions >= grid, on_grid, torch.where(positions >= first, first, positions))


def block_causal_mask(starts: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """``[batch, 1, L + B, L + B]`` attention of ``[clean copy, block copy]`` (True = attend), where the
    block copy holds positions ``skip..L-1`` (``B = L - skip``).

    A clean position sees the clean past; a block position sees the clean positions before its block's
    opening token and its own block up to itself, which is what a decoding pass with a KV cache sees.
    """
    rows, length = starts.shape
    positions = torch.arange(length, device=starts.device)
    causal = positions[:, None] >= positions[None, :]
    block_starts_, block_causal = starts[:, skip:], causal[skip:, skip:]
    clean_past = positions[None, None, :] < block_starts_[:, :, None]
    own_block = (block_starts_[:, :, None] == block_starts_[:, None, :]) & block_causal
    top = torch.cat([causal.expand(rows, length, length), causal.new_zeros(rows, length, length - skip)], 2)
    return torch.cat([top, torch.cat([clean_past, own_block], 2)], 1)[:, None]


def drafted_positions(response_mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The response positions a decoding pass drafts: all but each block's opening token."""
    return response_mask & (starts != torch.arange(starts.shape[1], device=starts.device))


def first_opening(response_mask: torch.Tensor) -> int:
    """The earliest position that opens a block in any row (the last prompt token before the response):
    the block copy starts there, as the positions before it are prompt in every row and score nothing."""
    return max(int(response_mask.int().argmax(1).min()) - 1, 0)


def read_blocks(
    model: torch.nn.Module, input_ids: torch.Tensor, block: torch.Tensor, mask: torch.Tensor, logits_to_keep: int = 0
) -> CausalLMOutputWithPast:
    """The model's output on ``[clean copy, block copy]`` under the block-causal ``mask``: the clean copy
    at positions 0..L-1, the block copy (``B <= L`` tokens) at the last ``B`` of them; ``logits_to_keep``:
    0 for all logits, else the last that many (``B``: the block copy's).

    Its ``past_key_values`` hold both copies' keys and values unless the model checkpoints its layers
    (caching is off then)."""
    rows, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    positions = torch.cat([positions, positions[length - block.shape[1] :]]).repeat(rows, 1)
    inputs = torch.cat([input_ids, block], 1)
    caching = not getattr(model, "is_gradient_checkpointing", False)
    return model(
        input_ids=inputs, attention_mask=mask, position_ids=positions, logits_to_keep=logits_to_keep, use_cache=caching
    )


def reread_block_copy(model: torch.nn.Module, cache: Cache, block: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of a new block copy alone, attending to the clean copy's keys and values in ``cache`` (from
    :func:`read_blocks` or :func:`base_cache`; a block copy in it is dropped first). The clean copy never
    sees the block copy, so this equals rereading both copies, at fewer tokens, and the gradient
    reaches the clean copy through the cache."""
    rows, width = block.shape
    length = mask.shape[-1] - width
    cache.crop(length)
    positions = torch.arange(length - width, length, device=block.device).repeat(rows, 1)
    return model(
        input_ids=block, attention_mask=mask[..., length:, :], position_ids=positions, past_key_values=cache
    ).logits


def base_cache(model: torch.nn.Module, input_ids: torch.Tensor) -> Cache:
    """The keys and values of the clean sequence as the base model reads it: a peft model's adapter
    off, no gradient (a draft adapter's view: the base reads every accepted token)."""
    was_training = model.training
    with torch.no_grad(), model.disable_adapter():
        model.train(False)  # a checkpointing model caches only outside training mode
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
    model.train(was_training)
    return cache


def block_refine_losses(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    fill_id: int,
    block_size: int,
    num_iterations: int = 2,
    generator: torch.Generator | None = None,
    clean_logits: bool = False,
    clean_by_base: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """:func:`iterative_refine_losses` with the "blocks" layout (see the module docstring).

    Round 0's blocks are their opening token then fills; round ``k > 0`` fills them with round
    ``k - 1``'s predictions shifted by one, as a refine pass does, and reads only the block copy
    (round 0's cache holds the clean copy) unless the model checkpoints its layers. The block copy
    leaves out the prompt positions every row shares (:func:`first_opening`). ``clean_by_base``: the
    clean copy is read by the base model alone (:func:`base_cache`), as a draft adapter meets it.
    """
    response_mask = response_mask.bool()
    length = input_ids.shape[1]
    starts = block_starts(response_mask, block_size, generator)
    skip = first_opening(response_mask)
    mask = attention_bias(model, block_causal_mask(starts, skip))
    ids, scored = input_ids[:, skip:], response_mask[:, skip:]  # the block copy's positions
    drafted = drafted_positions(response_mask, starts)[:, skip:]
    block = torch.where(drafted, torch.full_like(ids, fill_id), ids)
    if clean_by_base:
        cache, clean = base_cache(model, input_ids), None
        logits = reread_block_copy(model, cache, block, mask)
    else:
        output = read_blocks(model, input_ids, block, mask, logits_to_keep=0 if clean_logits else length - skip)
        logits, cache = output.logits, output.past_key_values
        clean = logits[:, :length] if clean_logits else None
    losses = []
    for round_index in range(num_iterations):
        if round_index > 0:
            shifted = torch.cat([ids[:, :1], logits.argmax(-1).detach()[:, :-1]], dim=1)
            block = torch.where(drafted, shifted, ids)
            if cache is None:
                logits = read_blocks(model, input_ids, block, mask, logits_to_keep=length - skip).logits
            else:
                logits = reread_block_copy(model, cache, block, mask)
        logits = logits[:, skip - length :]
        losses.append(response_cross_entropy(logits, ids, scored))
    return losses, clean


def weighted_total(losses: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """``sum(w_k * loss_k)``; equal weights of 1 when ``weights`` is None."""
    weights = list(weights) if weights is not None else [1.0] * len(losses)
    if len(weights) != len(losses):
        raise ValueError(f"loss_weights has {len(weights)} entries but num_iterations is {len(losses)}.")
    return sum(w * loss for w, loss in zip(weights, losses))
