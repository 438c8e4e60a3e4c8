"""How much kernel fusion would add to the compiled engine: one fixed-shape forward, three ways.

    python benchmarks/bench_fusion.py                     # on one H100/H200, 8B shape, bf16
    python benchmarks/bench_fusion.py --shape tiny --device cpu --dtype float32 --widths 7

Times one forward of the compiled engine's ``StaticForward`` (static cache, explicit slots) at
each input width: eager, replayed as a CUDA graph (what ``backend="cuda_graph"`` runs), and compiled by
``torch.compile(mode="reduce-overhead")`` (inductor fuses the elementwise kernels, then CUDA
graphs). Prints the median ms, the roofline floor and the compile time. A measurement for the
next step, not a decoding path.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from bench_gpu import SHAPES, add_forward_arguments, add_model_arguments, build, device_name, roofline
from timing import sync, timed

from dllm_lit.compiled import StaticForward


def median_ms(fn, device: torch.device, repeats: int) -> float:
    return 1e3 * timed(fn, repeats, device=device)[0]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_forward_arguments(parser)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build(SHAPES[args.shape], device, getattr(torch, args.dtype))
    _params, floor_of = roofline(model, args)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, 512), device=device)
    static, fused = (StaticForward(model, args.batch, args.cache_len, inductor=flag) for flag in (False, True))
    for forward in static, fused:
        forward.reset(torch.ones(args.batch, 512, dtype=torch.long, device=device))
        forward(ids, 0, 1, graph=False)  # the prefill allocates the cache
    print(
        f"\n`{' '.join(sys.argv)}`  \n{device_name(device)}, torch {torch.__version__}, batch {args.batch}, "
        f"cache {args.cache_len} slots\n"
    )
    print("| width | eager ms | CUDA graph ms | inductor + graphs ms | compile s | floor ms |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        block = torch.randint(3, model.config.vocab_size, (args.batch, width), device=device)
        eager = median_ms(lambda: static(block, 512, width, graph=False), device, args.repeats)
        graphed = "-"
        if device.type == "cuda":
            graphed = f"{median_ms(lambda: static(block, 512, width), device, args.repeats):.2f}"
        begin = time.perf_counter()
        for _ in range(3):  # compile, record, replay
            fused(block, 512, width)
        sync(device)
        compile_s = time.perf_counter() - begin
        inductor = median_ms(lambda: fused(block, 512, width), device, args.repeats)
        print(
            f"| {width} | {eager:.2f} | {graphed} | {inductor:.2f} | {compile_s:.0f} | "
            f"{floor_of(args.batch * width):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
