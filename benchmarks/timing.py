"""Wall-clock timing shared by the benchmarks: medians, with the device synchronised around each run."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, *, device: torch.device | None = None, budget_s: float = float("inf")):
    """``(median seconds, last result)`` of up to ``repeats`` calls (fewer once ``budget_s`` is spent)."""
    times, result = [], None
    device = device or torch.device("cpu")
    while len(times) < repeats and sum(times) < budget_s:
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result
