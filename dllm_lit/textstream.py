"""Text from token ids as they are committed: incremental detokenization and stop strings.

Used by ``dllm_lit serve`` and ``dllm_lit chat``; :class:`StopStringWatch` ends the rows of a
``generate_blocks`` call at ``stop_strings``. Each call to :meth:`TextStream.add` takes the tokens
a row just committed (a block, or a lossless pass) and returns the text that is now final: it holds
back an unfinished UTF-8 character (``"\\ufffd"`` at the end of the decoded text) and the longest tail
that could still become a stop string, and cuts the text before the first stop string.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import replace

from dllm_lit.ledger import BlockGeneration, CommitListener, RowResult


def first_stop(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """Where the first of the ``stop`` strings begins in ``text`` (from ``start``), or ``None``."""
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found) if found else None


class TextStream:
    """The growing text of one row, emitted as deltas.

    Args:
        tokenizer: Decodes the row's ids (special tokens skipped, as ``predict`` writes them).
        stop: Stop strings; the text ends before the first one (it is not included).
        skip_special_tokens: False keeps them in the text (a tool-call parser reads its tags).
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.stopped = False

    def text(self, count: int | None = None) -> str:
        """The text of the first ``count`` ids (default: all)."""
        return self.tokenizer.decode(self.ids[:count], skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int]) -> str:
        """The newly final text after ``new_ids``; sets :attr:`stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        text = self.text()
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        final = len(text.rstrip("\ufffd"))
        return self._emit(text[: final - self._partial_stop(text[:final])])

    def finish(self) -> str:
        """The rest of the text once the row has ended."""
        if self.stopped:
            return ""
        text = self.text()
        cut = self._first_stop(text)
        return self._emit(text if cut is None else text[:cut])

    def tokens_through_stop(self) -> int:
        """How many of the ids the text needs to hold its stop string (all of them before one)."""
        if not self.stopped:
            return len(self.ids)

        def holds(count: int) -> bool:
            return first_stop(self.text(count), self.stop) is not None

        return bisect_left(range(len(self.ids) + 1), True, lo=1, key=holds)

    def _emit(self, final: str) -> str:
        delta = final[self.sent :] if len(final) > self.sent else ""
        self.sent = max(self.sent, len(final))
        return delta

    def _first_stop(self, text: str) -> int | None:
        return first_stop(text, self.stop, max(0, self.sent - max((len(s) for s in self.stop), default=0)))

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class StopStringWatch:
    """The ``on_commit`` listener that ends a row once its text holds a stop string.

    Wraps the caller's listener, which sees every commit up to the fewest tokens that hold the stop
    string (a block may have committed more) and, as its row's result, the one :meth:`finish` returns:
    those tokens, and ``"stop_string"``.
    """

    def __init__(self, tokenizer, stop: Sequence[str], rows: int, on_commit: CommitListener | None = None):
        self.streams = [TextStream(tokenizer, stop) for _ in range(rows)]
        self.on_commit = on_commit
        self.through: dict[int, int] = {}  # a stopped row's token count through its stop string

    def __call__(self, row: int, new_ids: list[int], result: RowResult | None) -> bool:
        stream = self.streams[row]
        if not stream.stopped:
            stream.add(new_ids)
            if stream.stopped:  # the caller sees the tokens through the stop string, not the block's rest
                self.through[row] = stream.tokens_through_stop()
                new_ids = new_ids[: max(0, self.through[row] - len(stream.ids) + len(new_ids))]
        if result is not None and stream.stopped:
            result = self._cut(row, result)
        asked = self.on_commit(row, new_ids, result) if self.on_commit is not None else False
        return stream.stopped or asked

    def finish(self, generation: BlockGeneration) -> BlockGeneration:
        """``generation`` with each row that reached a stop string cut after it."""
        for row in self.through:
            generation.rows[row] = self._cut(row, generation.rows[row])
        return generation

    def _cut(self, row: int, result: RowResult) -> RowResult:
        through = self.through[row]
        logprobs = result.logprobs[:through] if result.logprobs is not None else None
        return replace(
            result,
            token_ids=result.token_ids[:through],
            stop_reason="stop_string",
            stop_token_id=None,
            logprobs=logprobs,
        )
