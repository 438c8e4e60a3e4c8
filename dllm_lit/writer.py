"""Prediction writer: per-rank part files written batch by batch, merged by index on rank 0."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

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


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write ``.json`` (one array) or anything else as JSON Lines, atomically."""
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with partial.open("w", encoding="utf-8") as f:
        if path.suffix == ".json":
            json.dump(list(rows), f, ensure_ascii=False, indent=2)
            f.write("\n")
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)


def check_writable(path: Path) -> None:
    """Fail before any compute if ``path``'s directory cannot be created or written."""
    if path.is_dir():
        raise OutputError(f"Output file {path} is a directory: give a file name ending in .jsonl or .json.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create the output directory {path.parent}: {error.strerror}.") from None
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"Cannot write to the output directory {path.parent}: permission denied.")


class PredictionWriter(BasePredictionWriter):
    """Write predictions as they complete and show them in the seed's console layout.

    Args:
        output_file: ``.jsonl`` (one object a line) or ``.json`` (one array). ``None`` prints only.
        max_display: How many examples to print to stdout.
    """

    def __init__(self, output_file: str | None = None, max_display: int = 10):
        super().__init__(write_interval="batch")
        self.output_file = Path(output_file) if output_file else None
        self.max_display = max_display
        self._part = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self.output_file is not None:
            check_writable(self.output_file)
            parts = self.output_file.with_name(f".{self.output_file.name}.parts")
            if trainer.is_global_zero:
                shutil.rmtree(parts, ignore_errors=True)
        else:
            parts = Path(tempfile.mkdtemp(prefix="dllm_lit-parts-")) if trainer.is_global_zero else None
        self.parts_dir = Path(trainer.strategy.broadcast(str(parts) if parts else None))
        trainer.strategy.barrier()
        self.parts_dir.mkdir(parents=True, exist_ok=True)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._part = (self.parts_dir / f"rank{trainer.global_rank}.jsonl").open("w", encoding="utf-8")
        self._started = time.perf_counter()
        self._forwards = 0
        self._tokens = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for row in prediction:
            self._part.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._part.flush()
        os.fsync(self._part.fileno())
        stats = pl_module.last_batch_stats
        self._forwards += stats["forwards"]
        self._tokens += stats["generated_tokens"]

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._part.close()
        totals = trainer.strategy.reduce(
            torch.tensor([self._forwards, self._tokens], dtype=torch.float64, device=pl_module.device),
            reduce_op="sum",
        )
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return
        rows = self._merge()
        if self.output_file is not None:
            write_rows(self.output_file, rows)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        print(format_console_view(rows, len(rows), self.max_display), flush=True)
        forwards, tokens = (float(x) for x in totals)
        self._print_summary(pl_module, len(rows), forwards, tokens, time.perf_counter() - self._started)

    def _merge(self) -> list[dict[str, Any]]:
        by_index: dict[int, dict[str, Any]] = {}
        for part in sorted(self.parts_dir.glob("rank*.jsonl")):
            with part.open(encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    by_index[row["index"]] = row  # a sampler's padded duplicate replaces its twin
        return [by_index[i] for i in sorted(by_index)]

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
