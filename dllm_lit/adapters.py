"""LoRA adapters through peft: wrap a model for training, and load a saved adapter onto its base.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (and usually the
tokenizer). Its ``base_model_name_or_path`` is what ``--model.model_name_or_path`` takes (an alias
such as ``smollm2``, a GGUF file or an HF directory): loading resolves the base locally, applies the
adapter and merges it, so decoding runs on a plain model. Only safetensors adapters load (a pickled
``adapter_model.bin`` could run code).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from dllm_lit.prompt_cache import ADAPTER

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


def apply_adapter(base_model: torch.nn.Module, path: str | Path, name: str = "default"):
    """``base_model`` with the adapter at ``path`` injected as ``name`` (a peft model, unmerged, frozen)."""
    from peft import PeftModel

    with adapter_errors(path):
        return PeftModel.from_pretrained(base_model, str(Path(path).expanduser()), name, is_trainable=False)


@contextmanager
def adapter_errors(path: str | Path):
    """peft's errors on loading the adapter at ``path`` as one :class:`AdapterError` sentence."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise AdapterError(f"Could not apply the adapter {path}: {reason}") from None


class AdapterSwitch:
    """Several LoRA adapters on one base model, unmerged (``serve --lora_modules``): :meth:`use` picks
    the one the next forwards run, or none (the base model itself).

    Args:
        base_model: The served model (loaded, without a draft adapter).
        adapters: Each adapter's name and directory.
    """

    def __init__(self, base_model: torch.nn.Module, adapters: dict[str, str]):
        from peft.tuners.tuners_utils import BaseTunerLayer

        (first, path), *others = adapters.items()
        self.peft_model = apply_adapter(base_model, path, first)
        for name, path in others:
            with adapter_errors(path):
                self.peft_model.load_adapter(str(Path(path).expanduser()), name, is_trainable=False)
        self.model = self.peft_model.get_base_model()  # the served model, its layers now carrying the adapters
        self.layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        self.use(None)

    def use(self, name: str | None) -> None:
        """Run the next forwards with adapter ``name`` (None: the base model), named on the model for
        its prompt cache (K/V computed under one adapter serve that one only)."""
        setattr(self.model, ADAPTER, name)
        if name is not None:
            self.peft_model.base_model.set_adapter(name)
        for layer in self.layers:  # as peft's enable/disable_adapters, without its walk over the parameters
            layer._disable_adapters = name is None


def merge_adapter(base_model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``base_model`` with the adapter at ``path`` applied and merged into its weights."""
    return apply_adapter(base_model, path).merge_and_unload()


DRAFTER_FILE = "dllm_lit_drafter.json"
"""Present in an adapter directory trained with ``draft_adapter``: the adapter drafts, the base decides."""


def is_drafter(path: str | Path) -> bool:
    return (Path(path).expanduser() / DRAFTER_FILE).is_file()


def mark_drafter(path: str | Path) -> None:
    """Record in an exported adapter directory that the adapter only drafts (loading keeps it unmerged)."""
    note = {"draft_adapter": True, "use": "lossless decoding drafts with the adapter and verifies with the base"}
    (Path(path) / DRAFTER_FILE).write_text(json.dumps(note, indent=2) + "\n")


class DraftGate:
    """A LoRA adapter that serves only the tokens a forward marks: the draft branch of lossless decoding.

    Every other token, and every forward outside :meth:`tokens`, runs the base model exactly (the
    adapter layers are switched off), so a model carrying a gate decodes as its base does; lossless
    mode (:mod:`dllm_lit.lossless`) feeds a draft branch under :meth:`tokens` and verifies with the base.
    """

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.mask: torch.Tensor | None = None
        for layer in self.layers:
            for branch in layer.lora_B.values():
                branch.register_forward_hook(self._gate)
        self.enable(False)

    def _gate(self, module, inputs, output):
        return output if self.mask is None else output * self.mask.to(output.dtype)

    def enable(self, on: bool) -> None:
        """Switch the adapter layers on or off, leaving which weights train as it was. This sets the flag
        peft's ``enable_adapters`` sets, without its walk over every module and parameter (which also
        marks weights trainable): that walk took a quarter of a lossless pass on a CPU."""
        for layer in self.layers:
            layer._disable_adapters = not on

    @contextmanager
    def tokens(self, mask: torch.Tensor | None):
        """The adapter on for the tokens where ``mask`` (``[rows, tokens, 1]``) is 1; None: on for all."""
        self.mask = mask
        self.enable(True)
        try:
            yield
        finally:
            self.mask = None
            self.enable(False)


def draft_gate(model: torch.nn.Module) -> DraftGate | None:
    """The :class:`DraftGate` a model carries (``model.draft_gate``), if any."""
    return getattr(model, "draft_gate", None)


def attach_drafter(base_model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``base_model`` with the draft adapter at ``path`` injected unmerged behind a :class:`DraftGate`
    (``model.draft_gate``), switched off outside the draft branch."""
    model = apply_adapter(base_model, path).get_base_model()
    model.draft_gate = DraftGate(model)
    return model
