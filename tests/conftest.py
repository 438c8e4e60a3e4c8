"""Shared test helpers: tiny random models in fp32, padded prompts, and the `dllm_lit` command runner."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm_lit.tiny import tiny_gpt2, tiny_llama

VOCAB = 96
EOS = 2
ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    # 2 layers, a wide init so argmaxes are far from ties; the Llama has RoPE and grouped K/V heads.
    "llama": lambda seed=0: tiny_llama(
        VOCAB, intermediate_size=128, kv_heads=2, max_positions=512, initializer_range=0.3, seed=seed
    ),
    "gpt2": lambda seed=0: tiny_gpt2(VOCAB, initializer_range=0.3, seed=seed),
}


@pytest.fixture(params=sorted(MODELS), scope="module")
def model(request):
    return MODELS[request.param]()


def random_prompts(lengths, seed: int = 0, low: int = 3) -> list[list[int]]:
    """Prompts of the given lengths with ids that avoid EOS/BOS/PAD."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=g).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama with the character tokenizer, saved as an HF directory."""
    from dllm_lit.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), initializer_range=0.3))


def run_dllm_lit(
    args: list[str], cwd: Path, *, env: dict[str, str] | None = None, module: str = "dllm_lit.cli", timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``python -m dllm_lit.cli ARGS`` (or another ``module``) offline as a user would."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_dllm_lit(args: list[str], cwd: Path) -> subprocess.Popen:
    """Start ``python -m dllm_lit.cli ARGS`` in the background (to interrupt it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dllm_lit.cli", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="session")
def dllm_lit():
    """The `dllm_lit` command as a subprocess: ``dllm_lit(args, cwd, env=...)``."""
    return run_dllm_lit
