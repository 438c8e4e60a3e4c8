"""Lossless decoding: self-speculative verification over a sliding window of ``W`` tokens.

Per row, the cache holds the K/V of accepted tokens; ``last`` is the last accepted token (not cached
yet) and ``draft`` holds ``W - 1`` guesses for the tokens after it (fill tokens where there is none).
One pass feeds ``[last] + draft`` and predicts ``p_0 .. p_{W-1}``; ``p_0`` is accepted, and ``p_i``
while every draft token before it was right (``draft_i == p_{i-1}``): those predictions saw only
correct inputs, so with greedy picking they are exactly the autoregressive tokens. At least one
token is accepted per pass. The rest of the predictions become the next draft; while those do not pay
(the eager backend's one-token passes), ``prompt_lookup_max`` drafts from the text itself instead.

With sampling, draft token ``d_i`` is accepted with probability ``q_{i-1}(d_i)`` and a rejection
samples from ``q_{i-1}`` without ``d_i``: the speculative-sampling rule for a deterministic draft,
which keeps the autoregressive distribution of the same warpers.

Rows accept different counts: rejected draft positions stay in the shared cache, masked out for
that row (``valid``); positions are counted over valid tokens only, so a row's output never depends
on its batch. The cache is cropped to the longest row after every pass.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from dllm_lit.adapters import draft_gate
from dllm_lit.attention import attention_bias
from dllm_lit.ledger import RowLedger
from dllm_lit.sampling import build_warpers
from dllm_lit.settings import DecodeSettings


class RaggedBatch:
    """Rows of different lengths over one ``DynamicCache``: ``valid`` marks, per row, the cached
    columns whose K/V are final; ``pending`` are the tokens to feed before the draft (the prompt at
    first, then the last accepted token). A model with a draft adapter (``model.draft_gate``) also
    reads a draft branch in each wide pass (:meth:`_with_draft_branch`)."""

    def __init__(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.model, self.gate = model, draft_gate(model)
        self.cache = DynamicCache()
        self.valid = prompt_mask[:, :0]  # [rows, cached columns]
        self.pending, self.pending_mask = prompt_ids, prompt_mask
        self.keep_kwarg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.branch = 0  # columns of the last pass's draft branch, after its verified ones

    def forward(self, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[rows, W, vocab]`` of ``pending[-1] + draft`` on top of the cache, and the draft
        branch's logits at the same positions (None without a draft adapter or for a one-token pass)."""
        width = draft.shape[1] + 1
        tokens = torch.cat([self.pending, draft], dim=1)
        mask = torch.cat([self.valid, self.pending_mask, torch.ones_like(draft)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, self.valid.shape[1] :]
        self.branch = width if self.gate is not None and width > 1 else 0
        if not self.branch:
            return self._run(tokens, mask, positions, width), None
        return self._with_draft_branch(tokens, mask, positions, width)

    def _with_draft_branch(self, tokens, mask, positions, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of two branches: ``pending + draft`` read by the base model (the verified branch,
        as without an adapter), and ``pending[-1] + draft`` again, at the same positions, read with the
        draft adapter on; it sees the cache and the pending tokens before the last, not the first branch."""
        cached, fed, device = self.valid.shape[1], tokens.shape[1], tokens.device
        keys = torch.cat([mask, torch.ones_like(mask[:, :width])], dim=1).bool()
        column = torch.arange(keys.shape[1], device=device)[None, :]
        query = torch.arange(fed + width, device=device)[:, None]
        in_branch = query >= fed
        verified = ~in_branch & (column < cached + fed) & (column - cached <= query)
        seen = (column < cached + fed - width) | ((column >= cached + fed) & (column - cached - fed <= query - fed))
        allowed = (keys[:, None, :] & (verified | (in_branch & seen))) | (column - cached == query)
        gate = in_branch.float().expand(tokens.shape[0], -1, -1)
        with self.gate.tokens(gate):
            logits = self._run(
                torch.cat([tokens, tokens[:, -width:]], dim=1),
                attention_bias(self.model, allowed[:, None]),
                torch.cat([positions, positions[:, -width:]], dim=1),
                2 * width,
            )
        return logits[:, :width], logits[:, width:]

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
        return out.logits[:, -keep:]

    def accept(self, accepted: torch.Tensor, last: torch.Tensor) -> None:
        """Keep the K/V of the pending tokens and of each row's ``accepted - 1`` right draft tokens;
        ``last`` (``[rows]``) is the new pending token."""
        drafted = self.cache.get_seq_length() - self.valid.shape[1] - self.pending.shape[1] - self.branch
        slots = torch.arange(1, drafted + 1, device=accepted.device)
        right = (slots[None, :] < accepted[:, None]).long()
        valid = torch.cat([self.valid, self.pending_mask, right], dim=1)
        keep = valid.shape[1] - drafted + int(accepted.max()) - 1  # the longest row's last final column
        if keep < self.cache.get_seq_length():
            self.cache.crop(keep - self.cache.get_seq_length())  # negative: drop the columns no row keeps
        self.valid = valid[:, :keep]
        self.pending = last[:, None]
        self.pending_mask = torch.ones_like(self.pending)

    def keep_rows(self, still: torch.Tensor) -> None:
        self.valid, self.pending, self.pending_mask = self.valid[still], self.pending[still], self.pending_mask[still]
        if still.numel() > 0:
            self.cache.batch_select_indices(still)


def verify_greedy(logits: torch.Tensor, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [rows, W], accepted [rows], guesses [rows, W])``: argmax predictions; accepted
    counts the leading predictions whose inputs were all right."""
    predicted = logits.argmax(-1)
    right = (draft == predicted[:, :-1]).long()
    accepted = 1 + right.cumprod(1).sum(1)
    return predicted, accepted, predicted


def verify_sampled(logits: torch.Tensor, draft: torch.Tensor, warp, generator) -> tuple[torch.Tensor, ...]:
    """The speculative-sampling rule for a deterministic draft: accept ``d_i`` with probability
    ``q_{i-1}(d_i)``; at the first rejection sample from ``q_{i-1}`` without ``d_i``; after ``W - 1``
    acceptances sample ``q_{W-1}``. Guesses for the next draft are the argmaxes of ``q``."""
    rows, width, vocab = logits.shape
    probs = torch.softmax(warp(None, logits.reshape(-1, vocab).float()), dim=-1).view(rows, width, vocab)
    draft_probs = probs[:, :-1].gather(2, draft[:, :, None]).squeeze(2)
    coins = torch.rand(draft_probs.shape, generator=generator, device=logits.device)
    accepted = 1 + (coins < draft_probs).long().cumprod(1).sum(1)
    final = probs[torch.arange(rows, device=logits.device), accepted - 1]  # q of the token to sample
    if width > 1:  # no host sync: rows that accepted every draft token keep their q
        drop = draft.gather(1, (accepted - 1).clamp(max=width - 2)[:, None])
        final = torch.where((accepted < width)[:, None], final.scatter(1, drop, 0.0), final)
    final = torch.multinomial(final / final.sum(1, keepdim=True), 1, generator=generator).squeeze(1)
    tokens = torch.cat([draft, final[:, None]], dim=1).scatter(1, (accepted - 1)[:, None], final[:, None])
    return tokens, accepted, probs.argmax(-1)


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
    *,
    fill: int,
) -> None:
    """Decode left-padded prompts into ``ledger``, exactly the model's own autoregressive output."""
    device = prompt_ids.device
    verify = verifier(settings, device)
    batch = RaggedBatch(model, prompt_ids, prompt_mask)
    active = torch.arange(prompt_ids.shape[0], device=device)
    generated = torch.zeros_like(active)
    schedule, width = WindowSchedule(settings.width, settings.adaptive_window), settings.width
    lookup = None
    if settings.prompt_lookup_max:
        prompts = unpadded(prompt_ids, prompt_mask)
        lookup = PromptLookup(prompts, settings.prompt_lookup_max, settings.prompt_lookup_min)
    draft = torch.full((active.numel(), settings.width - 1), fill, dtype=prompt_ids.dtype, device=device)
    while active.numel() > 0:
        logits, drafted = batch.forward(draft)
        tokens, accepted, guesses = verify(logits, draft)
        if drafted is not None:  # a draft adapter guesses the next draft; the base verified this one
            guesses = drafted.argmax(-1)
        ledger.count_forward()
        room = ledger.budget[active] - generated
        finished = ledger.commit(active.tolist(), tokens, room, limit=accepted)
        ledger.end_pass(accepted)
        batch.accept(accepted, tokens.gather(1, (accepted - 1)[:, None]).squeeze(1))
        generated += accepted
        width = schedule.next_width(width, accepted)  # a lookup pass counts as a one-token pass
        draft = next_draft(guesses, accepted, fill, width)
        if bool(finished.any()):
            still = (~finished).nonzero().squeeze(1)
            active, generated, draft = active[still], generated[still], draft[still]
            batch.keep_rows(still)
        if lookup is not None and width == 1:  # the model's own drafts do not pay: look the text up
            draft = lookup.drafts(active.tolist(), ledger.tokens, settings.width - 1, fill, device)


def unpadded(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Each row's prompt tokens without its left padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]


def verifier(settings: DecodeSettings, device: torch.device):
    """Greedy verification, or the sampling rule with transformers' warpers and the call's generator."""
    if settings.temperature <= 0:
        return verify_greedy
    warp, generator = build_warpers(settings, device)
    return lambda logits, draft: verify_sampled(logits, draft, warp, generator)
