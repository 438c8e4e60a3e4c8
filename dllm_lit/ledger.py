"""The row ledger: what each prompt of a decoding call has produced, and the rules every loop shares.

Both decoding loops (:mod:`dllm_lit.eager`, :mod:`dllm_lit.compiled`) draft and refine blocks; the
:class:`RowLedger` owns everything per row: its token budget, the tokens it kept, why it stopped
and how many forwards it took. The block rules (first stop token, kept tokens, fixed point) live here
once, below both loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from dllm_lit.logprobs import TokenLogprob, entries
from dllm_lit.settings import DecodeSettings

StopReason = Literal["eos", "stop_string", "max_new_tokens", "max_length", "cancelled"]


@dataclass
class RowResult:
    """What one prompt produced.

    Attributes:
        token_ids: Generated ids, without the prompt, padding or the stop token (through a stop
            string: the shortest run of ids whose text holds it).
        stop_reason: ``"eos"`` (a stop token), ``"stop_string"``, ``"max_new_tokens"``,
            ``"max_length"``, or ``"cancelled"`` (the ``on_commit`` listener asked to stop the row).
        stop_token_id: The stop token that ended the row, or ``None``.
        forwards: Forward passes run while this row was in the active batch.
        logprobs: With ``settings.logprobs``: one :class:`~dllm_lit.logprobs.TokenLogprob` per id of
            ``token_ids``; else None.
        cached_tokens: Prompt tokens whose K/V came from the prompt cache (``prompt_cache_mib``).
    """

    token_ids: list[int]
    stop_reason: StopReason
    stop_token_id: int | None
    forwards: int
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0

    @property
    def num_generated(self) -> int:
        """Generated tokens, counting the stop token."""
        return len(self.token_ids) + (self.stop_token_id is not None)

    @property
    def ids_with_stop(self) -> list[int]:
        """``token_ids`` and then the stop token, if one ended the row."""
        return self.token_ids + ([self.stop_token_id] if self.stop_token_id is not None else [])

    @property
    def tokens_per_forward(self) -> float:
        return self.num_generated / max(self.forwards, 1)


@dataclass
class BlockGeneration:
    """The result of one :func:`~dllm_lit.decoding.generate_blocks` call.

    Attributes:
        rows: One :class:`RowResult` per input row, in input order.
        forwards: Model forward passes for the whole batch.
        refine_passes_per_block: Refine passes (after the draft pass) each block used (block mode).
        accepted_per_pass: Lossless mode: per forward pass, the tokens each active row accepted.
    """

    rows: list[RowResult]
    forwards: int = 0
    refine_passes_per_block: list[int] = field(default_factory=list)
    accepted_per_pass: list[list[int]] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return len(self.refine_passes_per_block)

    @property
    def generated_tokens(self) -> int:
        return sum(row.num_generated for row in self.rows)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens over all rows per forward pass of the batch."""
        return self.generated_tokens / max(self.forwards, 1)

    @classmethod
    def concat(cls, parts: list[BlockGeneration]) -> BlockGeneration:
        """One result for row batches decoded one after the other."""
        return cls(
            rows=[row for part in parts for row in part.rows],
            forwards=sum(part.forwards for part in parts),
            refine_passes_per_block=[n for part in parts for n in part.refine_passes_per_block],
            accepted_per_pass=[n for part in parts for n in part.accepted_per_pass],
        )


def first_stop_and_kept(block: torch.Tensor, stop_ids: torch.Tensor, room: torch.Tensor):
    """Per row: the position of the first stop token (or the width), and how many tokens the row
    keeps from this block (through that stop token, at most ``room``)."""
    width = block.shape[1]
    is_stop = torch.isin(block, stop_ids)
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), width)
    return first_stop, torch.minimum(first_stop + 1, room.clamp(max=width))


def is_fixed_point(refined: torch.Tensor, block: torch.Tensor, stop_ids: torch.Tensor, room: torch.Tensor):
    """A device bool: the refine pass changed none of the tokens any row keeps. Only those (through
    each row's first stop token, within its room) must settle: by causality the tokens after them
    cannot change them, and are dropped."""
    _, kept = first_stop_and_kept(refined, stop_ids, room)
    positions = torch.arange(block.shape[1], device=block.device)
    return ((refined == block) | (positions >= kept[:, None])).all()


CommitListener = Callable[[int, list[int], "RowResult | None"], bool]
"""``on_commit(row, new_token_ids, result)``: called at each commit with the tokens a row just kept
(and its :class:`RowResult` when it finished); return True to stop that row now: it is then called
once more with no tokens and the ``"cancelled"`` result."""

LogprobListener = Callable[[int, list[TokenLogprob]], None]
"""``on_logprobs(row, new_logprobs)``: called just before ``on_commit`` with the log-probabilities of
the tokens a row just kept (``settings.logprobs`` only)."""


class RowLedger:
    """Per-row budgets, kept tokens, stop reasons and forwards of one decoding call.

    Args:
        prompt_mask: ``[batch, prompt_len]`` attention mask of the left-padded prompts.
        settings: The call's decoding settings (limits and stop tokens).
        eos_ids: The model's EOS ids; they stop rows unless ``settings.ignore_eos``.
        on_commit: Optional :data:`CommitListener` (streaming, cancellation).
        on_logprobs: Optional :data:`LogprobListener` (streaming log-probabilities).
        row_max_new_tokens: Each row's own ``max_new_tokens`` (default: the settings' for every row).
    """

    def __init__(
        self,
        prompt_mask: torch.Tensor,
        settings: DecodeSettings,
        eos_ids: list[int],
        on_commit: CommitListener | None = None,
        on_logprobs: LogprobListener | None = None,
        row_max_new_tokens: Sequence[int] | None = None,
    ):
        device = prompt_mask.device
        stops = set(settings.stop_token_ids) | (set() if settings.ignore_eos else set(eos_ids))
        self.host_stop_ids = torch.tensor(sorted(stops), dtype=torch.long)  # for commits (on host tensors)
        self.stop_ids = self.host_stop_ids.to(device)  # for fixed-point tests on the device
        batch = prompt_mask.shape[0]
        limits = list(row_max_new_tokens or [settings.max_new_tokens] * batch)
        if len(limits) != batch or min(limits) < 1:
            raise ValueError(f"row_max_new_tokens needs one limit of at least 1 per prompt ({batch}), got {limits}.")
        room_by_length = settings.max_length - prompt_mask.sum(1)
        new_tokens = torch.tensor(limits, device=device)
        self.budget = torch.minimum(room_by_length, new_tokens)  # tokens each row may add
        self.length_reason: list[StopReason] = [
            "max_new_tokens" if limit <= int(room) else "max_length" for limit, room in zip(limits, room_by_length)
        ]
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.logprobs: list[list[TokenLogprob]] | None = (
            None if settings.logprobs is None else [[] for _ in range(batch)]
        )
        self.rows: list[RowResult | None] = [None] * batch
        self.forwards = self.cached_tokens = 0
        self.refine_passes_per_block: list[int] = []
        self.accepted_per_pass: list[list[int]] = []
        self.on_commit, self.on_logprobs = on_commit, on_logprobs

    def count_forward(self) -> None:
        self.forwards += 1

    def end_block(self, refine_passes: int) -> None:
        self.refine_passes_per_block.append(refine_passes)

    def end_pass(self, accepted: torch.Tensor) -> None:
        self.accepted_per_pass.append(accepted.tolist())

    def is_fixed_point(self, refined: torch.Tensor, block: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        return is_fixed_point(refined, block, self.stop_ids, room)

    def finishing(self, block: torch.Tensor, room: torch.Tensor, limit: torch.Tensor | None = None) -> torch.Tensor:
        """Per row of a host ``block``: whether it finishes at this commit (a stop token among the tokens
        it keeps, or no room after them). A listener may still cancel rows that go on."""
        return self._cut(block, room, limit)[2]

    def _cut(self, block: torch.Tensor, room: torch.Tensor, limit: torch.Tensor | None):
        """Host ``(hit_stop, kept before the stop, finished)`` per row (see :meth:`commit`)."""
        limit = torch.full_like(room, block.shape[1]) if limit is None else limit
        first_stop, keep_len = first_stop_and_kept(block, self.host_stop_ids, torch.minimum(room, limit))
        hit_stop = first_stop < keep_len
        return hit_stop, keep_len - hit_stop.long(), hit_stop | (room <= limit)  # the stop token is apart

    def commit(
        self,
        rows: list[int],
        block: torch.Tensor,
        room: torch.Tensor,
        limit: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append each row's kept tokens (up to its first stop token, within its room and its
        ``limit``, default the block width) and their ``scores`` (:func:`~dllm_lit.logprobs.token_scores`,
        with ``settings.logprobs``); record the rows that finish; return which did (on ``block``'s
        device). The block's one copy to the host (none for host tensors)."""
        device = block.device
        block, room = block.cpu(), room.cpu()
        hit_stop, keep_len, finished = self._cut(block, room, None if limit is None else limit.cpu())
        done_rows = finished.tolist()
        row_scores = scores.tolist() if self.logprobs is not None else [None] * len(rows)
        for i, (row, stop, done, n, ids) in enumerate(
            zip(rows, hit_stop.tolist(), done_rows, keep_len.tolist(), block.tolist())
        ):
            self.tokens[row].extend(ids[:n])
            self._add_logprobs(row, ids[:n], row_scores[i])
            if done:
                self.rows[row] = self._finished(
                    row, "eos" if stop else self.length_reason[row], ids[n] if stop else None
                )
            if self.on_commit is not None and self.on_commit(row, ids[:n], self.rows[row]) and not done:
                self.rows[row] = self._finished(row, "cancelled", None)
                self.on_commit(row, [], self.rows[row])  # every row's listener sees its result once
                done_rows[i] = True
        return torch.tensor(done_rows, dtype=torch.bool, device=device)

    def _add_logprobs(self, row: int, kept: list[int], scores: list[list[float]] | None) -> None:
        if self.logprobs is None:
            return
        new = entries(kept, scores[: len(kept)])
        self.logprobs[row].extend(new)
        if self.on_logprobs is not None:
            self.on_logprobs(row, new)

    def _finished(self, row: int, reason: StopReason, stop_token_id: int | None) -> RowResult:
        logprobs = self.logprobs[row] if self.logprobs is not None else None
        return RowResult(self.tokens[row], reason, stop_token_id, self.forwards, logprobs, self.cached_tokens)

    def result(self) -> BlockGeneration:
        return BlockGeneration(
            rows=list(self.rows),
            forwards=self.forwards,
            refine_passes_per_block=self.refine_passes_per_block,
            accepted_per_pass=self.accepted_per_pass,
        )
