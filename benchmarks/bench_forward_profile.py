"""Where one compiled-engine forward spends its time, by kind of kernel (issue 16).

    python benchmarks/bench_forward_profile.py            # on one H100/H200: 8B shape, bf16
    python benchmarks/bench_forward_profile.py --shape tiny --device cpu --dtype float32   # smoke test

Profiles one ``StaticForward`` pass (``width`` tokens ending at slot ``used``) run eagerly, sums the
kernels' device time by kind (matrix products, attention, copies, the rest: norms, rotary, activations,
casts), then times the same pass replayed as a CUDA graph. The replay minus the kernels' sum is the
time between kernels. The same pass with the model's own RMSNorm code (``fuse_norms = False``) and with
separate q/k/v and gate/up products (``fuse_projections = False``), and with neither, is measured
beside it (on a CPU too, where the engine itself keeps separate products). Each also counts its
operators that launch a kernel (not views or casts to a tensor's own dtype), per layer. On a CPU
the operators' own CPU time stands in for kernel time, and the "replay" is the eager pass.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import torch
from bench_gpu import SHAPES, add_forward_arguments, add_model_arguments, build, device_name, roofline
from timing import timed
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from dllm_lit.compiled import StaticForward

KINDS = {
    "matrix products": re.compile(r"gemm|gemv|nvjet|cutlass|cublas|xmma|splitk|aten::(mm|addmm|bmm|linear)$", re.I),
    "attention": re.compile(r"fmha|flash|attention|efficient|softmax", re.I),
    "copies": re.compile(r"memcpy|memset|copy_|aten::cat$|index_put|index_copy", re.I),
}


FUSED = dict(fuse_norms=True, fuse_projections=True)  # the engine's pass on a GPU
VARIANTS = {  # name -> the StaticForward settings of the pass
    "the engine's pass": FUSED,
    "the model's own RMSNorm code": {**FUSED, "fuse_norms": False},
    "separate q/k/v and gate/up products, the model's rotary": {**FUSED, "fuse_projections": False},
    "the model's own RMSNorm, projections and rotary": {"fuse_norms": False, "fuse_projections": False},
}


class Launches(TorchDispatchMode):
    """Counts the operators that launch a kernel: in-place ones, and those whose output does not share
    an input's storage (a view or a cast to the dtype a tensor has launches nothing)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        inputs = {arg.untyped_storage().data_ptr() for arg in args if isinstance(arg, torch.Tensor)}
        aliased = isinstance(first, torch.Tensor) and first.untyped_storage().data_ptr() in inputs
        self.count += func.overloadpacket.__name__.endswith("_") or not aliased
        return out


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS.items() if pattern.search(name)), "the rest")


def kernel_times(prof, device: torch.device) -> dict[str, list[float]]:
    """``name -> [count, microseconds]`` of the kernels (CUDA) or the operators' self time (CPU)."""
    times: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if device.type == "cuda":
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                times[event.name][0] += 1
                times[event.name][1] += event.time_range.elapsed_us()
    else:
        for event in prof.key_averages():
            if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
                times[event.key] = [event.count, event.self_cpu_time_total]
    return times


def print_breakdown(times: dict[str, list[float]], replay_ms: float, top: int) -> None:
    """The kernels' time by kind, their sum against the graph replay, and the slowest by name."""
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, (count, us) in times.items():
        by_kind[kind_of(name)][0] += count
        by_kind[kind_of(name)][1] += us
    total_ms = sum(us for _count, us in times.values()) / 1e3
    print("\n| kind | kernels | ms | share |\n|---|---|---|---|")
    for kind, (count, us) in sorted(by_kind.items(), key=lambda item: -item[1][1]):
        print(f"| {kind} | {count} | {us / 1e3:.2f} | {us / 1e3 / total_ms:.0%} |")
    print(f"| kernels' sum | | {total_ms:.2f} | |")
    print(f"| graph replay | | {replay_ms:.2f} | between kernels: {replay_ms - total_ms:.2f} ms |")
    slowest = sorted(times.items(), key=lambda item: -item[1][1])[:top]
    print("\nslowest by name (count, ms): " + "; ".join(f"{n[:70]} ({c}, {us / 1e3:.2f})" for n, (c, us) in slowest))


def measure(static: StaticForward, ids: torch.Tensor, start: int) -> tuple[dict[str, list[float]], float, int]:
    """The kernels of one eager pass, the median ms of its graph replay, and its operators that launch
    kernels."""
    device, width = ids.device, ids.shape[1]
    for _ in range(3):  # warm up: cuBLAS heuristics, allocator, the graph's capture
        static(ids, start, width, graph=False)
        static(ids, start, width)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        static(ids, start, width, graph=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    replay, _ = timed(lambda: static(ids, start, width), 20, device=device)
    with Launches() as launches:
        static(ids, start, width, graph=False)
    return kernel_times(prof, device), replay * 1e3, launches.count


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_forward_arguments(parser)
    parser.add_argument("--used", type=int, default=640, help="filled cache slots after the pass")
    parser.add_argument("--top", type=int, default=8, help="slowest kernels listed by name")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build(SHAPES[args.shape], device, dtype)
    _params, floor_of = roofline(model, args)
    print(f"\n`{' '.join(sys.argv)}`  \n{device_name(device)}, torch {torch.__version__}, {args.shape}, {args.dtype}")
    forwards = {}
    for name, settings in VARIANTS.items():  # the engine's pass, and the same with one fusion left out
        forwards[name] = StaticForward(model, args.batch, args.cache_len)
        vars(forwards[name]).update(settings)
        forwards[name].reset(torch.ones(args.batch, 1, dtype=torch.long, device=device))
    for width in args.widths:
        ids = torch.randint(3, model.config.vocab_size, (args.batch, width), device=device)
        (_engine, (times, replay, launches)), *others = (
            (n, measure(f, ids, args.used - width)) for n, f in forwards.items()
        )
        print(
            f"\nwidth {width}, {args.used} slots used, batch {args.batch}: floor {floor_of(args.batch * width):.2f} ms"
        )
        print_breakdown(times, replay, args.top)
        kernels, layers = sum(count for count, _us in times.values()), model.config.num_hidden_layers
        print(f"\noperators that launch kernels: {launches} ({launches / layers:.1f} a layer)")
        for name, (other_times, other_replay, other_launches) in others:
            other = sum(count for count, _us in other_times.values())
            print(f"\nwith {name}: {other} kernels against {kernels}, ", end="")
            print(f"replay {other_replay:.2f} ms against {replay:.2f} ({other_replay / replay:.2f}x), ", end="")
            print(f"{other_launches / layers:.1f} launching operators a layer against {launches / layers:.1f}")


if __name__ == "__main__":
    main()
