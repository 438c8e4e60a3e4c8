"""Progress on stderr: Lightning's rich bar in a terminal, plain lines in a log file.

Rich redraws a live bar only on a terminal; under ``nohup``, a batch scheduler or CI it prints nothing
until the epoch ends, so a long ``fit`` looks hung. :func:`progress_bar` picks :class:`LineProgress`
there: one line every ``interval`` seconds with the step, the rate, the time left and the logged
metrics.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from time import monotonic

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


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
        self.clocks: dict[str, tuple[float, int]] = {}  # stage -> (started, steps or batches done then)
        self.shown: dict[str, float] = {}  # stage -> its last line's time

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def start(self, stage: str, done: int = 0) -> None:
        self.clocks[stage] = (monotonic(), done)
        self.shown.pop(stage, None)

    def on_train_start(self, trainer, pl_module) -> None:
        self.start(self.train_description, trainer.global_step)  # a resumed fit counts from its step

    def on_validation_start(self, trainer, pl_module) -> None:
        self.start(self.validation_stage(trainer))

    def on_predict_start(self, trainer, pl_module) -> None:
        self.start(self.predict_description)

    def validation_stage(self, trainer) -> str:
        return self.sanity_check_description if trainer.sanity_checking else self.validation_description

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        self.report(self.train_description, "step", trainer.global_step, trainer.estimated_stepping_batches, metrics)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        totals = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        self.report(self.validation_stage(trainer), "batch", batch_idx + 1, totals[dataloader_idx], {})

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = trainer.num_predict_batches[dataloader_idx]
        self.report(self.predict_description, "batch", batch_idx + 1, total, {})

    def report(self, stage: str, unit: str, done: int, total: int | float, metrics: dict) -> None:
        """Print the line when it is due: the first, the last, or ``interval`` seconds after the previous."""
        now, known = monotonic(), 0 < total < float("inf")
        started, before = self.clocks.setdefault(stage, (now, 0))
        due = stage not in self.shown or now - self.shown[stage] >= self.interval or (known and done >= total)
        if not self.enabled or not due:
            return
        self.shown[stage], each = now, (now - started) / max(done - before, 1)
        parts = [f"{stage}: {unit} {done}" + (f"/{int(total)} ({100 * done / total:.0f} %)" if known else "")]
        parts.append(f"{each:.2f} s/{unit}")
        if known:
            parts.append(f"{timedelta(seconds=round(each * (total - done)))} left")
        parts += [f"{name} {value:.4g}" for name, value in metrics.items() if isinstance(value, float)]
        print(", ".join(parts), file=sys.stderr, flush=True)


def progress_bar(interval: float = 30.0) -> ProgressBar:
    """The rich bar on a terminal, :class:`LineProgress` when stderr goes to a file or a pipe."""
    return StderrProgressBar() if sys.stderr.isatty() else LineProgress(interval)
