"""Shared test helpers: tiny random models in fp32, padded prompts, and the `dllm_lit` command runner."""

from __future__ import annotations

import json
import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class OpCounts(TorchDispatchMode):
    """How many times each aten operator runs inside the block."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def drafty(name: str, scale: float):
    """A tiny model whose token embeddings are squeezed towards their mean: its predictions depend
    mostly on position, so drafts are often right and rows accept different counts per pass."""
    model = MODELS[name]()
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.copy_(weight.mean(0, keepdim=True) + scale * (weight - weight.mean(0, keepdim=True)))
    return model


LOSSLESS_MODELS = {**MODELS, "llama-drafty": lambda: drafty("llama", 0.02), "gpt2-drafty": lambda: drafty("gpt2", 0.05)}


def model_fixture(models: dict):
    """A module-scoped ``model`` fixture over ``models`` (a test module assigns it to ``model``)."""

    @pytest.fixture(params=sorted(models), scope="module")
    def model(request):
        return models[request.param]()

    return model


model = model_fixture(MODELS)


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


def save_without_template(folder: Path) -> Path:
    """A tiny model whose tokenizer has no chat template."""
    from dllm_lit.tiny import save_tiny_model

    save_tiny_model(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def save_lora(base_dir: str, folder: Path, seed: int) -> Path:
    """A LoRA adapter (rank 4) on ``base_dir`` with random weights, so that it changes the answers."""
    from dllm_lit.adapters import add_lora
    from dllm_lit.models import load_model

    torch.manual_seed(seed)
    model = add_lora(load_model(base_dir), 4, None, 0.0, base_dir)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # peft starts them at zero: an adapter that changes nothing
            torch.nn.init.normal_(weight, std=0.2)
    model.save_pretrained(folder)
    return folder


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


@pytest.fixture
def fresh_compiles(monkeypatch):
    """No inductor programs from earlier tests (dynamo stops compiling a function after 8 of them, and
    reuses a program for a model of the same shapes), and the once-per-process notice not yet shown."""
    from dllm_lit.compiled import StaticForward

    torch.compiler.reset()
    monkeypatch.setattr(StaticForward, "compile_announced", False)


@pytest.fixture(scope="session")
def dllm_lit():
    """The `dllm_lit` command as a subprocess: ``dllm_lit(args, cwd, env=...)``."""
    return run_dllm_lit


@pytest.fixture
def dllm_lit_here(capfd, monkeypatch):
    """The `dllm_lit` command run in this process, as ``dllm_lit`` runs it in a subprocess (the same
    result, seconds sooner): for the many one-line-error cases. An exception that escapes fails the test."""
    from importlib import import_module

    def run(args: list[str], cwd: Path, module: str = "dllm_lit.cli") -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", list(sys.argv))  # the legacy front end sets it
        capfd.readouterr()
        on_sigterm = signal.getsignal(signal.SIGTERM)  # predict sets its own: pytest keeps pytest's
        try:
            import_module(module).main(list(args))
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        finally:
            signal.signal(signal.SIGTERM, on_sigterm)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["dllm_lit", *args], code, out, err)

    return run


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str, prefix: str = "dllm_lit: error:") -> str:
    """Exit status 2, no traceback, exactly one error line on stderr, holding every fragment."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def predict_args(model_dir: str, out: Path, prompts: Path, *extra: str) -> list[str]:
    """A slow-enough greedy run over ``prompts`` (one token per forward, 48 tokens per prompt)."""
    return [
        "predict",
        f"--model.model_name_or_path={model_dir}",
        f"--data.prompts_file={prompts}",
        "--data.batch_size=2",
        "--data.sort_by_length=false",
        "--model.add_eos_length=0",
        "--model.max_new_tokens=48",
        "--model.stop_token_ids=[]",
        f"--writer.output_file={out}",
        *extra,
    ]


def wait_for_rows(parts: Path, at_least: int, timeout: float = 300) -> None:
    """Wait until the part files under ``parts`` hold ``at_least`` rows."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = sum(len(p.read_text().splitlines()) for p in parts.glob("*.jsonl")) if parts.is_dir() else 0
        if lines >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError("the run never wrote rows")


def write_forty_prompts(directory: Path) -> Path:
    return write(directory / "p.txt", "".join(f"prompt number {i} {'x' * (i % 7)}\n" for i in range(40)))


@pytest.fixture
def forty_prompts(tmp_path) -> Path:
    return write_forty_prompts(tmp_path)


def type_lines(monkeypatch, lines: list[str]) -> None:
    """``input()`` returns ``lines`` one by one, then raises ``EOFError`` (Ctrl-D)."""
    remaining = iter(lines)

    def type_next(prompt: str = "") -> str:
        try:
            return next(remaining)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", type_next)
