"""End to end on the embedded SmolLM2-135M-Instruct, as a user runs it: `dllm_lit predict --config
configs/demo.yaml`."""

from __future__ import annotations

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_demo_config_answers_2_plus_2(dllm_lit):
    done = dllm_lit(["predict", "--config", "configs/demo.yaml"], ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Generated 1 responses" in out and "--- Example 1 ---" in out
    response = out.split("Response (")[1].split("\n", 1)[1]
    assert "4" in response.split("=" * 77)[0]
    assert "tok/s" in done.stderr and "forwards/token" in done.stderr
