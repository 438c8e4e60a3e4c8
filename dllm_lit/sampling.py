"""Picking tokens from logits: argmax, or transformers' warpers followed by sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dllm_lit.logprobs import token_scores
from dllm_lit.penalties import Penalties
from dllm_lit.settings import DecodeSettings

Picker = Callable[[torch.Tensor], torch.Tensor]
Chooser = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def build_warpers(settings: DecodeSettings, device: torch.device) -> tuple[LogitsProcessorList, torch.Generator | None]:
    """Transformers' temperature / top-k / top-p / min-p warpers for ``settings`` (in ``generate``'s
    order), and the sampling generator
    (seeded by ``settings.seed``; ``None``: torch's global one, seeded by seed_everything under the CLI)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p is not None and settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    if settings.min_p:
        warpers.append(MinPLogitsWarper(settings.min_p))
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed)
    return warpers, generator


def build_picker(settings: DecodeSettings, device: torch.device) -> Picker:
    """Return ``pick(logits [A, k, V]) -> ids [A, k]``: argmax when ``temperature`` is 0, else
    the warpers and a multinomial draw."""
    if settings.temperature <= 0:
        return lambda logits: logits.argmax(-1)
    warpers, generator = build_warpers(settings, device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        # The warpers used here read only the scores, never the ids.
        probs = torch.softmax(warpers(None, flat), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])

    return pick


def build_chooser(settings: DecodeSettings, device: torch.device, penalties: Penalties | None = None) -> Chooser:
    """Return ``choose(logits [A, k, V], pending=None) -> (ids [A, k], scores)``: the picker's tokens
    from the logits after ``penalties`` (``pending``: the tokens the pass fed, see
    :class:`~dllm_lit.penalties.Penalties`) and, with ``settings.logprobs``, their
    :func:`~dllm_lit.logprobs.token_scores` (else None)."""
    pick, top = build_picker(settings, device), settings.logprobs

    def choose(logits: torch.Tensor, pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if penalties is not None:
            logits = penalties(logits, pending)
        tokens = pick(logits)
        return tokens, None if top is None else token_scores(logits, tokens, top)

    return choose
