"""Logit bias and repetition, presence and frequency penalties, position by position inside a pass.

A pass predicts several positions at once, and the text before each is different: position ``j`` of
a pass follows the committed text and the tokens the pass fed before it (``pending[:, :j + 1]``:
the refined block, or the lossless draft; fill tokens are not text). :class:`Penalties` keeps each
row's history on device (the prompt's tokens; the generated tokens and their counts) and adjusts
every position as an autoregressive step with that text would: so exact block mode and lossless
mode still give ``generate``'s tokens with the same ``logit_bias``/``repetition_penalty``.

The order is transformers' (``sequence_bias``, then ``repetition_penalty``), then vLLM's presence
and frequency penalties, which count the generated tokens only (the repetition penalty also sees the
prompt, as in both).
"""

from __future__ import annotations

import torch

from dllm_lit.settings import DecodeSettings


class Penalties:
    """The adjustments of one decoding call, and the history of each row of its batch (which
    follows the batch as rows leave it: :meth:`keep`).

    Args:
        settings: The call's settings (``logit_bias``, ``repetition_penalty``, ``presence_penalty``,
            ``frequency_penalty``).
        prompt_ids: ``[rows, prompt_len]`` left-padded prompts.
        prompt_mask: Their attention mask (padding is not text).
    """

    def __init__(self, settings: DecodeSettings, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.settings = settings
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask.bool()
        self.bias: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None  # [rows, vocab]: in the prompt or generated
        self.counts: torch.Tensor | None = None  # [rows, vocab]: times generated

    @classmethod
    def build(cls, settings: DecodeSettings, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Penalties | None:
        """The call's penalties, or None when ``settings`` adjust nothing."""
        return cls(settings, prompt_ids, prompt_mask) if settings.penalized else None

    def _start(self, vocab: int, device: torch.device) -> None:
        rows = self.prompt_ids.shape[0]
        self.bias = torch.zeros(vocab, device=device)
        if self.settings.logit_bias:
            ids = torch.tensor(list(self.settings.logit_bias), device=device)
            self.bias[ids] = torch.tensor(list(self.settings.logit_bias.values()), device=device)
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        mask, ids = self.prompt_mask.to(device), self.prompt_ids.to(device)
        row_of = torch.arange(rows, device=device)[:, None].expand_as(ids)
        self.seen[row_of[mask], ids[mask]] = True  # not a scatter of the mask: padding may share a real id
        self.counts = torch.zeros(rows, vocab, device=device)

    def __call__(
        self, logits: torch.Tensor, pending: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Adjusted float32 copies of ``logits`` ``[rows, n, vocab]``; ``pending`` ``[rows, n]``: the
        token each position was fed, text for it and the positions after it (-1: none, or a fill
        token); ``rows``: the batch row of each of ``logits``' (default: one each, in order)."""
        if self.counts is None:
            self._start(logits.shape[-1], logits.device)
        seen, counts = self.seen, self.counts
        if rows is not None:
            seen, counts = seen[rows], counts[rows]
        seen, counts = seen[:, None], counts[:, None]
        adjusted = self._adjust(logits.float(), seen, counts)
        if pending is None or pending.shape[1] == 0:
            return adjusted
        # Where the pass fed token t before position j, (j, t) reads that too. Every pair (j, i)
        # computes the value of token pending[i] at position j from the whole text before j (also for
        # i > j, and for the -1 entries, read as token 0), so pairs that name one cell agree.
        valid = pending >= 0
        token = pending.clamp(min=0)
        same = (token[:, :, None] == token[:, None, :]) & valid[:, None, :]  # [rows, i, i']
        in_pass = same.cumsum(2).transpose(1, 2).float()  # [rows, j, i]: token i fed at or before j
        width = logits.shape[1]
        pairs = token[:, None, :].expand(-1, width, -1)
        total = counts.squeeze(1).gather(1, token)[:, None, :] + in_pass
        known = seen.squeeze(1).gather(1, token)[:, None, :] | (in_pass > 0)
        values = self._adjust(logits.float().gather(2, pairs), known, total, self.bias[pairs])
        return adjusted.scatter(2, pairs, values)

    def _adjust(self, logits, seen, counts, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Bias, then the repetition penalty where ``seen``, then presence and frequency by ``counts``
        (of generated tokens; counts include pending tokens, which the prompt never holds)."""
        settings = self.settings
        if settings.logit_bias:
            logits = logits + (self.bias if bias is None else bias)
        if settings.repetition_penalty != 1.0:
            penalty = settings.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if settings.frequency_penalty:
            logits = logits - settings.frequency_penalty * counts
        if settings.presence_penalty:
            logits = logits - settings.presence_penalty * (counts > 0).float()
        return logits

    def add(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Each row's first ``lengths`` (default: all) of ``tokens`` ``[rows, n]`` join its text."""
        if self.counts is None or tokens.shape[1] == 0:
            return
        kept = torch.ones_like(tokens, dtype=torch.bool)
        if lengths is not None:
            kept = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        cells = (rows[:, None] * self.counts.shape[1] + tokens)[kept]
        self.counts.view(-1).index_add_(0, cells, torch.ones_like(cells, dtype=self.counts.dtype))
        self.seen.view(-1)[cells] = True

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows, in this order (as the loop's batch does): their history, or
        before the first pass their prompts."""
        if self.counts is None:
            self.prompt_ids, self.prompt_mask = self.prompt_ids[rows], self.prompt_mask[rows]
        else:
            self.seen, self.counts = self.seen[rows], self.counts[rows]
