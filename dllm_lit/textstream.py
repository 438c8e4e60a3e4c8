"""Text from token ids as they are committed: incremental detokenization and stop strings.

Used by ``dllm_lit serve`` and ``dllm_lit chat``. Each call to :meth:`TextStream.add` takes the tokens
a row just committed (a block, or a lossless pass) and returns the text that is now final: it holds
back an unfinished UTF-8 character (``"\\ufffd"`` at the end of the decoded text) and the longest tail
that could still become a stop string, and cuts the text before the first stop string.
"""

from __future__ import annotations


class TextStream:
    """The growing text of one row, emitted as deltas.

    Args:
        tokenizer: Decodes the row's ids (special tokens skipped, as ``predict`` writes them).
        stop: Stop strings; the text ends before the first one (it is not included).
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

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

    def _emit(self, final: str) -> str:
        delta = final[self.sent :] if len(final) > self.sent else ""
        self.sent = max(self.sent, len(final))
        return delta

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
