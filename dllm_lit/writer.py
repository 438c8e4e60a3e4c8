"""Prediction writer: per-rank part files written batch by batch, merged by index on rank 0.

Every batch is appended to ``.<output>.parts/rank<r>-<run>.jsonl`` and fsync'ed, so a killed run
loses at most the batch in flight. The final file is written (atomically) when the run ends, or when
it is interrupted; ``resume`` keeps what earlier runs finished and decodes only the rest. The writer
only persists: the console view and the performance line are :mod:`dllm_lit.summary`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class OutputError(ValueError):
    """The output file cannot be written; the message says why."""


def check_writable(path: Path) -> None:
    """Fail before any compute if ``path``'s directory cannot be created or written."""
    if path.is_dir():
        raise OutputError(f"Output file {path} is a directory: give a file name ending in .jsonl or .json.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as error:
        raise OutputError(f"Cannot write the output file {path}: {error.strerror} ({error.filename}).") from None


def _jsonl_offsets(path: Path) -> Iterator[tuple[int, int]]:
    """``(index, byte offset)`` of each complete row of a JSON Lines file (a torn last line is skipped)."""
    with path.open("rb") as f:
        offset = 0
        for line in f:
            try:
                yield json.loads(line)["index"], offset
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
            offset += len(line)


class PredictionWriter(BasePredictionWriter):
    """Save predictions as they complete; merge them into ``output_file`` in input order at the end.

    Args:
        output_file: ``.jsonl`` (one object a line) or ``.json`` (one array). ``None`` saves nothing.
        resume: Keep the rows already in ``output_file`` (or left by an interrupted run) and
            decode only the missing prompts. Needs the same prompts, in the same order.
    """

    def __init__(self, output_file: str | None = None, resume: bool = False):
        super().__init__(write_interval="batch")
        self.output_file = Path(output_file) if output_file else None
        self.resume = resume
        self.part_path: Path | None = None  # this rank's part file, set in setup
        self.part = None  # its open handle, from on_predict_start
        self.json_rows: tuple[Path, list] | None = None  # an earlier .json output, parsed once

    @property
    def parts_dir(self) -> Path | None:
        """Where ranks write their part files; derived from the output file, so runs never collide."""
        if self.output_file is None:
            return None
        return self.output_file.with_name(f".{self.output_file.name}.parts")

    def completed_indices(self) -> set[int]:
        """Indices already saved by earlier runs (output file and leftover parts)."""
        if not self.resume or self.output_file is None:
            return set()
        return {index for index, _, _ in self._saved_rows()}

    def _saved_rows(self) -> Iterator[tuple[int, Path, int]]:
        """``(index, file, offset)`` of every saved row: the output file first, then part files."""
        sources = []
        if self.resume and self.output_file.is_file():
            sources.append(self.output_file)
        if self.parts_dir.is_dir():
            sources += sorted(self.parts_dir.glob("rank*.jsonl"))
        for source in sources:
            if source.suffix == ".json":
                try:
                    rows = json.loads(source.read_text(encoding="utf-8"))
                except json.JSONDecodeError:
                    continue
                for position, row in enumerate(rows):
                    yield row["index"], source, position
            else:
                for index, offset in _jsonl_offsets(source):
                    yield index, source, offset

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict" or self.output_file is None:
            return
        check_writable(self.output_file)
        if trainer.is_global_zero and not self.resume:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        run_id = trainer.strategy.broadcast(f"{int(time.time())}-{os.getpid()}")
        trainer.strategy.barrier()
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.part_path = self.parts_dir / f"rank{trainer.global_rank}-{run_id}.jsonl"

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
            print(f"[dllm_lit] {total} rows -> {self.output_file}", file=sys.stderr, flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Keep what is finished: merge it into the output file and say how to resume."""
        self._close_part()
        if not trainer.is_global_zero or self.part_path is None:
            return
        total = self._merge()
        cause = "interrupted" if isinstance(exception, KeyboardInterrupt) else "stopped by an error"
        print(
            f"dllm_lit: {cause}; {total} finished responses are saved in {self.output_file}. "
            "To finish the rest, rerun the same command with --writer.resume true.",
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

    def _read_row(self, source: Path, offset: int) -> dict[str, Any]:
        if source.suffix == ".json":  # only an earlier output in .json form: parse it once
            if self.json_rows is None or self.json_rows[0] != source:
                self.json_rows = (source, json.loads(source.read_text(encoding="utf-8")))
            return self.json_rows[1][offset]
        with source.open("rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def _write_atomically(self, rows: Iterator[dict[str, Any]]) -> None:
        path = self.output_file
        partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        as_array = path.suffix == ".json"
        with partial.open("w", encoding="utf-8") as f:
            f.write("[\n" if as_array else "")
            for number, row in enumerate(rows):
                text = json.dumps(row, ensure_ascii=False)
                f.write((",\n" if number else "") + "  " + text if as_array else text + "\n")
            f.write("\n]\n" if as_array else "")
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)
