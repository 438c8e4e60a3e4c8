"""The compiled engine's attention before and after issue 16, side by side: one fixed-shape forward.

    python benchmarks/bench_attention.py                 # on one H100/H200: 8B shape, bf16, CUDA graphs
    python benchmarks/bench_attention.py --model smollm2 --device cpu --dtype float32 --batch 1 \\
        --cache-len 2048 --widths 1 16 64 --used 256 1024 2048 --repeats 5

Times one forward of ``StaticForward`` (the compiled engine's pass; replayed as a CUDA graph on a GPU,
eager on a CPU) with ``used`` cache slots filled, two ways in one process:
``whole cache``: attention over every cache slot with K/V heads copied per query head (transformers'
SDPA path with a mask), as before; ``used slots``: the span bounded to the used slots and grouped
heads read once (:mod:`dllm_lit.attention`). Prints median ms, the ratio and the roofline floor.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from bench_gpu import SHAPES, add_model_arguments, build, device_name, roofline
from timing import timed

from dllm_lit import compiled
from dllm_lit.compiled import StaticForward
from dllm_lit.models import load_model


@contextlib.contextmanager
def whole_cache_attention():
    """The path before issue 16: every slot attended, K/V heads copied (the model's own SDPA)."""
    grouped, step = compiled.grouped_attention, StaticForward.span_step
    compiled.grouped_attention = lambda model: contextlib.nullcontext()
    StaticForward.span_step = 1 << 30
    try:
        yield
    finally:
        compiled.grouped_attention, StaticForward.span_step = grouped, step


@torch.inference_mode()
def forward_ms(model, args, width: int, used: int, old: bool) -> float:
    """Median ms of one pass feeding ``width`` tokens that end at slot ``used``."""
    device = torch.device(args.device)
    with whole_cache_attention() if old else contextlib.nullcontext():
        static = StaticForward(model, args.batch, args.cache_len)
        static.reset(torch.ones(args.batch, 1, dtype=torch.long, device=device))
        vocab = model.config.vocab_size
        static(torch.randint(3, vocab, (args.batch, 1), device=device), 0, 1, graph=False)  # allocate the cache
        ids = torch.randint(3, vocab, (args.batch, width), device=device)
        seconds, _ = timed(lambda: static(ids, used - width, width), args.repeats, device=device)
    return 1e3 * seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--model", help="a model alias or directory instead of the random --shape")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache-len", type=int, default=4096)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 127, 255])
    parser.add_argument("--used", type=int, nargs="+", default=[640, 1536, 4096], help="filled cache slots")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model:
        model = load_model(args.model, dtype=dtype).to(device).eval()
    else:
        model = build(SHAPES[args.shape], device, dtype)
    _params, floor_of = roofline(model, args)
    config = model.config
    print(
        f"\n`{' '.join(sys.argv)}`  \n{device_name(device)}, torch {torch.__version__}, {args.model or args.shape} "
        f"({config.num_attention_heads} query / {config.num_key_value_heads} K/V heads), {args.dtype}, "
        f"batch {args.batch}, cache {args.cache_len} slots, median of {args.repeats}\n"
    )
    print("| width | used slots | whole cache ms | used slots ms | speed-up | floor ms |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        for used in args.used:
            old, new = (forward_ms(model, args, width, used, flag) for flag in (True, False))
            print(
                f"| {width} | {used} | {old:.2f} | {new:.2f} | {old / new:.2f}x | {floor_of(args.batch * width):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
