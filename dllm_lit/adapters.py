"""LoRA adapters through peft: wrap a model for training, and load a saved adapter onto its base.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (and usually the
tokenizer). Its ``base_model_name_or_path`` is what ``--model.model_name_or_path`` takes (an alias
such as ``smollm2``, a GGUF file or an HF directory): loading resolves the base locally, applies the
adapter and merges it, so decoding runs on a plain model. Only safetensors adapters load (a pickled
``adapter_model.bin`` could run code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter directory cannot be used; the message says why."""


def is_adapter(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The ``base_model_name_or_path`` an adapter directory was trained on."""
    path = Path(path).expanduser()
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as error:
        raise AdapterError(f"{path / ADAPTER_CONFIG} is not a readable peft adapter config: {error}") from None
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"Adapter {path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded).")
    return base


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None, dropout: float, base_name: str):
    """``model`` wrapped with LoRA on every linear layer but the output head; only the adapter trains.
    ``base_name`` is recorded as the adapter's base, so a saved adapter finds it again."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    wrapped = get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = base_name
    return wrapped


def continue_adapter(base_model: torch.nn.Module, path: str | Path, rank: int):
    """``base_model`` with the adapter at ``path`` attached unmerged and trainable, to train it further
    (its alpha, dropout and targets are its own; its rank must be ``rank``)."""
    from peft import PeftModel

    path = Path(path).expanduser()
    saved = json.loads((path / ADAPTER_CONFIG).read_text()).get("r")
    if saved != rank:
        hint = f"train it further with --model.lora_rank {saved}"
        raise AdapterError(f"The adapter {path} has LoRA rank {saved}: {hint}.")
    return PeftModel.from_pretrained(base_model, str(path), is_trainable=True)


def merge_adapter(base_model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``base_model`` with the adapter at ``path`` applied and merged into its weights."""
    from peft import PeftModel

    try:
        adapted = PeftModel.from_pretrained(base_model, str(Path(path).expanduser()), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise AdapterError(f"Could not apply the adapter {path}: {reason}") from None
    return adapted.merge_and_unload()
