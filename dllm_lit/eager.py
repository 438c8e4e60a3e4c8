"""The eager decoding loop: a prefix KV cache that grows by committed blocks, any shapes.

Per block: one draft pass over ``committed + [fill] * (W - 1)``, then up to ``refine_iter - 1``
refine passes over ``committed + block[:-1]``, stopping early at a fixed point; the block is
committed and rows that finished leave the batch (and the cache).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from dllm_lit.ledger import RowLedger
from dllm_lit.prompt_cache import CachedStart
from dllm_lit.sampling import RowSampler, block_positions
from dllm_lit.settings import DecodeSettings


class CommittedBatch:
    """The active rows' committed ids and mask, and a prefix KV cache of the positions whose K/V
    are final (``cached`` leading columns). Without a cache every pass re-encodes everything."""

    def __init__(self, model: torch.nn.Module, prompt_ids, prompt_mask, use_cache: bool, start: CachedStart | None):
        self.model, self.start, self.prompts_kept = model, start, False
        self.ids, self.mask, self.cached = prompt_ids, prompt_mask, 0
        self.cache = DynamicCache() if use_cache else None
        if start is not None and start.length:  # the prompts' beginning is cached already
            self.ids, self.mask, self.cache, self.cached = start.ids, start.mask, start.cache, start.length
        self.keep_kwarg = "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(self, block_inputs: torch.Tensor, predict: int) -> torch.Tensor:
        """Run ``committed + block_inputs``; return the logits of the last ``predict`` positions."""
        start = self.cached if self.cache is not None else 0
        if self.cache is not None and self.cache.get_seq_length() > self.cached:
            self.cache.crop(self.cached - self.cache.get_seq_length())  # negative: drop the drafts
        tokens = torch.cat([self.ids[:, start:], block_inputs], dim=1)
        full_mask = torch.cat([self.mask, torch.ones_like(block_inputs)], dim=1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)[:, start:]
        kwargs = {"logits_to_keep": predict} if self.keep_kwarg else {}
        logits = self.model(
            input_ids=tokens,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=self.cache is not None,
            **kwargs,
        ).logits[:, -predict:]
        if self.start is not None and not self.prompts_kept:  # the prompts' K/V are in the cache now:
            self.start.keep(self.cache)  # kept for later calls
            self.prompts_kept = True
        self.cached = self.ids.shape[1]  # the K/V of the block inputs are drafts, not final
        return logits

    def append(self, block: torch.Tensor, *, fixed_point: bool) -> None:
        """Commit ``block``. After a fixed point the last pass fed exactly ``block[:-1]``, so the
        K/V it cached are final and stay."""
        if fixed_point:
            self.cached = self.ids.shape[1] + block.shape[1] - 1
        self.ids = torch.cat([self.ids, block], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(block)], dim=1)

    def keep_answers(self, finished: torch.Tensor) -> None:
        """Store each ``finished`` row's prompt and the answer tokens whose K/V are final (all blocks
        but the last, in full after a fixed point) in the prompt cache, for a chat's next turn."""
        if self.start is None or self.cache is None:
            return
        for position in finished.nonzero().squeeze(1).tolist():
            mask = self.mask[position, : self.cached].bool()
            tokens = self.ids[position, : self.cached][mask].tolist()
            self.start.keep_row(self.cache, position, mask.nonzero().squeeze(1), tokens)

    def keep_rows(self, still: torch.Tensor) -> None:
        """Drop every row not listed in ``still`` (finished rows leave the batch and the cache)."""
        self.ids, self.mask = self.ids[still], self.mask[still]
        if self.cache is not None and still.numel() > 0:
            self.cache.batch_select_indices(still)


def decode_eager(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: DecodeSettings,
    ledger: RowLedger,
    sampler: RowSampler,
    *,
    fill: int,
    start: CachedStart | None = None,
) -> None:
    """Decode left-padded prompts block by block into ``ledger``, picking with ``sampler``; ``start``:
    the prompt cache's start (:mod:`dllm_lit.prompt_cache`; needs ``use_cache``)."""
    batch = CommittedBatch(model, prompt_ids, prompt_mask, settings.use_cache, start)
    active = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)  # input row of each active row
    generated = 0  # tokens committed so far by every active row
    while active.numel() > 0:
        # The last block shrinks to what the roomiest row may still add: by causality the
        # tokens before the cut are the same as with the full width.
        room = ledger.budget[active] - generated
        block_width = min(settings.width, int(room.max()))
        positions = block_positions(generated, block_width, prompt_ids.device)
        block, scores, fixed_point = draft_and_refine(batch, sampler, ledger, settings, room, positions, fill)
        finished = ledger.commit(active.tolist(), block, room, scores=scores)
        batch.append(block, fixed_point=fixed_point)
        sampler.add(block)
        generated += block_width
        if bool(finished.any()):
            batch.keep_answers(finished)
            still = (~finished).nonzero().squeeze(1)
            active = active[still]
            batch.keep_rows(still)
            sampler.keep(still)


def draft_and_refine(
    batch: CommittedBatch,
    sampler: RowSampler,
    ledger: RowLedger,
    settings: DecodeSettings,
    room: torch.Tensor,
    positions: torch.Tensor,
    fill: int,
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """One block at answer ``positions`` (``[1, block width]``): the draft pass, then refine passes
    until ``refine_iter`` or a fixed point. Returns the block, its tokens' scores (each from the pass
    that picked it; None without ``logprobs``) and whether the last refine pass was a fixed point."""
    block_width = positions.shape[1]
    fills = torch.full((batch.ids.shape[0], block_width - 1), fill, device=batch.ids.device, dtype=batch.ids.dtype)
    block, scores = sampler.choose(batch.forward(fills, predict=block_width), positions)
    ledger.count_forward()
    refine_passes, fixed_point = 0, False
    # A block of width 1 has nothing to refine: its only token depends on committed tokens alone.
    for _refine_pass in range(2, settings.refine_iter + 1 if block_width > 1 else 2):
        logits = batch.forward(block[:, :-1], predict=block_width - 1)
        picked, picked_scores = sampler.choose(logits, positions[:, 1:], block[:, :-1])
        refined = torch.cat([block[:, :1], picked], dim=1)
        if scores is not None:
            scores = torch.cat([scores[:, :1], picked_scores], dim=1)
        ledger.count_forward()
        refine_passes += 1
        fixed_point = bool(ledger.is_fixed_point(refined, block, room))
        block = refined
        if fixed_point and settings.early_exit:
            break
    ledger.end_block(refine_passes)
    return block, scores, fixed_point
