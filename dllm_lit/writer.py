"""Prediction writer: per-rank part files written batch by batch, merged by index on rank 0.

Every batch is appended to ``.<output>.parts/rank<r>-<run>.jsonl`` and fsync'ed, so a killed run
loses at most the batch in flight. The final file is written (atomically) when the run ends, or when
it is interrupted; ``resume`` keeps what earlier runs finished and decodes only the rest.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

RULE = "=" * 77


class OutputError(ValueError):
    """The output file cannot be written; the message says why."""


def format_console_view(rows: list[dict[str, Any]], total: int, max_display: int) -> str:
    """The seed's console layout for the first ``max_display`` of ``total`` rows."""
    lines = [RULE, f"Generated {total} responses", RULE]
    for number, row in enumerate(rows[:max_display], start=1):
        lines += [
            "",
            f"--- Example {number} ---",
            f"Prompt ({row['prompt_length']} tokens):",
            row["prompt"],
            "",
            f"Response ({row['response_length']} tokens):",
            row["response"],
        ]
    if total > max_display:
        lines += ["", f"... and {total - max_display} more"]
    lines += ["", RULE]
    return "\n".join(lines)


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
    """Write predictions as they complete and show them in the seed's console layout.

    Args:
        output_file: ``.jsonl`` (one object a line) or ``.json`` (one array). ``None`` prints only.
        max_display: How many examples to print to stdout.
        resume: Keep the rows already in ``output_file`` (or left by an interrupted run) and
            decode only the missing prompts. Needs the same prompts, in the same order.
    """

    def __init__(self, output_file: str | None = None, max_display: int = 10, resume: bool = False):
        super().__init__(write_interval="batch")
        self.output_file = Path(output_file) if output_file else None
        self.max_display = max_display
        self.resume = resume
        self._part = None
        self._temp_parts: Path | None = None  # parts folder when there is no output file

    @property
    def parts_dir(self) -> Path | None:
        """Where ranks write their part files; derived from the output file, so runs never collide."""
        if self.output_file is None:
            return self._temp_parts
        return self.output_file.with_name(f".{self.output_file.name}.parts")

    def completed_indices(self) -> set[int]:
        """Indices already saved by earlier runs (output file and leftover parts)."""
        if not self.resume or self.output_file is None:
            return set()
        return {index for index, _, _ in self._saved_rows()}

    def _saved_rows(self) -> Iterator[tuple[int, Path, int]]:
        """``(index, file, offset)`` of every saved row: the output file first, then part files."""
        sources = []
        if self.resume and self.output_file is not None and self.output_file.is_file():
            sources.append(self.output_file)
        if self.parts_dir is not None and self.parts_dir.is_dir():
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
        if stage != "predict":
            return
        if self.output_file is not None:
            check_writable(self.output_file)
            if trainer.is_global_zero and not self.resume:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
        else:
            temp = tempfile.mkdtemp(prefix="dllm_lit-parts-") if trainer.is_global_zero else None
            self._temp_parts = Path(trainer.strategy.broadcast(temp))
        run_id = trainer.strategy.broadcast(f"{int(time.time())}-{os.getpid()}")
        trainer.strategy.barrier()
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._part_path = self.parts_dir / f"rank{trainer.global_rank}-{run_id}.jsonl"

        self._started = time.perf_counter()
        self._forwards = 0
        self._tokens = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._part = self._part_path.open("a", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self._part.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction))
        self._part.flush()
        os.fsync(self._part.fileno())
        stats = pl_module.last_batch_stats
        self._forwards += stats["forwards"]
        self._tokens += stats["generated_tokens"]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Merge once every rank is done. Runs on every rank, even one that got no prompts
        (Lightning skips the predict hooks of a rank without batches)."""
        if stage != "predict":
            return
        if self._part is not None:
            self._part.close()
        totals = trainer.strategy.reduce(
            torch.tensor([self._forwards, self._tokens], dtype=torch.float64, device=pl_module.device),
            reduce_op="sum",
        )
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        total, shown = self._merge()
        print(format_console_view(shown, total, self.max_display), flush=True)
        forwards, tokens = (float(x) for x in totals)
        self._print_summary(pl_module, total, forwards, tokens, time.perf_counter() - self._started)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Keep what is finished: merge it into the output file and say how to resume."""
        if self._part is not None:
            self._part.close()
        if not trainer.is_global_zero or not hasattr(self, "_part_path"):
            return
        if self.output_file is None:
            print("dllm_lit: stopped; nothing was saved (no --writer.output_file).", file=sys.stderr)
            return
        total, _ = self._merge()
        cause = "interrupted" if isinstance(exception, KeyboardInterrupt) else "stopped by an error"
        print(
            f"dllm_lit: {cause}; {total} finished responses are saved in {self.output_file}. "
            "To finish the rest, rerun the same command with --writer.resume true.",
            file=sys.stderr,
            flush=True,
        )

    def _merge(self) -> tuple[int, list[dict[str, Any]]]:
        """Write all saved rows, once each, in index order; return the count and the first rows."""
        located: dict[int, tuple[Path, int]] = {}
        for index, source, offset in self._saved_rows():
            located.setdefault(index, (source, offset))  # a duplicate (repeat or resume) keeps the first
        shown: list[dict[str, Any]] = []
        rows = (self._read_row(*located[index]) for index in sorted(located))
        if self.output_file is not None:
            self._write_atomically(rows, shown)
        else:
            for row in rows:
                if len(shown) >= self.max_display:
                    break
                shown.append(row)
        if self.parts_dir is not None:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        return len(located), shown

    def _read_row(self, source: Path, offset: int) -> dict[str, Any]:
        if source.suffix == ".json":  # only an earlier output in .json form: parse it once
            if getattr(self, "_json_source", None) != source:
                self._json_source, self._json_rows = source, json.loads(source.read_text(encoding="utf-8"))
            return self._json_rows[offset]
        with source.open("rb") as f:
            f.seek(offset)
            return json.loads(f.readline())

    def _write_atomically(self, rows: Iterator[dict[str, Any]], shown: list[dict[str, Any]]) -> None:
        path = self.output_file
        partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        as_array = path.suffix == ".json"
        with partial.open("w", encoding="utf-8") as f:
            f.write("[\n" if as_array else "")
            for number, row in enumerate(rows):
                if len(shown) < self.max_display:
                    shown.append(row)
                text = json.dumps(row, ensure_ascii=False)
                f.write((",\n" if number else "") + "  " + text if as_array else text + "\n")
            f.write("\n]\n" if as_array else "")
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)

    def _print_summary(self, pl_module, prompts: int, forwards: float, tokens: float, seconds: float) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            memory = f"peak GPU memory {torch.cuda.max_memory_allocated(pl_module.device) / 2**30:.2f} GiB"
        else:
            memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        saved = f" -> {self.output_file}" if self.output_file else ""
        print(
            f"[dllm_lit] {prompts} prompts{saved} | model load {pl_module.load_seconds:.1f}s | "
            f"{int(tokens)} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.1f} tok/s) | "
            f"{forwards / max(tokens, 1):.3f} forwards/token ({tokens / max(forwards, 1):.2f} tokens/forward) | {memory}",
            file=sys.stderr,
            flush=True,
        )
