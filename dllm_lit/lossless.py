"""Lossless decoding: self-speculative verification over a sliding window of ``W`` tokens.

Per row, the cache holds the K/V of accepted tokens; ``last`` is the last accepted token (not cached
yet) and ``draft`` holds ``W - 1`` guesses for the tokens after it (fill tokens where there is none).
One pass feeds ``[last] + draft`` and predicts ``p_0 .. p_{W-1}``; ``p_0`` is accepted, and ``p_i``
while every draft token before it was right (``draft_i == p_{i-1}``): those predictions saw only
correct inputs, so they are exactly the autoregressive tokens. At least one token is accepted per
pass. The rest of the predictions become the next draft; while those do not pay (the eager
backend's one-token passes), ``prompt_lookup_max`` drafts from the text itself instead. Under a
``guided_*`` grammar, the tokens it forces next lead the draft (:func:`forced_draft`).

Sampling picks each token from the warped distribution with a number keyed by the row's seed and
the token's answer position (:mod:`dllm_lit.sampling`), a deterministic function of the logits as
argmax is: the same rule then gives exactly the tokens of an autoregressive sampler with the same
numbers. A draft token is accepted with probability ``q(d)``, as under the speculative-sampling rule
(where a rejection samples ``q`` without ``d``, here the keyed draw fell elsewhere).

Rows accept different counts: rejected draft positions stay in the shared cache, masked out for
that row (``valid``); positions are counted over valid tokens only, so a row's output never depends
on its batch. The cache is cropped to the longest row after every pass, and columns no row reads are
dropped once there are ``RaggedBatch.COMPACT_AT`` of them.

Wide passes also feed ``draft_alternatives``: the next most likely guesses for the first draft
token, each read in its place; a row whose first draft token was wrong and one of whose alternatives
is right keeps that alternative's column and accepts two tokens.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import NamedTuple

import torch
from transformers import DynamicCache

from dllm_lit.adapters import draft_gate
from dllm_lit.attention import attention_bias
from dllm_lit.ledger import RowLedger
from dllm_lit.logprobs import token_scores
from dllm_lit.predicted import PredictedDrafts
from dllm_lit.prompt_cache import CachedStart, unpadded
from dllm_lit.sampling import RowSampler
from dllm_lit.settings import DecodeSettings


class RaggedBatch:
    """Rows of different lengths over one ``DynamicCache``: ``valid`` marks, per row, the cached
    columns whose K/V are final; ``pending`` are the tokens to feed before the draft (the prompt at
    first, then the last accepted token). A pass may also feed alternatives for the first draft token
    and, for a model with a draft adapter (``model.draft_gate``), a draft branch (:func:`pass_mask`)."""

    def __init__(self, model: torch.nn.Module, prompt_ids, prompt_mask, start: CachedStart | None = None):
        self.model, self.gate, self.start = model, draft_gate(model), start
        reused = 0
        if start is not None:  # the prompts' beginning is cached already
            prompt_ids, prompt_mask, reused = start.ids, start.mask, start.length
        self.cache = start.cache if reused else DynamicCache()
        self.valid = prompt_mask[:, :reused]  # [rows, cached columns]
        self.pending, self.pending_mask = prompt_ids[:, reused:], prompt_mask[:, reused:]
        self.keep_kwarg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.fed = (0, 0, 0)  # the last pass's draft tokens, alternatives and branch tokens

    COMPACT_AT = 64

    def forward(self, draft: torch.Tensor, alternatives: torch.Tensor | None = None) -> PassLogits:
        """The logits of ``pending[-1] + draft`` on top of the cache, of each alternative (read in
        place of the first draft token) and of the draft branch (``pending[-1] + draft`` again, at the
        same positions, adapter on; only with a draft adapter and a draft)."""
        width = draft.shape[1] + 1
        branch = width if self.gate is not None and width > 1 else 0
        others = alternatives if alternatives is not None else draft[:, :0]
        self.fed = (width - 1, others.shape[1], branch)
        tokens = torch.cat([self.pending, draft, others, self.pending[:, -1:], draft][: 5 if branch else 3], dim=1)
        mask = torch.cat([self.valid, self.pending_mask, torch.ones_like(draft)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, self.valid.shape[1] :]
        first = positions[:, -width:][:, 1:2].expand(-1, others.shape[1])  # where the first draft token sits
        positions = torch.cat([positions, first, positions[:, -width:][:, :branch]], dim=1)
        keep = width + others.shape[1] + branch
        if keep == width:
            logits = self._run(tokens, mask, positions, keep)
        else:
            allowed = pass_mask(self.valid, self.pending_mask, *self.fed)
            gate = torch.zeros(tokens.shape[1], device=tokens.device)
            gate[tokens.shape[1] - branch :] = 1.0
            with self.gate.tokens(gate.expand(tokens.shape[0], -1)[..., None]) if branch else nullcontext():
                logits = self._run(tokens, attention_bias(self.model, allowed[:, None]), positions, keep)
        return PassLogits(logits[:, :width], logits[:, width : keep - branch], logits[:, keep - branch :])

    def _run(self, tokens, mask, positions, keep: int) -> torch.Tensor:
        kwargs = {"logits_to_keep": keep} if self.keep_kwarg else {}
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        if self.start is not None:  # the prompts' K/V are in the cache now: keep them for later calls
            self.start.keep(self.cache)
            self.start = None
        return out.logits[:, -keep:]

    def accept(self, accepted: torch.Tensor, last: torch.Tensor, taken: torch.Tensor | None = None) -> None:
        """Keep the K/V of the pending tokens and of each row's ``accepted - 1`` right draft tokens, or
        of the alternative it took (``taken``, ``[rows]``, -1: none); ``last`` (``[rows]``) is the new
        pending token."""
        drafted, alternatives, _ = self.fed
        slots = torch.arange(1, drafted + 1, device=accepted.device)
        taken = taken if taken is not None else torch.full_like(accepted, -1)
        right = (slots[None, :] < accepted[:, None]) & (taken < 0)[:, None]
        took = torch.arange(alternatives, device=accepted.device)[None, :] == taken[:, None]
        valid = torch.cat([self.valid, self.pending_mask, right.long(), took.long()], dim=1)
        read = valid.any(0)  # the columns some row reads
        keep = int(read.nonzero().max()) + 1  # the last of them
        if keep < self.cache.get_seq_length():
            self.cache.crop(keep - self.cache.get_seq_length())  # negative: drop the columns no row keeps
        self.valid = self._compacted(valid[:, :keep], read[:keep])
        self.pending = last[:, None]
        self.pending_mask = torch.ones_like(self.pending)

    def _compacted(self, valid: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """Once ``COMPACT_AT`` cached columns are read by no row (``read``: ``valid.any(0)``; drafts
        rejected behind a kept alternative, or in every row), drop them from the cache: attention stops
        paying for them."""
        if int((~read).sum()) < self.COMPACT_AT:
            return valid
        kept = read.nonzero().squeeze(1)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, kept], layer.values[:, :, kept]
        return valid[:, kept]

    def keep_rows(self, still: torch.Tensor) -> None:
        self.valid, self.pending, self.pending_mask = self.valid[still], self.pending[still], self.pending_mask[still]
        if still.numel() > 0:
            self.cache.batch_select_indices(still)


class PassLogits(NamedTuple):
    """One pass's logits: ``verified`` ``[rows, W, vocab]`` (the base model's, of ``pending[-1] +
    draft``), ``alternatives`` ``[rows, S, vocab]`` and ``branch`` ``[rows, W or 0, vocab]``."""

    verified: torch.Tensor
    alternatives: torch.Tensor
    branch: torch.Tensor


def pass_mask(valid: torch.Tensor, pending_mask: torch.Tensor, drafted: int, alternatives: int, branch: int):
    """``[rows, fed, cached + fed]`` booleans: the columns each fed token reads. Fed, in order: the
    pending tokens and the draft (causally, on the valid cache); each alternative (the cache, the pending
    tokens and itself); the draft branch (the cache, the pending tokens before the last, its own tokens
    causally). Every token reads its own column."""
    device, pending = valid.device, pending_mask.shape[1]
    sizes = torch.tensor([pending + drafted, alternatives, branch], device=device)
    part = torch.repeat_interleave(torch.arange(3, device=device), sizes)
    index = torch.arange(part.numel(), device=device)
    query, column = index[:, None], index[None, :]
    own = (part[:, None] == part[None, :]) & (column <= query) & ((part[:, None] != 1) | (column == query))
    prefix = (part[:, None] > 0) & (column < pending - (part[:, None] == 2).long())
    keys = torch.cat([valid, pending_mask, torch.ones_like(pending_mask[:, :1]).expand(-1, index.numel() - pending)], 1)
    reads = torch.cat([torch.ones_like(own[:, :1]).expand(-1, valid.shape[1]), own | prefix], dim=1)
    diagonal = torch.cat([torch.zeros_like(reads[:, : valid.shape[1]]), index[:, None] == index[None, :]], dim=1)
    return (keys.bool()[:, None, :] & reads[None]) | diagonal[None]


def next_draft(guesses: torch.Tensor, accepted: torch.Tensor, fill: int, width: int | None = None) -> torch.Tensor:
    """Per row, the guesses after the accepted ones, topped up with fill tokens: ``[rows, width - 1]``
    (default: the width of this pass)."""
    fed = guesses.shape[1]
    index = accepted[:, None] + torch.arange((width or fed) - 1, device=guesses.device)[None, :]
    shifted = guesses.gather(1, index.clamp(max=fed - 1))
    return torch.where(index < fed, shifted, torch.full_like(shifted, fill))


class PromptLookup:
    """Drafts from the text itself, as prompt lookup decoding does: the tokens that followed the latest
    earlier occurrence of the text's last ``n`` tokens (``n`` from ``longest`` down to ``shortest``)."""

    def __init__(self, prompts: list[list[int]], longest: int, shortest: int = 1):
        self.prompts, self.longest, self.shortest = prompts, longest, shortest
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in prompts]  # n-gram -> end of its latest one
        self.indexed = [0] * len(prompts)  # the n-grams ending at 1 .. indexed[row] are in ends[row]

    def draft(self, row: int, generated: list[int], size: int) -> list[int]:
        """Up to ``size`` guesses for the tokens after ``prompt + generated`` (none without a match)."""
        text, ends = self.prompts[row] + generated, self.ends[row]
        for end in range(self.indexed[row] + 1, len(text)):  # the text's own last n-grams stay out
            for n in range(self.shortest, min(self.longest, end) + 1):
                ends[tuple(text[end - n : end])] = end
        self.indexed[row] = len(text) - 1
        for n in range(min(self.longest, len(text)), self.shortest - 1, -1):
            end = ends.get(tuple(text[-n:]))
            if end is not None:
                return text[end : end + size]
        return []

    def drafts(self, rows: list[int], generated: list[list[int]], size: int, fill: int, device) -> torch.Tensor:
        """``[len(rows), k]`` drafts for ``rows``, topped up with fill tokens (``k``: the longest found)."""
        found = [self.draft(row, generated[row], size) for row in rows]
        width = max(map(len, found), default=0)
        padded = [guesses + [fill] * (width - len(guesses)) for guesses in found]
        return torch.tensor(padded, dtype=torch.long, device=device).view(len(rows), width)


class WindowSchedule:
    """The width of the next eager pass (``adaptive_window``): the full window while drafts pay;
    after two wide passes that missed (the rows accepted fewer than 0.5 drafted tokens each on
    average: for one row, none), one-token passes (4 at first, doubling to 64 while the probes keep
    failing), then two wide probe passes (the first feeds fills and makes the guesses, the second
    verifies them). A wide pass costs every row ``W`` token-forwards, so in a batch a lone accepted
    draft does not pay for it."""

    FIRST_BACKOFF, MAX_BACKOFF = 4, 64

    def __init__(self, width: int, adaptive: bool):
        self.width, self.adaptive = width, adaptive and width > 1
        self.misses, self.narrow_left, self.backoff = 0, 0, self.FIRST_BACKOFF

    def next_width(self, used: int, accepted: torch.Tensor) -> int:
        if not self.adaptive:
            return self.width
        if used > 1:
            if accepted.float().mean() >= 1.5:
                self.misses, self.backoff = 0, self.FIRST_BACKOFF
            else:
                self.misses += 1
            if self.misses == 2:
                self.misses, self.narrow_left = 0, self.backoff
                self.backoff = min(2 * self.backoff, self.MAX_BACKOFF)
        if self.narrow_left > 0:
            self.narrow_left -= 1
            return 1
        return self.width


def decode_lossless(
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
    (picked by ``sampler``); ``start``: the prompt cache's start (:mod:`dllm_lit.prompt_cache`);
    ``predictions``: each row's expected answer, drafted from (:mod:`dllm_lit.predicted`)."""
    device = prompt_ids.device
    batch = RaggedBatch(model, prompt_ids, prompt_mask, start)
    active = torch.arange(prompt_ids.shape[0], device=device)
    generated = torch.zeros_like(active)
    schedule, width = WindowSchedule(settings.width, settings.adaptive_window), settings.width
    lookup = None
    if settings.prompt_lookup_max:
        prompts = unpadded(prompt_ids, prompt_mask)
        lookup = PromptLookup(prompts, settings.prompt_lookup_max, settings.prompt_lookup_min)
    count, top = settings.alternatives, settings.logprobs
    predicted = PredictedDrafts(predictions, settings.width, device) if predictions and settings.width > 1 else None
    draft = torch.full((active.numel(), settings.width - 1), fill, dtype=prompt_ids.dtype, device=device)
    if predicted is not None:
        draft = predicted.from_lists(active, ledger.tokens, draft, fill)
    draft, alternatives = forced_draft(sampler, draft, settings.width - 1, fill), None
    while active.numel() > 0:
        logits = penalized(sampler, batch.forward(draft, alternatives), draft, alternatives)
        tokens, accepted, taken, guess_logits, guesses = verify_pass(sampler, logits, draft, alternatives, generated)
        scores = pass_scores(logits, tokens, taken, top) if top is not None else None
        ledger.count_forward()
        room = ledger.budget[active] - generated
        finished = ledger.commit(active.tolist(), tokens, room, limit=accepted, scores=scores)
        ledger.end_pass(accepted)
        batch.accept(accepted, tokens.gather(1, (accepted - 1)[:, None]).squeeze(1), taken)
        sampler.add(tokens, accepted)
        generated += accepted
        width = schedule.next_width(width, accepted)  # a lookup pass counts as a one-token pass
        draft = next_draft(guesses, accepted, fill, width)
        alternatives = None
        if count and width > 1:
            alternatives = next_alternatives(guess_logits, accepted, draft[:, 0], count, fill)
        if bool(finished.any()):
            if start is not None:  # their answers' K/V leave the batch now: the prompt cache keeps them
                keep_answers(start, batch, finished, active, ledger)
            still = (~finished).nonzero().squeeze(1)
            active, generated, draft = active[still], generated[still], draft[still]
            alternatives = alternatives[still] if alternatives is not None else None
            batch.keep_rows(still)
            sampler.keep(still)
        if lookup is not None and width == 1:  # the model's own drafts do not pay: look the text up
            draft = lookup.drafts(active.tolist(), ledger.tokens, settings.width - 1, fill, device)
        if predicted is not None:
            draft = predicted.from_lists(active, ledger.tokens, draft, fill)
        draft = forced_draft(sampler, draft, settings.width - 1, fill)


def keep_answers(start: CachedStart, batch: RaggedBatch, finished: torch.Tensor, active: torch.Tensor, ledger) -> None:
    """Store each ``finished`` row's prompt and answer in the prompt cache: the tokens whose K/V it
    holds (its valid columns, in order), so that a chat's next turn computes only the new message."""
    for position in finished.nonzero().squeeze(1).tolist():
        row = int(active[position])
        columns = batch.valid[position].bool().nonzero().squeeze(1)
        start.keep_row(batch.cache, position, columns, start.rows[row] + ledger.rows[row].ids_with_stop)


def penalized(sampler: RowSampler, logits: PassLogits, draft: torch.Tensor, alternatives: torch.Tensor | None):
    """The pass's logits after the call's penalties and grammar (:meth:`~dllm_lit.sampling.RowSampler.adjust`):
    each verified position reads the draft tokens before it, each alternative's logits the
    alternative (the draft branch only guesses, and stays as it is)."""
    if not sampler.adjusts:
        return logits
    pending = torch.cat([torch.full_like(draft[:, :1], -1), draft], dim=1)
    others = logits.alternatives
    if alternatives is not None and others.shape[1]:
        flat, each = per_alternative(others, alternatives)
        others = sampler.adjust(flat, alternatives.reshape(-1, 1), each).view_as(others)
    return logits._replace(verified=sampler.adjust(logits.verified, pending), alternatives=others)


def per_alternative(logits: torch.Tensor, alternatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [rows * S, 1, vocab], batch row of each)``: each alternative's logits as a row of its own."""
    rows, count, vocab = logits.shape
    return logits.reshape(-1, 1, vocab), torch.arange(rows, device=logits.device).repeat_interleave(count)


LAZY_DRAW_DEVICES = {"cpu"}
"""Where a sampled pass draws only the positions verification reads, one position at a time (see
:func:`verified_picks`); elsewhere (a GPU) one draw covers them all, without a sync."""


def verify_pass(
    sampler: RowSampler,
    logits: PassLogits,
    draft: torch.Tensor,
    alternatives: torch.Tensor | None,
    generated: torch.Tensor,
):
    """``(tokens, accepted, taken, guess logits, guesses)`` of one pass at answer positions
    ``generated + 0 .. W - 1``: the tokens the sampler picks from the base's logits, accepted while
    every draft token before them was right (those saw only correct inputs, so they are the
    autoregressive tokens), the alternatives' verdict, and what guesses the next draft (a draft
    adapter's branch, or the base)."""
    positions = generated[:, None] + torch.arange(draft.shape[1] + 1, device=draft.device)
    lazy = logits.verified.device.type in LAZY_DRAW_DEVICES
    tokens = verified_picks(sampler, logits.verified, draft, positions, lazy=lazy)
    accepted = 1 + (draft == tokens[:, :-1]).long().cumprod(1).sum(1)
    guesses, taken = tokens, None
    if alternatives is not None:
        taken = taken_alternative(tokens, accepted, alternatives)
        chosen = taken_logits(logits.alternatives, taken)
        second = picks_where(sampler, chosen, positions[:, 1:2], taken >= 0, tokens[:, 1:2], lazy=lazy)
        tokens, accepted = torch.cat([tokens[:, :1], second, tokens[:, 2:]], dim=1), accepted + (taken >= 0).long()
    if logits.branch.shape[1]:  # a draft adapter guesses the next draft; the base verified this one
        return tokens, accepted, taken, logits.branch, logits.branch.argmax(-1)
    return tokens, accepted, taken, logits.verified, guesses


def verified_picks(
    sampler: RowSampler, logits: torch.Tensor, draft: torch.Tensor, positions: torch.Tensor, *, lazy: bool
) -> torch.Tensor:
    """``[rows, W]``: the sampler's picks at every position whose draft tokens before it were all right
    (the ones verification reads), the argmax beyond (guesses for the next draft). ``lazy`` warps only
    those positions, a position at a time (a CPU sorts up to ``W`` times fewer vocabularies when
    sampling); otherwise one draw covers every position. Both give the same tokens."""
    if sampler.greedy:
        return sampler.pick(logits, positions)
    if not lazy:
        tokens = sampler.pick(logits, positions)
        reached = torch.cat([torch.ones_like(tokens[:, :1]), (draft == tokens[:, :-1]).long().cumprod(1)], 1)
        return torch.where(reached.bool(), tokens, logits.argmax(-1))
    tokens, rows = logits.argmax(-1), torch.arange(draft.shape[0], device=draft.device)
    for column in range(tokens.shape[1]):
        at = slice(column, column + 1)
        tokens[rows, column] = sampler.pick(logits[rows, at], positions[rows, at], rows)[:, 0]
        if column < draft.shape[1]:
            rows = rows[draft[rows, column] == tokens[rows, column]]
        if not rows.numel():
            break
    return tokens


def picks_where(
    sampler: RowSampler,
    logits: torch.Tensor,
    positions: torch.Tensor,
    needed: torch.Tensor,
    otherwise: torch.Tensor,
    *,
    lazy: bool,
) -> torch.Tensor:
    """``[rows, k]``: the sampler's picks in the ``needed`` rows (``[rows]`` bool), ``otherwise`` in the
    others; ``lazy`` draws only the needed rows."""
    if sampler.greedy or not lazy:
        return torch.where(needed[:, None], sampler.pick(logits, positions), otherwise)
    tokens, rows = otherwise.clone(), needed.nonzero().squeeze(1)
    if rows.numel():
        tokens[rows] = sampler.pick(logits[rows], positions[rows], rows)
    return tokens


def taken_logits(logits: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, vocab]``: the logits after each row's taken alternative (``taken``; -1 reads the first)."""
    return logits.gather(1, taken.clamp(min=0)[:, None, None].expand(-1, 1, logits.shape[2]))


def pass_scores(logits: PassLogits, tokens: torch.Tensor, taken: torch.Tensor | None, top: int) -> torch.Tensor:
    """The :func:`~dllm_lit.logprobs.token_scores` of a pass's tokens: each from the verified logits at
    its position, except the token after a taken alternative, which that alternative's logits picked."""
    scores = token_scores(logits.verified, tokens, top)
    if taken is None or tokens.shape[1] < 2:
        return scores
    after = taken_logits(logits.alternatives, taken)
    second = torch.where(taken[:, None, None] >= 0, token_scores(after, tokens[:, 1:2], top), scores[:, 1:2])
    return torch.cat([scores[:, :1], second, scores[:, 2:]], dim=1)


def taken_alternative(tokens: torch.Tensor, accepted: torch.Tensor, alternatives: torch.Tensor) -> torch.Tensor:
    """``[rows]``: the index of the alternative a row takes (-1: none). A row whose first draft token
    was wrong (one token accepted) and one of whose alternatives is the right token takes it, and then
    the token picked after it too (two tokens)."""
    hit = alternatives == tokens[:, :1]
    return torch.where((accepted == 1) & hit.any(1), hit.long().argmax(1), -1)


def forced_draft(sampler: RowSampler, draft: torch.Tensor, most: int, fill: int) -> torch.Tensor:
    """``draft`` with each row's first guesses replaced by the tokens its grammar forces next (up to
    ``most``; jump-forward decoding: a pass accepts them whatever the model guessed), widened with fill
    tokens where a row's forced tokens outnumber the guesses (a one-token pass then feeds them)."""
    forced = sampler.guide.forced(most) if sampler.guide is not None else []
    longest = max(map(len, forced), default=0)
    if not longest:
        return draft
    if draft.shape[1] < longest:
        draft = torch.cat([draft, draft.new_full((draft.shape[0], longest - draft.shape[1]), fill)], dim=1)
    width = draft.shape[1]
    known = torch.tensor([tokens + [-1] * (width - len(tokens)) for tokens in forced], dtype=draft.dtype)
    known = known.to(draft.device)  # one copy for the batch
    return torch.where(known >= 0, known, draft)


def next_alternatives(
    logits: torch.Tensor, accepted: torch.Tensor, drafted: torch.Tensor, count: int, fill: int
) -> torch.Tensor:
    """``[rows, count]``: the ``count`` most likely guesses for the next draft's first token other than
    the one drafted (``drafted``: the argmax when greedy, not always when sampling); fill tokens where
    that token lies beyond this pass's guesses."""
    fed, vocab = logits.shape[1], logits.shape[2]
    at = logits.gather(1, accepted.clamp(max=fed - 1)[:, None, None].expand(-1, 1, vocab)).squeeze(1)
    top = at.topk(count + 1, dim=-1).indices
    top = top.gather(1, (top == drafted[:, None]).long().argsort(dim=1, stable=True))[:, :count]
    return torch.where((accepted < fed)[:, None], top, torch.full_like(top, fill))
