"""The legacy front end: the original script's demo flags, translated onto ``dllm_lit predict``.

python -m dllm_lit.demo --model_path smollm2 --prompt "What is 2+2?" --use_chat_template
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from dllm_lit import cli
from dllm_lit.models import DEFAULT_MODEL, resolve_device
from dllm_lit.settings import BACKENDS, DEFAULTS, DecodeSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_lit.demo",
        description="Block-refine decoding with the legacy demo flags (a thin front for `dllm_lit predict`).",
        allow_abbrev=False,  # --device must never be taken for --devices
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt")
    source.add_argument("--prompts_file", help=".txt (one prompt a line), .jsonl or .json")
    parser.add_argument("--model_path", default=DEFAULT_MODEL, help="HF directory, .gguf file, or 'smollm2'")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_file", help="write results to .jsonl or .json")
    parser.add_argument("--max_display", type=int, default=10, help="examples printed to stdout")
    parser.add_argument("--use_chat_template", action="store_true", help="wrap prompts with the chat template")
    parser.add_argument("--add_eos_length", type=int, default=DEFAULTS.add_eos_length, help="block width minus one")
    parser.add_argument("--refine_iter", type=int, default=DEFAULTS.refine_iter, help="forward passes per block")
    parser.add_argument("--lossless", action="store_true", help="exactly the model's own output, >= 1 token/forward")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens)
    parser.add_argument("--max_length", type=int, default=DEFAULTS.max_length)
    parser.add_argument(
        "--backend",
        default=DEFAULTS.backend,
        choices=BACKENDS,
        help="cuda_graph: static cache + CUDA graphs (the fast GPU path); inductor: also fuses kernels",
    )
    parser.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-true")
    parser.add_argument("--devices", default=None, help="Lightning devices, e.g. 1 or 2")
    parser.add_argument("--device", type=legacy_device, help="as the original script: cpu, cuda or cuda:N")
    parser.add_argument("--trust_remote_code", action="store_true", help="run the model directory's own code")
    return parser


def legacy_device(device: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N``, present on this machine."""
    kind, _, number = device.partition(":")
    if kind not in ("cpu", "cuda") or (number and not number.isdigit()) or (kind == "cpu" and number):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {device!r}")
    try:
        return resolve_device(device)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def device_args(device: str) -> list[str]:
    """``--device cpu|cuda|cuda:N`` as Lightning trainer flags."""
    kind, _, number = device.partition(":")
    if kind == "cpu":
        return ["--trainer.accelerator=cpu"]
    return ["--trainer.accelerator=gpu", f"--trainer.devices=[{number}]" if number else "--trainer.devices=1"]


def to_cli_args(ns: argparse.Namespace) -> list[str]:
    """The ``dllm_lit predict`` arguments that mean the same as the legacy flags."""
    args = [
        "predict",
        f"--model.model_name_or_path={ns.model_path}",
        f"--model.add_eos_length={ns.add_eos_length}",
        f"--model.refine_iter={ns.refine_iter}",
        f"--model.lossless={ns.lossless}",
        f"--model.max_new_tokens={ns.max_new_tokens}",
        f"--model.max_length={ns.max_length}",
        f"--model.backend={ns.backend}",
        f"--data.batch_size={ns.batch_size}",
        f"--data.use_chat_template={ns.use_chat_template}",
        f"--summary.max_display={ns.max_display}",
        f"--model.trust_remote_code={ns.trust_remote_code}",
        "--model.full_text=true",
    ]
    # A list of one JSON string: the text is kept as written (a bare "null" or "~" would parse as None).
    args.append(
        f"--data.prompts={json.dumps([ns.prompt])}"
        if ns.prompt is not None
        else f"--data.prompts_file={ns.prompts_file}"
    )
    if ns.output_file:  # as the original: an existing file is replaced (here only once the run finishes)
        args += [f"--writer.output_file={ns.output_file}", "--writer.overwrite=true"]
    if ns.precision:
        args.append(f"--trainer.precision={ns.precision}")
    if ns.devices:
        args.append(f"--trainer.devices={ns.devices}")
    if ns.device:
        args += device_args(ns.device)
    return args


def check(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    """Bad values stop here, named by their legacy flags (not the ``predict`` flags they become)."""
    try:
        DecodeSettings(
            add_eos_length=ns.add_eos_length,
            refine_iter=ns.refine_iter,
            max_new_tokens=ns.max_new_tokens,
            max_length=ns.max_length,
        )
    except ValueError as error:
        parser.error(f"--{error}")  # each message starts with the setting's name
    for name, least in (("batch_size", 1), ("max_display", 0)):
        if getattr(ns, name) < least:
            parser.error(f"--{name} must be at least {least}, got {getattr(ns, name)}.")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    legacy = parser.parse_args(argv)
    check(parser, legacy)
    sys.argv = [sys.argv[0], *argv]  # `--devices 2` starts each other process as this module with sys.argv
    # ... which Lightning would warn about: the predict arguments and sys.argv differ by design here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli.main(to_cli_args(legacy))


if __name__ == "__main__":
    main()
