"""Progress on stderr: a live bar in a terminal, plain lines in a log file.

Rich redraws a live bar only on a terminal; under ``nohup``, a batch scheduler or CI it prints nothing
until the epoch ends, so a long ``fit`` looks hung, and tqdm fills a log file with carriage-return
redraws. Off a terminal, :func:`progress_bar` (Lightning) and :func:`counter` (``distill``,
``evaluate``) print :class:`RateLine` lines instead: one every ``interval`` seconds with the count,
the rate, the time left and the logged metrics.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from time import monotonic

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from tqdm import tqdm


class RateLine:
    """One stage's lines, ``Training: step 50/800 (6 %), 6.10 s/step, 1:16:15 left, train/loss 9.76``:
    at its first count, every ``interval`` seconds and at its last; the rate counts from ``done``."""

    def __init__(self, stage: str, unit: str, done: int = 0, interval: float = 30.0):
        self.stage, self.unit, self.interval = stage, unit, interval
        self.started, self.before, self.shown = monotonic(), done, None

    def show(self, done: int, total: int | float, metrics: dict | None = None) -> None:
        """Print the line for ``done`` of ``total`` (``inf`` or 0: unknown) when it is due."""
        now, known = monotonic(), 0 < total < float("inf")
        due = self.shown is None or now - self.shown >= self.interval or (known and done >= total)
        if not due:
            return
        self.shown, each = now, (now - self.started) / max(done - self.before, 1)
        parts = [f"{self.stage}: {self.unit} {done}" + (f"/{int(total)} ({100 * done / total:.0f} %)" if known else "")]
        parts.append(f"{each:.2f} s/{self.unit}")
        if known:
            parts.append(f"{timedelta(seconds=round(each * (total - done)))} left")
        parts += [f"{name} {value:.4g}" for name, value in (metrics or {}).items() if isinstance(value, float)]
        print(", ".join(parts), file=sys.stderr, flush=True)


class LineCounter:
    """tqdm's counting (``update``, ``close``, a context manager) printed as :class:`RateLine` lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", interval: float = 30.0):
        self.total, self.done = total, initial
        self.line = RateLine(desc, unit, initial, interval)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.line.show(self.done, self.total)

    def close(self) -> None:
        pass

    def __enter__(self) -> LineCounter:
        return self

    def __exit__(self, *error) -> None:
        self.close()


def counter(total: int, initial: int = 0, desc: str = "", unit: str = "it", disable: bool = False):
    """A tqdm bar on a terminal (or none: ``disable``), :class:`LineCounter` lines off one."""
    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    return LineCounter(total, initial, desc, unit)


class StderrProgressBar(RichProgressBar):
    """Lightning's rich progress bar on stderr; a run bounded by steps alone (``max_epochs=-1``) reads
    "Epoch 3", not "Epoch 3/-2"."""

    def __init__(self):
        super().__init__(console_kwargs={"stderr": True})

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"  # padded as Lightning does


class LineProgress(ProgressBar):
    """A line on stderr at a stage's first batch, every ``interval`` seconds and at its last:
    ``Training: step 50/800 (6 %), 6.10 s/step, 1:16:15 left, train/loss 9.76``."""

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval, self.enabled = interval, True
        self.lines: dict[str, RateLine] = {}

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def start(self, stage: str, unit: str = "batch", done: int = 0) -> None:
        self.lines[stage] = RateLine(stage, unit, done, self.interval)

    def on_train_start(self, trainer, pl_module) -> None:
        self.start(self.train_description, "step", trainer.global_step)  # a resumed fit counts from its step

    def on_validation_start(self, trainer, pl_module) -> None:
        self.start(self.validation_stage(trainer))

    def on_predict_start(self, trainer, pl_module) -> None:
        self.start(self.predict_description)

    def validation_stage(self, trainer) -> str:
        return self.sanity_check_description if trainer.sanity_checking else self.validation_description

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        self.report(self.train_description, trainer.global_step, trainer.estimated_stepping_batches, metrics)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        totals = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self.report(self.validation_stage(trainer), batch_idx + 1, totals[dataloader_idx], {})

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = trainer.num_predict_batches[dataloader_idx]
        self.report(self.predict_description, batch_idx + 1, total, {})

    def report(self, stage: str, done: int, total: int | float, metrics: dict) -> None:
        if self.enabled:
            if stage not in self.lines:
                self.start(stage)
            self.lines[stage].show(done, total, metrics)


def progress_bar(interval: float = 30.0) -> ProgressBar:
    """The rich bar on a terminal, :class:`LineProgress` when stderr goes to a file or a pipe."""
    return StderrProgressBar() if sys.stderr.isatty() else LineProgress(interval)
