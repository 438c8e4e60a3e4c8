"""Progress on stderr: the rich bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import re
import sys
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel
from tqdm import tqdm

from dllm_lit import cli, progress
from dllm_lit.progress import LineCounter, LineProgress, StderrProgressBar, counter, progress_bar


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        output = super().training_step(batch, batch_idx)
        self.log("train_loss", output["loss"], prog_bar=True)
        return output


def fit_and_predict(bar: LineProgress, tmp_path) -> None:
    trainer = L.Trainer(
        max_steps=6,
        limit_val_batches=2,
        val_check_interval=3,
        limit_predict_batches=4,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = LoggingModel()
    trainer.fit(model)
    trainer.predict(model, model.val_dataloader())


def progress_lines(err: str) -> list[str]:
    stages = ("Sanity Checking: ", "Training: ", "Validation: ", "Predicting: ")
    return [line for line in err.splitlines() if line.startswith(stages)]


@pytest.mark.parametrize("isatty", [True, False])
def test_a_terminal_gets_the_rich_bar_and_a_log_file_plain_lines(isatty, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: isatty)
    assert type(progress_bar()) is (StderrProgressBar if isatty else LineProgress)


def test_lines_count_the_trainers_steps_and_batches(tmp_path, capsys):
    fit_and_predict(LineProgress(interval=0), tmp_path)
    lines = progress_lines(capsys.readouterr().err)
    steps = [line for line in lines if line.startswith("Training: ")]
    assert [re.match(r"Training: step (\d+)/6 ", line).group(1) for line in steps] == [str(k) for k in range(1, 7)]
    assert steps[-1].startswith("Training: step 6/6 (100 %), ") and ", 0:00:00 left" in steps[-1]
    assert all(re.fullmatch(r"[^,]+, \d+\.\d\d s/step, \d+:\d\d:\d\d left, train_loss -?\d\S*", line) for line in steps)
    assert sum(line.startswith("Sanity Checking: batch ") for line in lines) == 2
    assert [line.split(",")[0] for line in lines if line.startswith("Validation: ")] == [
        "Validation: batch 1/2 (50 %)",
        "Validation: batch 2/2 (100 %)",
    ] * 2
    predicted = [line.split(",")[0] for line in lines if line.startswith("Predicting: ")]
    assert predicted == [f"Predicting: batch {k}/4 ({25 * k} %)" for k in range(1, 5)]


def test_a_long_interval_shows_each_stages_first_and_last_line_only(tmp_path, capsys):
    fit_and_predict(LineProgress(interval=3600), tmp_path)
    lines = [line.split(" (")[0] for line in progress_lines(capsys.readouterr().err)]
    assert lines == [
        "Sanity Checking: batch 1/2",
        "Sanity Checking: batch 2/2",
        "Training: step 1/6",
        "Validation: batch 1/2",
        "Validation: batch 2/2",
        "Training: step 6/6",
        "Validation: batch 1/2",
        "Validation: batch 2/2",
        "Predicting: batch 1/4",
        "Predicting: batch 4/4",
    ]


def test_a_resumed_fit_counts_from_its_step_and_times_only_its_own_steps(tmp_path, capsys, monkeypatch):
    quiet = dict(logger=False, limit_val_batches=0, enable_model_summary=False, default_root_dir=tmp_path)
    L.Trainer(max_steps=4, **quiet).fit(LoggingModel())
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    capsys.readouterr()
    ticks = iter(range(1000))
    monkeypatch.setattr(progress, "monotonic", lambda: float(next(ticks)))  # one second a reading
    resumed = L.Trainer(max_steps=7, callbacks=[LineProgress(interval=3600)], **quiet)
    resumed.fit(LoggingModel(), ckpt_path=checkpoint)
    lines = [line.split(", ")[:3] for line in progress_lines(capsys.readouterr().err)]
    assert lines == [
        ["Training: step 5/7 (71 %)", "1.00 s/step", "0:00:02 left"],
        ["Training: step 7/7 (100 %)", "1.00 s/step", "0:00:00 left"],
    ]


def test_a_run_bounded_by_steps_alone_shows_its_epoch_without_a_limit():
    bar = StderrProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)
    assert bar._get_train_description(3).rstrip() == "Epoch 3"
    bar._trainer = SimpleNamespace(max_epochs=5)
    assert bar._get_train_description(3).rstrip() == "Epoch 3/4"


def test_the_command_line_can_choose_the_lines_and_their_interval(tiny_dir, monkeypatch):
    flags = ["--trainer.callbacks+=dllm_lit.progress.LineProgress", "--trainer.callbacks.interval=5"]
    monkeypatch.setattr(sys, "argv", ["dllm_lit", "--model.model_name_or_path", str(tiny_dir), *flags])
    bars = [c for c in cli.DllmCLI(run=False).trainer.callbacks if isinstance(c, ProgressBar)]
    assert [(type(bar), bar.interval) for bar in bars] == [(LineProgress, 5)]


def test_a_counter_is_tqdm_on_a_terminal_and_lines_off_one(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert type(counter(10)) is tqdm
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert type(counter(10, disable=True)) is tqdm
    capsys.readouterr()  # the first bar's own output
    ticks = iter(range(1000))
    monkeypatch.setattr(progress, "monotonic", lambda: float(next(ticks)))  # one second a reading
    with counter(10, 4, "train", "prompt") as bar:  # resumed at 4: the rate counts from there
        assert type(bar) is LineCounter
        bar.update(2)
        bar.update(1)  # within the interval: no line
        bar.update(3)
    assert capsys.readouterr().err.splitlines() == [
        "train: prompt 6/10 (60 %), 0.50 s/prompt, 0:00:02 left",
        "train: prompt 10/10 (100 %), 0.50 s/prompt, 0:00:00 left",
    ]
