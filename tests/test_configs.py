"""Every YAML in configs/ parses and validates through the real CLI; presets match the seed's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from dllm_lit.cli import DllmCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# The seed's presets (USAGE_EXAMPLES.md, "参数调优建议"): add_eos_length, refine_iter, max_new_tokens.
SEED_PRESETS = {
    "gsm8k": (63, 2, 256),
    "math": (127, 2, 512),
    "humaneval": (255, 3, 1024),
    "fast": (127, 1, None),
    "balanced": (127, 2, None),
    "quality": (127, 4, None),
}


def test_the_presets_exist():
    assert set(SEED_PRESETS) | {"demo"} <= {path.stem for path in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_parses_and_validates(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name example files relative to the repository root
    cli = DllmCLI(args=["--config", str(config)], run=False)
    hp = cli.model.hparams
    assert hp.refine_iter >= 1 and hp.add_eos_length >= 0
    assert cli.datamodule.rows(), "the config's prompts must load"
    if config.stem in SEED_PRESETS:
        eos, refine, new = SEED_PRESETS[config.stem]
        assert (hp.add_eos_length, hp.refine_iter) == (eos, refine)
        assert new is None or hp.max_new_tokens == new
    if config.stem.startswith("demo"):
        assert hp.refine_iter >= hp.add_eos_length + 1, "the demo model needs exact settings"
