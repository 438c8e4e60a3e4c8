"""The ``--config`` and ``--model.*`` flags that ``serve`` and ``chat`` share with ``predict``.

The same :class:`~dllm_lit.module.BlockRefineLM` signature (model, aliases, every decoding setting)
without its training arguments, so a ``predict`` config's ``model:`` section works unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from dllm_lit.module import BlockRefineLM
from dllm_lit.settings import DecodeSettings

TRAINING_ARGS = set(inspect.signature(BlockRefineLM.__init__).parameters) - {
    "self",
    "model_name_or_path",
    "trust_remote_code",
    "decoding",
}
"""Everything in ``BlockRefineLM``'s signature but the model and the decoding settings."""


ANSWERING_DEFAULTS = {
    "model.model_name_or_path": "smollm2-fast",
    "model.lossless": True,
    "model.add_eos_length": 7,
    "model.max_new_tokens": 512,
    "model.prompt_cache_mib": 1024,
}
"""``serve``'s and ``chat``'s defaults: answers that are exactly the model's own (lossless mode, the
shipped draft adapter), and earlier prompts' K/V reused (a chat's turns), where ``predict`` keeps the
original script's block defaults."""


def model_parser(prog: str, description: str, defaults: dict[str, Any] | None = None) -> ArgumentParser:
    """A parser with ``--config`` and the ``--model.*`` flags (``defaults`` over the module's)."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these flags")
    parser.add_class_arguments(BlockRefineLM, "model", skip=TRAINING_ARGS, instantiate=False)
    parser.set_defaults(defaults or {})
    return parser


def add_function_flags(parser: ArgumentParser, function) -> None:
    """Top-level flags from ``function``'s keyword-only arguments, typed and documented."""
    parser.add_function_arguments(function, nested_key=None, skip=_positional(function))


def _positional(function) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY}


def function_flags(config: Any, function) -> dict[str, Any]:
    """The parsed values of ``function``'s keyword-only flags."""
    parameters = inspect.signature(function).parameters
    return {name: config[name] for name in parameters if name not in _positional(function)}


def model_settings(model: Any) -> tuple[str, bool, DecodeSettings]:
    """``(model_name_or_path, trust_remote_code, settings)`` from the parsed ``model`` group; a bad
    setting is a ``ValueError`` naming its flag."""
    decoding = {k: v for k, v in vars(model).items() if k not in ("model_name_or_path", "trust_remote_code")}
    try:
        settings = DecodeSettings(**decoding)
    except ValueError as error:
        raise ValueError(f"--model.{error}") from None
    return model.model_name_or_path, model.trust_remote_code, settings
