"""Picking tokens from logits: argmax, or transformers' warpers and a draw keyed by row and position.

A sampled token is the inverse CDF of the warped distribution at a uniform number that depends only
on the row's seed and the token's position in the answer (:func:`keyed_uniforms`), never on the
batch, the pass or how many numbers were drawn before. So sampling is a deterministic function of
the logits, as argmax is: exact block mode and lossless mode give exactly the tokens an
autoregressive sampler with the same numbers gives, a row samples the same answer alone or in any
batch, on any backend and window width, and a refined block can reach a fixed point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dllm_lit.guided import Guide
from dllm_lit.logprobs import token_scores
from dllm_lit.penalties import Penalties
from dllm_lit.settings import DecodeSettings

MASK32 = 0xFFFFFFFF
SAMPLING_SCHEME = "inverse CDF at a number keyed by row seed and answer position"
"""How sampled tokens are drawn; ``predict``'s resume fingerprint holds it, so a sampled run is never
resumed from rows drawn another way."""


def build_warpers(settings: DecodeSettings) -> LogitsProcessorList:
    """Transformers' temperature / top-k / top-p / min-p warpers for ``settings`` (``generate``'s order)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p is not None and settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    if settings.min_p:
        warpers.append(MinPLogitsWarper(settings.min_p))
    return warpers


def _times(h: torch.Tensor, constant: int) -> torch.Tensor:
    """``h * constant mod 2**32`` for ``h < 2**32``, without int64 overflow (16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (h * low + (((h * high) & 0xFFFF) << 16)) & MASK32


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of each element of ``h`` (``0 <= h < 2**32``)."""
    h = h ^ (h >> 16)
    h = _times(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _times(h, 0x846CA68B)
    return h ^ (h >> 16)


def keyed_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A uniform number in (0, 1) for each ``(keys[r], positions[r, j])`` (int64 tensors, positions
    broadcast against ``keys[:, None]``): a hash, the same on every device and for every batch."""
    row = _mix(_mix(keys & MASK32) ^ ((keys >> 32) & MASK32))
    bits = _mix(row[:, None] ^ (positions & MASK32))
    return (bits.double() + 0.5) / 2.0**32


def row_keys(settings: DecodeSettings, rows: int, row_seeds: Sequence[int | None] | None = None) -> torch.Tensor:
    """Each row's sampling key: ``row_seeds[r]``, else ``settings.seed + r``, else (no seed; when
    sampling) a number from torch's global generator (seeded by ``seed_everything`` under the CLI)."""
    if row_seeds is None:
        row_seeds = [None if settings.seed is None else settings.seed + row for row in range(rows)]
    if len(row_seeds) != rows:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {rows} prompts.")
    sampling = settings.temperature > 0 and None in row_seeds  # greedy calls leave torch's generator alone
    drawn = torch.randint(0, 2**62, (rows,)).tolist() if sampling else [0] * rows
    return torch.tensor([int(seed) if seed is not None else own for seed, own in zip(row_seeds, drawn)])


class RowSampler:
    """How one decoding call picks tokens, row by row: the penalties (:class:`~dllm_lit.penalties.Penalties`),
    the grammar (:class:`~dllm_lit.guided.Guide`), argmax or the keyed draw, and the tokens' scores with
    ``settings.logprobs``. Its per-row state (sampling keys, penalty history, grammar state) follows the
    batch as rows leave it (:meth:`keep`).

    Args:
        settings: The call's settings.
        prompt_ids: ``[rows, prompt_len]`` left-padded prompts.
        prompt_mask: Their attention mask.
        row_seeds: Each row's sampling seed (see :func:`row_keys`).
        stop_ids: The ids that end a row, never picked before ``settings.min_new_tokens``.
        tokenizer: The model's tokenizer (needed only by a ``guided_*`` setting).
        vocab_size: The model's vocabulary (its ``config.vocab_size``), if known: a grammar's
            matchers then start before the first pass, and the first draft holds its forced tokens.
        row_guides: Each row's own ``guided_*`` setting (see :func:`~dllm_lit.guided.row_grammars`).
    """

    def __init__(
        self,
        settings: DecodeSettings,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        row_seeds: Sequence[int | None] | None = None,
        stop_ids: torch.Tensor | None = None,
        tokenizer=None,
        vocab_size: int | None = None,
        row_guides: Sequence[dict | None] | None = None,
    ):
        self.greedy, self.top = settings.temperature <= 0, settings.logprobs
        self.min_new_tokens, self.stop_ids = settings.min_new_tokens, stop_ids
        self.warpers = None if self.greedy else build_warpers(settings)
        self.penalties = Penalties.build(settings, prompt_ids, prompt_mask)
        self.guide = Guide.build(settings, tokenizer, prompt_ids.shape[0], stop_ids, vocab_size, row_guides)
        self.keys = row_keys(settings, prompt_ids.shape[0], row_seeds).to(prompt_ids.device)

    @property
    def adjusts(self) -> bool:
        """Whether :meth:`adjust` changes logits (penalties or a grammar)."""
        return self.penalties is not None or self.guide is not None

    def adjust(self, logits: torch.Tensor, pending: torch.Tensor | None = None, rows=None) -> torch.Tensor:
        """``logits`` after the penalties (:class:`~dllm_lit.penalties.Penalties`) and the grammar's mask
        (:class:`~dllm_lit.guided.Guide`), or as they are."""
        if self.penalties is not None:
            logits = self.penalties(logits, pending, rows)
        return logits if self.guide is None else self.guide(logits, pending, rows)

    def pick(self, logits: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``ids [A, k]`` for ``logits [A, k, V]`` at answer ``positions`` (``[A or 1, k]``) of batch
        ``rows`` (default: one each, in order): argmax, or the keyed draw from the warped distribution;
        no stop id before ``min_new_tokens``."""
        if self.min_new_tokens and self.stop_ids is not None and self.stop_ids.numel():
            early = (positions < self.min_new_tokens)[..., None].expand(*logits.shape[:-1], 1)
            logits = logits.index_fill(-1, self.stop_ids, float("-inf")).where(early, logits)
        if self.greedy:
            return logits.argmax(-1)
        keys = self.keys if rows is None else self.keys[rows]
        flat = logits.reshape(-1, logits.shape[-1]).float()
        # The warpers used here read only the scores, never the ids.
        cdf = torch.softmax(self.warpers(None, flat), dim=-1).cumsum(-1).view(logits.shape)
        target = keyed_uniforms(keys, positions).to(cdf.dtype) * cdf[..., -1]
        picked = torch.searchsorted(cdf, target[..., None], right=True).squeeze(-1)
        last = (cdf < cdf[..., -1:]).sum(-1)  # the last token with mass (a target rounded up to the total)
        return torch.minimum(picked, last)

    def choose(
        self, logits: torch.Tensor, positions: torch.Tensor, pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(ids, scores)``: :meth:`pick` after :meth:`adjust`, and with ``settings.logprobs`` the
        tokens' :func:`~dllm_lit.logprobs.token_scores` (else None)."""
        logits = self.adjust(logits, pending)
        tokens = self.pick(logits, positions)
        return tokens, None if self.top is None else token_scores(logits, tokens, self.top)

    def add(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Each row's first ``lengths`` (default: all) of ``tokens`` joined its answer (penalties, grammar)."""
        if self.penalties is not None:
            self.penalties.add(tokens, lengths)
        if self.guide is not None:
            self.guide.add(tokens, lengths)

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows, in this order (as the loop's batch does)."""
        self.keys = self.keys[rows]
        if self.penalties is not None:
            self.penalties.keep(rows)
        if self.guide is not None:
            self.guide.keep(rows)


def block_positions(start: int, width: int, device) -> torch.Tensor:
    """``[1, width]`` answer positions ``start .. start + width - 1`` (every row of a block loop is there)."""
    return torch.arange(start, start + width, device=device)[None, :]
