"""Drafts from each row's predicted answer (OpenAI's Predicted Outputs), for both lossless loops.

A prediction is text the answer is expected to repeat, such as code being edited. The answer is
followed through its prediction as through a diff: while its new tokens are the prediction's next
ones, the prediction's tokens after them are the draft; where they are not, the answer's last tokens
(up to 8, the longest found first) are looked for again from the last place it followed, the nearest
first, and the draft goes on from there (none where they are not found). Every step is a tensor
operation on the device, so the compiled loop drafts from predictions without reading to the host.
"""

from __future__ import annotations

import torch

# Never tokens: a prediction is padded with NONE (a window over the padding never matches, a draft
# past its end is none) and an answer's short history with BEFORE (which matches nothing either).
NONE, BEFORE = -1, -2


class PredictedDrafts:
    """Per row (its index in the call's batch): the prediction and where the answer stands in it.

    Args:
        predictions: Each row's predicted answer ids (None or empty: it drafts nothing from here).
        width: The loop's window ``W``; a draft holds ``W - 1`` tokens.
        device: Where the loop's tensors are.
    """

    REALIGN = 8

    def __init__(self, predictions: list[list[int] | None], width: int, device: torch.device):
        given = [list(prediction or []) for prediction in predictions]
        longest = max(map(len, given), default=0)
        padded = [prediction + [NONE] * (longest + width - len(prediction)) for prediction in given]
        self.tokens = torch.tensor(padded, dtype=torch.long, device=device)
        self.size = width - 1
        self.span = max(self.REALIGN, width)  # the answer tokens a step reads: its new ones and its tail
        self.at = torch.zeros(len(given), dtype=torch.long, device=device)  # the next answer token's place
        self.floor = torch.zeros_like(self.at)  # the furthest place the answer followed its prediction
        self.seen = torch.zeros_like(self.at)  # answer tokens read so far

    def from_lists(self, rows: torch.Tensor, tokens: list[list[int]], draft: torch.Tensor, fill: int):
        """:meth:`merged` for answers held as lists (the eager loop's ledger: ``tokens[row]``)."""
        answers = [tokens[row] for row in rows.tolist()]
        lengths = torch.tensor(list(map(len, answers)), dtype=torch.long, device=draft.device)
        return self.merged(rows, recent_ids(answers, self.span, draft.device), lengths, draft, fill)

    def from_buffer(self, rows: torch.Tensor, out: torch.Tensor, generated: torch.Tensor, draft: torch.Tensor, fill):
        """:meth:`merged` for answers in a device buffer (the compiled loop's), with no host read."""
        return self.merged(rows, recent_in_buffer(out, generated, self.span), generated, draft, fill)

    def merged(self, rows: torch.Tensor, recent: torch.Tensor, generated: torch.Tensor, draft: torch.Tensor, fill: int):
        """``draft`` with each row that has predicted tokens drafting them (fill tokens after them); a
        narrower draft is widened to ``W - 1`` when any row has some (a read of one flag on the host).
        ``rows``: the batch's rows; ``recent``: their answers' last ``span`` tokens; ``generated``:
        their answers' lengths."""
        found = self._draft(rows, recent, generated)
        has = found[:, :1] != NONE
        if draft.shape[1] < self.size:
            if not bool(has.any()):
                return draft
            draft = torch.cat([draft, draft.new_full((draft.shape[0], self.size - draft.shape[1]), fill)], 1)
        return torch.where(has, torch.where(found != NONE, found, fill).to(draft.dtype), draft)

    def _draft(self, rows: torch.Tensor, recent: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """``[len(rows), W - 1]``: each row's predicted next tokens, NONE where it has none."""
        tokens, at, floor = self.tokens[rows], self.at[rows], self.floor[rows]
        new = generated - self.seen[rows]  # at most W a pass, within ``span``
        steps = torch.arange(self.span, device=tokens.device)[None, :]
        predicted = tokens.gather(1, (at[:, None] + steps).clamp(0, tokens.shape[1] - 1))
        answered = recent.gather(1, (self.span - new[:, None] + steps).clamp(max=self.span - 1))
        follows = (at != NONE) & ((predicted == answered) | (steps >= new[:, None])).all(1)
        at = torch.where(follows, at + new, self._realigned(tokens, recent, floor))
        floor = torch.where(at != NONE, at, floor)
        self.at[rows], self.floor[rows], self.seen[rows] = at, floor, generated
        places = at.clamp(min=0)[:, None] + steps[:, : self.size]  # within the padding: at <= longest
        return torch.where((at != NONE)[:, None], tokens.gather(1, places), NONE)

    def _realigned(self, tokens: torch.Tensor, recent: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
        """Per row, where (at or after ``floor``) the answer's last ``n`` tokens end in its prediction,
        for the largest ``n`` up to REALIGN found, the nearest place first; NONE where none is."""
        place = torch.full_like(floor, NONE)
        for n in range(1, min(self.REALIGN, tokens.shape[1]) + 1):  # a longer tail found overrides a shorter one
            ends = torch.arange(n, tokens.shape[1] + 1, device=tokens.device)
            match = (tokens.unfold(1, n, 1) == recent[:, None, -n:]).all(2) & (ends[None, :] >= floor[:, None])
            place = torch.where(match.any(1), ends[match.int().argmax(1)], place)
        return place


def recent_ids(answers: list[list[int]], span: int, device: torch.device) -> torch.Tensor:
    """``[len(answers), span]``: each answer's last ``span`` ids, right-aligned (BEFORE before its start)."""
    rows = [[BEFORE] * (span - len(answer[-span:])) + answer[-span:] for answer in answers]
    return torch.tensor(rows, dtype=torch.long, device=device).view(len(answers), span)


def recent_in_buffer(out: torch.Tensor, generated: torch.Tensor, span: int) -> torch.Tensor:
    """The same from an answer buffer on the device (``out[row, :generated[row]]`` is the answer)."""
    places = generated[:, None] - span + torch.arange(span, device=out.device)
    return torch.where(places >= 0, out.gather(1, places.clamp(min=0)), BEFORE)
