"""``dllm_lit evaluate``'s finished answers, kept as they come, so that an interrupted run resumes.

lm-eval asks a model three kinds of question (``generate_until``, ``loglikelihood``,
``loglikelihood_rolling``) and hands every answer to the model's cache hook. :class:`AnswerLog` is that
hook: it appends each answer to a JSON lines file (one per rank) under lm-eval's own key for the question
(:func:`lm_eval.api.model.hash_args`: the kind and the arguments, the whole prompt included), after a
first line holding the run's fingerprint (the model and every setting that shapes an answer). A
resumed run with the same fingerprint answers the questions found there from the file and asks the
model the rest (:meth:`AnswerLog.answered`). JSON only: lm-eval's own ``use_cache`` pickles into
SQLite, and reading such a file could run code.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_eval.api.model import CacheHook, hash_args

from dllm_lit.outputs import OutputError, fingerprint_difference

SYNC_SECONDS = 1.0
"""How often the file is fsynced (each answer is flushed to the OS at once: a killed process loses none)."""


class AnswerLog(CacheHook):
    """The answers of one evaluation run, rank ``rank``'s in its own file in ``folder`` (a new one
    with ``fingerprint`` first). With ``resume`` it first reads every rank's file an interrupted run
    with the same fingerprint left, whatever its number of ranks (an
    :class:`~dllm_lit.outputs.OutputError` if it was another run), and goes on in its own."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], resume: bool = False, rank: int = 0):
        super().__init__(None)
        self.answers: dict[str, Any] = {}
        self.path = folder / ("answers.jsonl" if rank == 0 else f"answers.rank{rank}.jsonl")
        if resume:
            for path in sorted(folder.glob("answers*.jsonl")):
                self._read(path, fingerprint)
        self.resumed = len(self.answers)
        if not (resume and self.path.is_file()):
            folder.mkdir(exist_ok=True)
            self.path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n", encoding="utf-8")
        self.file, self.synced = self.path.open("a", encoding="utf-8"), time.monotonic()

    @staticmethod
    def clear(folder: Path, remove: bool = False) -> None:
        """Delete every rank's answers in ``folder`` (``remove``: the folder too, if it is there)."""
        for path in folder.glob("answers*.jsonl"):
            path.unlink()
        if remove and folder.is_dir():
            folder.rmdir()

    def _read(self, path: Path, fingerprint: dict[str, Any]) -> None:
        try:
            header, *lines = path.read_text(encoding="utf-8").splitlines()
            difference = fingerprint_difference(json.loads(header)["fingerprint"], fingerprint)
        except (OSError, ValueError, KeyError, TypeError):  # no file, or no fingerprint: nothing to trust
            difference = f"its kept answers ({path}) are unreadable; pass --overwrite true to start again"
        if difference:
            raise OutputError(f"Cannot resume the evaluation in {path.parent.parent}: {difference}.")
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # cut off by a kill: that question is asked again
                continue
            self.answers[row["key"]] = tuple(row["answer"]) if isinstance(row["answer"], list) else row["answer"]

    def add_partial(self, attr: str, req, res: Any) -> None:
        """Keep one answer (lm-eval's cache hook, called by the model as each answer is final)."""
        key = hash_args(attr, req)
        if key in self.answers:
            return
        self.answers[key] = res
        self.file.write(json.dumps({"key": key, "answer": res}) + "\n")
        self.file.flush()
        if time.monotonic() - self.synced > SYNC_SECONDS:
            os.fsync(self.file.fileno())
            self.synced = time.monotonic()

    def answered(self, attr: str, requests: list, ask: Callable[[list], list]) -> list:
        """Each request's answer: the kept ones, and ``ask(the others)`` for the others, in order."""
        kept = [self.answers.get(hash_args(attr, request.args)) for request in requests]
        rest = [request for request, answer in zip(requests, kept) if answer is None]
        fresh = iter(ask(rest) if rest else [])
        return [next(fresh) if answer is None else answer for answer in kept]

    def close(self) -> None:
        """Write everything to the disk and close the file."""
        os.fsync(self.file.fileno())
        self.file.close()
