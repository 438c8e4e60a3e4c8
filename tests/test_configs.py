"""Every YAML in configs/ parses and validates through the real CLI; presets match the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from dllm_lit.cli import DllmCLI

CONFIGS = sorted(path for path in (ROOT / "configs").glob("*.yaml") if path.stem != "serve")

# The original script's recommended presets (README, "Presets"): add_eos_length, refine_iter, max_new_tokens.
PRESETS = {
    "gsm8k": (63, 2, 256),
    "math": (127, 2, 512),
    "humaneval": (255, 3, 1024),
    "fast": (127, 1, None),
    "balanced": (127, 2, None),
    "quality": (127, 4, None),
}


def test_the_presets_exist():
    assert set(PRESETS) | {"demo"} <= {path.stem for path in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_parses_and_validates(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name example files relative to the repository root
    cli = DllmCLI(args=["--config", str(config)], run=False)
    hp = cli.model.decoding
    assert hp.refine_iter >= 1 and hp.add_eos_length >= 0
    data = cli.datamodule
    if data.train_file is None:
        assert data.prompt_rows(), "the config's prompts must load"
    else:  # the commands that write the training data are named in the config's header
        train_files = [data.train_file] if isinstance(data.train_file, str) else data.train_file
        assert all(f"--out {Path(path).parent}" in config.read_text() for path in train_files)
        assert cli.model.hparams.num_iterations >= 1 and Path(data.val_file).parent == Path(train_files[0]).parent
        trainer = cli.trainer
        if isinstance(trainer.val_check_interval, int):  # steps, not batches of one epoch: fewer rows must not fail
            assert trainer.check_val_every_n_epoch is None
    if config.stem in PRESETS:
        eos, refine, new = PRESETS[config.stem]
        assert (hp.add_eos_length, hp.refine_iter) == (eos, refine)
        assert new is None or hp.max_new_tokens == new
    if config.stem.startswith("demo"):
        assert hp.lossless or hp.refine_iter >= hp.add_eos_length + 1, "the demo model needs exact settings"


def test_the_serve_config_parses_and_validates():
    from dllm_lit.model_args import model_settings
    from dllm_lit.server import serve_parser

    config = serve_parser().parse_args(["--config", str(ROOT / "configs/serve.yaml")])
    name, trust, settings = model_settings(config.model)
    assert (name, trust, settings.lossless, config.host, config.port) == (
        "smollm2-fast",
        False,
        True,
        "127.0.0.1",
        8000,
    )
