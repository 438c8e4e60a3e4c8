"""``PredictionSummary``: the console view (stdout) and the performance line (stderr) of ``predict``.

It reads only what ``predict_step`` returns (:class:`~dllm_lit.module.PredictedBatch`): rows and
batch statistics. Under several processes each rank keeps its own first rows and totals, and rank 0
prints them all once every rank is done.
"""

from __future__ import annotations

import heapq
import resource
import sys
import time
from typing import Any, get_args

import lightning as L
import torch

from dllm_lit.compiled import StaticForward
from dllm_lit.ledger import StopReason

RULE = "=" * 77


def format_console_view(rows: list[dict[str, Any]], total: int, max_display: int) -> str:
    """The original script's console layout for the first ``max_display`` of ``total`` rows."""
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


def _gather(trainer: L.Trainer, value: Any) -> list[Any]:
    """``value`` from every rank (a list of one without several processes)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


class PredictionSummary(L.Callback):
    """Print the first responses (stdout) and a performance line (stderr) when ``predict`` ends.

    Args:
        max_display: How many responses to print to stdout, in input order.
    """

    def __init__(self, max_display: int = 10):
        if max_display < 0:
            raise ValueError(f"--summary.max_display must be 0 or above, got {max_display}.")
        self.max_display = max_display
        self.first_rows: list[dict[str, Any]] = []
        self.totals = {"prompts": 0, "forwards": 0, "tokens": 0, "row_forwards": 0, "prompt_tokens": 0, "cached": 0}
        self.totals.update((reason, 0) for reason in get_args(StopReason))
        self.setup_at = 0.0
        self.decode_at = 0.0
        self.load_seconds = 0.0
        self.compiled_before = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict":
            self.first_rows = []
            self.totals = dict.fromkeys(self.totals, 0)
            self.setup_at = self.decode_at = time.perf_counter()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The model is loaded (``configure_model`` ran since ``setup``): decoding starts."""
        self.decode_at = time.perf_counter()
        self.load_seconds = self.decode_at - self.setup_at
        self.compiled_before = StaticForward.compile_seconds

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        rows = outputs.rows
        self.totals["prompts"] += len(rows)
        self.totals["forwards"] += outputs.forwards
        self.totals["tokens"] += outputs.generated_tokens
        self.totals["row_forwards"] += sum(row["forwards"] for row in rows)  # forwards while each row was active
        self.totals["prompt_tokens"] += sum(row["prompt_length"] for row in rows)
        self.totals["cached"] += sum(row.get("cached_tokens", 0) for row in rows)  # with --model.prompt_cache_mib
        for row in rows:
            self.totals[row["stop_reason"]] += 1
        self.first_rows = heapq.nsmallest(self.max_display, self.first_rows + rows, key=lambda row: row["index"])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Runs on every rank, even one that got no prompts (Lightning then skips the predict hooks)."""
        if stage != "predict":
            return
        seconds = time.perf_counter() - self.decode_at
        ranks = _gather(trainer, (self.first_rows, self.totals))
        if not trainer.is_global_zero:
            return
        rows = heapq.nsmallest(
            self.max_display, (row for first, _ in ranks for row in first), key=lambda row: row["index"]
        )
        totals = {name: sum(t[name] for _, t in ranks) for name in self.totals}
        print(format_console_view(rows, totals["prompts"], self.max_display), flush=True)
        caching = bool(pl_module.decoding.prompt_cache_mib)
        print(self.performance_line(totals, seconds, pl_module.device, caching), file=sys.stderr, flush=True)

    def performance_line(self, totals: dict[str, int], seconds: float, device: torch.device, caching: bool) -> str:
        """Tokens per forward is per row: generated tokens over the sum of each row's forwards (the
        passes run while it was active), what one sequence gains per pass whatever the batch size.
        Inductor's compiles (``backend: inductor``) are counted apart from the decoding's seconds; the
        rows are counted by stop reason; with ``caching``, the prompt tokens read from the prompt cache."""
        tokens, row_forwards = totals["tokens"], totals["row_forwards"]
        compiling = StaticForward.compile_seconds - self.compiled_before
        seconds -= compiling
        return (
            f"[dllm_lit] {totals['prompts']} prompts | model load {self.load_seconds:.1f}s | "
            + (f"inductor compiles {compiling:.1f}s | " if compiling else "")
            + f"{tokens} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.1f} tok/s) | "
            f"{totals['forwards']} forwards | per row: {tokens / max(row_forwards, 1):.2f} tokens/forward "
            f"({row_forwards / max(tokens, 1):.3f} forwards/token) | "
            + (f"prompt cache: {totals['cached']} of {totals['prompt_tokens']} prompt tokens | " if caching else "")
            + f"stopped: {', '.join(f'{totals[r]} {r}' for r in get_args(StopReason) if totals[r])} | {_memory(device)}"
        )
