"""Prediction writer: per-rank part files written batch by batch, merged by index on rank 0.

Every batch is appended to ``.<output>.parts/rank<r>-<run>.jsonl`` and fsync'ed, so a killed run
loses at most the batch in flight. The output file changes only when a run finishes: the parts are
merged in index order into a temporary file that atomically replaces it. A run that fails or is
interrupted leaves the output file as it was and keeps its finished rows in the parts folder, with
the run's fingerprint; ``resume`` checks that fingerprint, keeps those rows and decodes only the
rest. One run per output file at a time (:class:`~dllm_lit.outputs.OutputLock`). The writer only
persists: the console view and the performance line are :mod:`dllm_lit.summary`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from dllm_lit.outputs import (
    OutputError,
    OutputLock,
    check_replaceable,
    check_writable,
    fingerprint_difference,
    parts_dir,
)

FINGERPRINT = "run.json"


def _jsonl_offsets(path: Path) -> Iterator[tuple[int, int]]:
    """``(index, byte offset)`` of each complete row of a part file (a torn last line is skipped)."""
    with path.open("rb") as f:
        offset = 0
        for line in f:
            try:
                yield int(json.loads(line)["index"]), offset
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass
            offset += len(line)


class PredictionWriter(BasePredictionWriter):
    """Save predictions as they complete; write ``output_file`` in input order when the run ends.

    Args:
        output_file: ``.jsonl`` (one object a line) or ``.json`` (one array). ``None`` saves nothing.
        resume: Finish an interrupted run: keep the rows it saved (same prompts, settings and model,
            checked) and decode only the missing prompts.
        overwrite: Replace an existing output file (when this run finishes; until then it is kept).
    """

    def __init__(self, output_file: str | None = None, resume: bool = False, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_file = Path(output_file) if output_file else None
        self.resume = resume
        self.overwrite = overwrite
        self.fingerprint: dict[str, Any] | None = None  # this run's, from completed_indices()
        self.lock = OutputLock(self.output_file) if self.output_file else None
        self.part_path: Path | None = None  # this rank's part file, set in setup
        self.part = None  # its open handle, from on_predict_start

    @property
    def parts_dir(self) -> Path | None:
        return parts_dir(self.output_file) if self.output_file is not None else None

    def check(self) -> None:
        """Before any model loads: fail with one sentence if the output cannot be written, would be
        replaced without ``overwrite``, would lose unfinished rows, or is locked by another run."""
        if self.output_file is not None:
            check_writable(self.output_file)
            self.lock.probe()
            check_replaceable(self.output_file, resume=self.resume, overwrite=self.overwrite)

    def completed_indices(self, fingerprint: dict[str, Any] | None = None) -> set[int]:
        """Remember this run's ``fingerprint``; with ``resume``, check it against the unfinished run's
        and return the indices that run finished (a mismatch is an :class:`OutputError`)."""
        self.fingerprint = fingerprint
        if self.output_file is None or not (self.resume and self.parts_dir.is_dir()):
            return set()
        saved = self.parts_dir / FINGERPRINT
        earlier = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else {}
        difference = fingerprint_difference(earlier, fingerprint) if fingerprint is not None else None
        if difference:
            raise OutputError(
                f"Cannot resume {self.output_file}: its unfinished run used {difference}. Rerun with the same "
                "prompts, settings and model, or pass --writer.overwrite true to start over."
            )
        return {index for index, _, _ in self._saved_rows()}

    def _saved_rows(self) -> Iterator[tuple[int, Path, int]]:
        """``(index, part file, offset)`` of every row saved in the parts folder."""
        if self.parts_dir.is_dir():
            for source in sorted(self.parts_dir.glob("rank*.jsonl")):
                for index, offset in _jsonl_offsets(source):
                    yield index, source, offset

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Rank 0 takes the lock and starts (or reopens) the parts folder; every rank gets a part file."""
        if stage != "predict" or self.output_file is None:
            return
        problem = None
        if trainer.is_global_zero:
            try:
                self.lock.acquire()
                self._start_parts()
            except OutputError as error:
                problem = str(error)
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise OutputError(problem)
        run_id = trainer.strategy.broadcast(f"{int(time.time())}-{os.getpid()}")
        self.part_path = self.parts_dir / f"rank{trainer.global_rank}-{run_id}.jsonl"

    def _start_parts(self) -> None:
        if not self.resume:
            shutil.rmtree(self.parts_dir, ignore_errors=True)  # overwrite: a stale run is replaced
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        saved = self.parts_dir / FINGERPRINT
        if self.fingerprint is not None and not saved.is_file():
            saved.write_text(json.dumps(self.fingerprint), encoding="utf-8")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.part_path is not None:
            self.part = self.part_path.open("a", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self.part is None:
            return
        self.part.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction.rows))
        self.part.flush()
        os.fsync(self.part.fileno())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Merge once every rank is done. Runs on every rank, even one that got no prompts
        (Lightning skips the predict hooks of a rank without batches)."""
        if stage != "predict" or self.output_file is None:
            return
        self._close_part()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            total = self._merge()
            self.lock.release()
            print(f"[dllm_lit] {total} rows -> {self.output_file}", file=sys.stderr, flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Leave the output file as it was; keep the finished rows for ``resume`` and say so."""
        self._close_part()
        if not trainer.is_global_zero or self.output_file is None or self.lock.handle is None:
            return
        saved = len({index for index, _, _ in self._saved_rows()})
        if saved == 0:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.lock.release()
        if saved:
            cause = "interrupted" if isinstance(exception, KeyboardInterrupt) else "stopped by an error"
            print(
                f"dllm_lit: {cause}; {saved} finished responses are kept in {self.parts_dir} "
                f"({self.output_file} is unchanged). To finish the rest, rerun the same command with "
                "--writer.resume true.",
                file=sys.stderr,
                flush=True,
            )

    def _close_part(self) -> None:
        if self.part is not None:
            self.part.close()
            self.part = None

    def _merge(self) -> int:
        """Write all saved rows, once each, in index order; remove the parts; return the count."""
        located: dict[int, tuple[Path, int]] = {}
        for index, source, offset in self._saved_rows():
            located.setdefault(index, (source, offset))  # a duplicate (repeat or resume) keeps the first
        self._write_atomically(self._read_row(*located[index]) for index in sorted(located))
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return len(located)

    @staticmethod
    def _read_row(source: Path, offset: int) -> dict[str, Any]:
        with source.open("rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def _write_atomically(self, rows: Iterator[dict[str, Any]]) -> None:
        """Write next to the real file (a symlinked output keeps its link) and replace it in one step."""
        path = self.output_file.resolve()
        partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        as_array = path.suffix.lower() == ".json"
        with partial.open("w", encoding="utf-8") as f:
            f.write("[\n" if as_array else "")
            for number, row in enumerate(rows):
                text = json.dumps(row, ensure_ascii=False)
                f.write((",\n" if number else "") + "  " + text if as_array else text + "\n")
            f.write("\n]\n" if as_array else "")
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)
