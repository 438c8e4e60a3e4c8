"""Lossless decoding on the compiled path: every pass is one fixed shape, acceptance stays on device.

The same rule as :mod:`dllm_lit.lossless`, over a :class:`~dllm_lit.compiled.StaticForward`: each pass
feeds ``[last] + draft`` (``W`` tokens) at each row's own cache slot (``start[row]``: rows accept
different counts), so one CUDA graph serves every pass. Acceptance, the next draft, the stop test and
each row's output buffer are all device tensors: the host only learns, one pass late on CUDA, that
every row has finished, and reads the results once at the end, where the ledger replays them pass by
pass (same tokens, forwards and accepted counts as the eager loop). Finished rows stay in the batch
with nothing accepted (their slot no longer moves) until the last row finishes.

A model with a draft adapter (``model.draft_gate``) reads ``[last] + draft`` twice per pass, as the
eager loop does: once with the base weights (verified) and once, at the same positions, through the
adapter (the next draft), one fixed shape of ``2 W`` tokens. Greedy passes also feed the draft's
alternatives between the two (``draft_alternatives``); a row that takes one has its K/V moved into the
first draft slot (:meth:`~dllm_lit.compiled.StaticForward.keep_alternative`), so accepted tokens stay
in consecutive slots.
"""

from __future__ import annotations

import torch

from dllm_lit.adapters import draft_gate
from dllm_lit.compiled import HostCopy, StaticForward, compacted_positions
from dllm_lit.ledger import RowLedger
from dllm_lit.lossless import (
    PassLogits,
    forced_draft,
    next_alternatives,
    next_draft,
    pass_scores,
    penalized,
    verify_pass,
)
from dllm_lit.predicted import PredictedDrafts
from dllm_lit.prompt_cache import CachedStart
from dllm_lit.sampling import RowSampler
from dllm_lit.settings import DecodeSettings


def decode_lossless_static(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: DecodeSettings,
    ledger: RowLedger,
    sampler: RowSampler,
    *,
    fill: int,
    start: CachedStart | None = None,
    predictions: list[list[int] | None] | None = None,
) -> None:
    """Decode left-padded prompts into ``ledger``, exactly the model's own autoregressive output
    (picked by ``sampler``; ``start``: the prompt cache's, :meth:`~dllm_lit.compiled.StaticForward.prefill`;
    ``predictions``: each row's expected answer, drafted from (:mod:`dllm_lit.predicted`))."""
    batch, prompt_len = prompt_ids.shape
    device, width = prompt_ids.device, settings.width
    longest = int(ledger.budget.max())
    branch = width if draft_gate(model) is not None and width > 1 else 0
    count = settings.alternatives
    fed = width + count + branch  # tokens a pass writes, from the slot of ``last``
    # A finished row's slot may sit W - 1 past its budget, and a pass writes ``fed`` more slots there.
    cache_len = -(-(prompt_len + longest + width + fed) // 64) * 64  # round up: reuse graphs across calls
    forward = StaticForward.for_model(model, batch, cache_len, settings.backend == "inductor")
    top = settings.logprobs
    state = _DeviceRows(ledger.budget, longest + 2 * width, prompt_len - 1, top)
    predicted = PredictedDrafts(predictions, width, device) if predictions and width > 1 else None
    rows = torch.arange(batch, device=device)  # the ledger rows of the batch positions
    draft = torch.full((batch, width - 1), fill, dtype=prompt_ids.dtype, device=device)
    if predicted is not None:
        draft = predicted.from_buffer(rows, state.out, state.generated, draft, fill)
    draft = forced_draft(sampler, draft, width - 1, fill)  # fill tokens, but the text a grammar forces
    logits = forward.prefill(start, prompt_ids, prompt_mask, draft, width, branch)
    lag = device.type == "cuda"
    pending, alternatives = None, None
    for _pass in range(longest + 1):  # every active row accepts a token per pass; +1 for the late read
        split = width + (0 if alternatives is None else count)  # the prefill feeds no alternatives
        logits = PassLogits(logits[:, :width], logits[:, width:split], logits[:, split:])
        logits = penalized(sampler, logits, draft, alternatives)
        tokens, accepted, taken, guess_logits, guesses = verify_pass(
            sampler, logits, draft, alternatives, state.generated
        )
        if taken is not None:
            forward.keep_alternative(taken, width)
        scores = pass_scores(logits, tokens, taken, top) if top is not None else None
        last = state.accept(tokens, accepted, ledger.stop_ids, scores)
        sampler.add(tokens, accepted)
        draft = next_draft(guesses, accepted.clamp(min=1), fill)
        if predicted is not None:
            draft = predicted.from_buffer(rows, state.out, state.generated, draft, fill)
        draft = forced_draft(sampler, draft, width - 1, fill)
        alternatives = None
        if count:
            alternatives = next_alternatives(guess_logits, accepted.clamp(min=1), draft[:, 0], count, fill)
        if lag:  # the host reads the state of one pass ago, the GPU stays busy
            seen, pending = (None if pending is None else pending.read().tolist()), HostCopy(state.progress())
        else:
            seen = state.progress().tolist()
        if seen is None:
            end = None
        else:
            finished, furthest = seen[:-1], seen[-1]
            if all(finished):
                break
            # since the read, each row's slot moved at most W: this pass writes below furthest + W + fed
            end = furthest + (width if lag else 0) + fed
            alive = [position for position, done in enumerate(finished) if not done]
            if len(alive) <= forward.batch // 2:  # finished rows would cost compute: shrink the batch
                positions = compacted_positions(list(range(forward.batch)), alive)
                if start is not None:
                    gone = [position for position in range(forward.batch) if position not in positions]
                    keep_answers(start, forward, state, gone)
                forward, last, draft, pending = forward.shrink(positions), last[positions], draft[positions], None
                alternatives = alternatives[positions] if count else None
                state.keep(positions)
                sampler.keep(positions)
                rows = rows[positions]
        ids = torch.cat([last[:, None], draft] + ([alternatives] if count else []), 1)
        logits = forward(ids, state.start, width, end=end, branch=branch, alternatives=count)
    if start is not None:
        keep_answers(start, forward, state, list(range(forward.batch)))
    state.replay_into(ledger)


def keep_answers(start: CachedStart, forward: StaticForward, state: _DeviceRows, positions: list[int]) -> None:
    """Store the prompt and answer of the rows at batch ``positions`` in the prompt cache: the answer
    tokens whose K/V the static cache holds (all but the last accepted one, whose K/V the next pass
    would write), so that a chat's next turn computes only its new message."""
    counts = (state.generated[positions] - 1).clamp(min=0).tolist()
    for position, count, answer in zip(positions, counts, state.out[positions].tolist()):
        start.keep_static_row(forward.cache, position, state.rows[position], answer, count)


class _DeviceRows:
    """Per-row decoding state on device: output buffer (and its tokens' scores), generated count,
    cache slot of the next ``last`` token, whether the row finished and after how many passes, and
    the accepted counts.
    ``rows`` are the ledger rows of the batch positions; rows that leave the batch are ``retired``."""

    def __init__(self, budget: torch.Tensor, capacity: int, first_slot: int, logprobs: int | None = None):
        batch, device = budget.shape[0], budget.device
        self.rows = list(range(batch))
        self.budget = budget
        self.out = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        scored = 0 if logprobs is None else 1 + 2 * logprobs  # the tokens' scores, beside them
        self.scores = torch.zeros(batch, capacity if scored else 0, scored, device=device)
        self.generated = torch.zeros(batch, dtype=torch.long, device=device)
        self.start = torch.full((batch,), first_slot, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.finished_after = torch.zeros(batch, dtype=torch.long, device=device)
        self.accepted: list[torch.Tensor] = []
        self.retired: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def accept(
        self, tokens: torch.Tensor, accepted: torch.Tensor, stop_ids: torch.Tensor, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Record one pass (finished rows accept nothing) and its tokens' scores; return each row's
        new ``last`` token."""
        accepted = torch.where(self.done, 0, accepted)
        self.accepted.append(accepted)
        columns = self.generated[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        self.out.scatter_(1, columns, tokens)
        if scores is not None:
            self.scores.scatter_(1, columns[..., None].expand(-1, -1, scores.shape[2]), scores)
        fresh = torch.arange(tokens.shape[1], device=tokens.device) < accepted[:, None]
        stopped = (torch.isin(tokens, stop_ids) & fresh).any(1)
        self.generated += accepted
        self.start += accepted
        newly_done = ~self.done & (stopped | (self.generated >= self.budget))
        self.finished_after = torch.where(newly_done, len(self.accepted), self.finished_after)
        self.done |= newly_done
        return tokens.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)

    def progress(self) -> torch.Tensor:
        """Each position's ``done`` and the furthest row's slot, as one device tensor (one host copy)."""
        return torch.cat([self.done.long(), self.start.max()[None]])

    def keep(self, positions: list[int]) -> None:
        """Keep only these batch positions, in this order; the others (finished) retire with their results."""
        gone = [position for position in range(len(self.rows)) if position not in positions]
        if gone:
            results = (self.out[gone], self.scores[gone], self.generated[gone], self.finished_after[gone])
            self.retired.append(([self.rows[p] for p in gone], *results))
        self.rows = [self.rows[p] for p in positions]
        for name in ("budget", "out", "scores", "generated", "start", "done", "finished_after"):
            setattr(self, name, getattr(self, name)[positions])

    def replay_into(self, ledger: RowLedger) -> None:
        """Give the ledger the passes as the eager loop would: forwards, accepted counts of the
        active rows, and each row's tokens at the pass it finished (the ledger cuts them)."""
        rows, results = self.rows, (self.out, self.scores, self.generated, self.finished_after)
        for retired_rows, *retired in self.retired:
            rows = rows + retired_rows
            results = tuple(torch.cat([a, b]) for a, b in zip(results, retired))
        out, scores, generated, finished_after = results
        after = finished_after.tolist()
        counts = torch.cat(self.accepted).tolist()  # one host copy, then split pass by pass
        for index in range(1, max(after) + 1):
            size = self.accepted[index - 1].shape[0]
            ledger.count_forward()
            ledger.end_pass(torch.tensor([n for n in counts[:size] if n > 0]))
            counts = counts[size:]
            finishing = sorted((p for p, pass_index in enumerate(after) if pass_index == index), key=rows.__getitem__)
            if finishing:
                ledger_rows = [rows[p] for p in finishing]
                found = scores[finishing] if scores.shape[1] else None
                ledger.commit(
                    ledger_rows, out[finishing], ledger.budget[ledger_rows], limit=generated[finishing], scores=found
                )
