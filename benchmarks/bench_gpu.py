"""GPU decoding speed on a Llama-3-8B-shaped model with random bf16 weights (issue 6), one process.

    python benchmarks/bench_gpu.py                      # on one H100/H200: the full table
    python benchmarks/bench_gpu.py --shape tiny --device cpu --dtype float32   # smoke test anywhere

Builds the model directly on the device (no download), then times, on the same inputs:
HF ``generate`` (autoregressive, once per input shape), the reference no-cache loop, the eager
engine (``generate_blocks``) and the compiled engine (``backend="cuda_graph"``: static cache, CUDA
graphs; ``--modes ... inductor`` adds ``backend="inductor"``) and the compiled engine in lossless mode
(``lossless=True``, window = the block width; its tokens are compared with HF ``generate``).
Prints tok/s, forwards, ms per forward against the roofline floor
``max(2 * params * tokens / peak_flops, weight_bytes / bandwidth)`` of one block-wide forward,
and the share of tokens that match the eager engine (random bf16 weights give near-tied logits,
so one rounding difference changes all later tokens: the fp32 check printed first is the
correctness evidence). EOS is ignored as a stop so every run makes the same number of tokens.
After the table, the compiled engine's graphs are replayed alone: ms per forward by input width, and
ms of its eager prefill (the prompt and the first block's fills).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from timing import timed
from transformers import LlamaConfig, LlamaForCausalLM

from dllm_lit import generate_blocks
from dllm_lit.compiled import cached_forward
from dllm_lit.reference import reference_generate

SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "135m": dict(  # SmolLM2-135M's shape: the embedded model, for CPU runs
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
# (batch, prompt tokens, new tokens, block width, refine_iter)
WORKLOADS = [
    (1, 512, 1024, 128, 2),
    (1, 512, 1024, 128, 1),
    (1, 512, 1024, 128, 4),
    (1, 512, 1024, 256, 2),
    (1, 512, 1024, 32, 1),
    (1, 2048, 2048, 128, 2),
    (8, 512, 1024, 128, 2),
    (1, 512, 256, 8, 8),
    (1, 512, 256, 1, 1),
]


def build(shape: dict, device: torch.device, dtype: torch.dtype, **extra) -> LlamaForCausalLM:
    config = LlamaConfig(
        **shape, max_position_embeddings=8192, eos_token_id=2, bos_token_id=1, tie_word_embeddings=False, **extra
    )
    torch.set_default_dtype(dtype)  # build the weights directly in the dtype on the device
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def check_fp32(device: torch.device, inductor: bool) -> str:
    """Compiled == eager tokens and forwards on a tiny fp32 model with well-separated logits."""
    model = build(SHAPES["tiny"], device, torch.float32, initializer_range=0.3)
    torch.manual_seed(1)
    lengths = [5, 40, 17]
    ids = torch.zeros(3, max(lengths), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 512, (n,))
        mask[row, -n:] = 1
    verdicts = []
    for width, refine_iter, max_new in [(1, 1, 20), (8, 2, 61), (16, 4, 50), (32, 1, 64), (8, 8, 40)]:
        kwargs = dict(
            eos_token_id=2,
            attention_mask=mask,
            add_eos_length=width - 1,
            refine_iter=refine_iter,
            max_new_tokens=max_new,
        )
        eager = generate_blocks(model, ids, **kwargs)
        for backend in ("cuda_graph", "inductor") if inductor and width == 8 else ("cuda_graph",):
            compiled = generate_blocks(model, ids, backend=backend, **kwargs)
            same = [r.token_ids for r in eager.rows] == [r.token_ids for r in compiled.rows]
            verdicts.append(
                f"blk{width} R{refine_iter}{' inductor' if backend == 'inductor' else ''}: tokens "
                f"{'equal' if same else 'DIFFER'}, forwards {eager.forwards}/{compiled.forwards}"
            )
    for width in (1, 8):
        kwargs = dict(eos_token_id=2, attention_mask=mask, add_eos_length=width - 1, max_new_tokens=40, lossless=True)
        eager, compiled = (generate_blocks(model, ids, backend=b, **kwargs) for b in ("eager", "cuda_graph"))
        same = [r.token_ids for r in eager.rows] == [r.token_ids for r in compiled.rows]
        verdicts.append(
            f"lossless W{width}: tokens {'equal' if same else 'DIFFER'}, forwards {eager.forwards}/{compiled.forwards}"
        )
    return "; ".join(verdicts)


@torch.inference_mode()
def replay_ms(model, device: torch.device, batch: int, repeats: int = 20) -> dict:
    """Median ms of one replay of the compiled engine's graphs: ``{width: (ms at the smallest
    captured attention span, ms at the largest)}``."""
    static = cached_forward(model, batch)
    if static is None or not static.graphs:
        return {}
    by_width: dict = {}
    static.start.fill_(0)  # write at the first slots: every width fits the cache there
    for (width, _keep, span, *_branches), (graph, _ids, _logits) in sorted(static.graphs.items()):
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        by_width.setdefault(width, []).append((span, statistics.median(times)))
    return {width: (spans[0][1], spans[-1][1]) for width, spans in by_width.items()}


@torch.inference_mode()
def prefill_ms(model, ids: torch.Tensor, width: int, repeats: int = 5) -> tuple[float, float]:
    """Median ms of the compiled engine's eager prefill (the prompt and ``width - 1`` fills, as a run
    starts): ``(until its kernels finish, until the host returns)``. Where the two are close, the
    prefill is bound by the host's launches, not by the device."""
    static = cached_forward(model, ids.shape[0])
    fills = torch.full((ids.shape[0], width - 1), 2, device=ids.device)
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else lambda _device: None
    done, returned = [], []
    for _ in range(repeats):
        sync(ids.device)
        began = time.perf_counter()
        static.prefill(None, ids, torch.ones_like(ids), fills, width)
        returned.append(time.perf_counter() - began)
        sync(ids.device)
        done.append(time.perf_counter() - began)
    return 1e3 * statistics.median(done), 1e3 * statistics.median(returned)


def floor_ms(params: int, weight_bytes: int, tokens: int, peak_tflops: float, bandwidth_tbs: float) -> float:
    return 1e3 * max(2 * params * tokens / (peak_tflops * 1e12), weight_bytes / (bandwidth_tbs * 1e12))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, device and roofline flags shared by the GPU benchmarks."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak (H100/H200 ~790)")
    parser.add_argument(
        "--bandwidth-tbs",
        type=float,
        help="HBM bandwidth; default: 3.0 on an H100, 4.3 otherwise (copies measured here)",
    )


def add_forward_arguments(parser: argparse.ArgumentParser) -> None:
    """The shape of one compiled-engine forward, shared by the single-forward GPU benchmarks."""
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache-len", type=int, default=1664)
    parser.add_argument("--widths", type=int, nargs="+", default=[127, 255])


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def roofline(model: torch.nn.Module, args: argparse.Namespace):
    """``(params, floor(tokens) -> ms)`` for this model on ``args.device``; fills in the bandwidth."""
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.bandwidth_tbs is None:
        args.bandwidth_tbs = 3.0 if "H100" in device_name(torch.device(args.device)) else 4.3
    return params, lambda tokens: floor_ms(params, weight_bytes, tokens, args.peak_tflops, args.bandwidth_tbs)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["compiled", "lossless", "hf", "reference"],
        choices=["compiled", "inductor", "lossless", "hf", "reference"],
        help='what to time beside the eager engine (inductor: backend="inductor", '
        "about 40 s of compiling per batch size and width on an H200; lossless: the compiled engine "
        "with lossless=True, tokens compared with HF generate)",
    )
    parser.add_argument("--workloads", type=int, nargs="*", help="indices into the workload list")
    return parser.parse_args()


def time_workload(model, ids: torch.Tensor, workload: tuple, args, hf_runs: dict) -> list[tuple]:
    """``(mode, seconds, forwards, share of tokens equal to the eager engine's)`` per mode."""
    batch, prompt_len, new, width, refine_iter = workload
    device, budget = ids.device, dict(device=ids.device, budget_s=20.0)  # at most ~20 s of repeats each
    settings = dict(
        eos_token_id=2,
        add_eos_length=width - 1,
        refine_iter=refine_iter,
        max_new_tokens=new,
        max_length=prompt_len + new,
        ignore_eos=True,
    )
    eager_time, eager = timed(lambda: generate_blocks(model, ids, **settings), args.repeats, **budget)
    eager_tokens = torch.tensor([row.token_ids for row in eager.rows], device=device)

    def share(token_lists) -> float:
        return (torch.as_tensor(token_lists, device=device) == eager_tokens).float().mean().item()

    rows = [("eager engine", eager_time, eager.forwards, 1.0)]
    for mode, backend in (("compiled", "cuda_graph"), ("inductor", "inductor")):
        if mode in args.modes:
            generate_blocks(model, ids, backend=backend, **settings)  # capture (and compile) this shape
            seconds, result = timed(
                lambda: generate_blocks(model, ids, backend=backend, **settings), args.repeats, **budget
            )
            rows.append((f"{mode} engine", seconds, result.forwards, share([r.token_ids for r in result.rows])))
    shape_key = (batch, prompt_len, new)  # HF generate does not depend on the block settings
    if "hf" in args.modes and shape_key not in hf_runs:
        no_stop = copy.deepcopy(model.generation_config)
        no_stop.update(eos_token_id=None, pad_token_id=0, max_new_tokens=new, do_sample=False)
        hf_runs[shape_key] = timed(lambda: model.generate(ids, generation_config=no_stop), 1, **budget)
    if shape_key in hf_runs:
        ar_time, ar = hf_runs[shape_key]
        rows.append(("HF generate", ar_time, new, share(ar[:, prompt_len:])))
    if "lossless" in args.modes:
        lossless = dict(settings, lossless=True, backend="cuda_graph")
        generate_blocks(model, ids, **lossless)  # capture this shape
        seconds, result = timed(lambda: generate_blocks(model, ids, **lossless), args.repeats, **budget)
        greedy = hf_runs[shape_key][1][:, prompt_len:] if shape_key in hf_runs else None
        tokens = torch.tensor([r.token_ids for r in result.rows], device=device)
        same = (tokens == greedy).float().mean().item() if greedy is not None else float("nan")
        rows.append(("lossless compiled (= HF greedy)", seconds, result.forwards, same))
    if "reference" in args.modes:
        ref_time, (ref_rows, ref_forwards) = timed(
            lambda: reference_generate(
                model,
                ids,
                eos=2,
                add_eos_length=width - 1,
                refine_iter=refine_iter,
                max_new_tokens=new,
                stop_at_eos=False,
            ),
            1,
            **budget,
        )
        rows.append(("reference no-cache loop", ref_time, ref_forwards, share([t for t, _ in ref_rows])))
    return rows


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fp32_check = check_fp32(device, "inductor" in args.modes)
    torch.manual_seed(0)
    model = build(SHAPES[args.shape], device, dtype)
    vocab = model.config.vocab_size
    params, floor_of = roofline(model, args)
    print(
        f"\n`{' '.join(sys.argv)}`  \ndevice: {device_name(device)}; shape {args.shape} ({params / 1e9:.2f}B params), "
        f"{args.dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"median of up to {args.repeats}; floor at {args.peak_tflops} TFLOP/s, {args.bandwidth_tbs} TB/s\n"
    )
    print(f"fp32 check on {args.device} (tiny model, 3 left-padded rows), eager vs compiled: {fp32_check}\n")
    print("| workload | mode | tok/s | forwards | ms/forward | floor ms (block fwd) | tokens = eager |")
    print("|---|---|---|---|---|---|---|")
    warm = torch.randint(3, vocab, (1, 16), device=device)  # kernels, allocator, autotuning
    generate_blocks(model, warm, eos_token_id=2, add_eos_length=7, max_new_tokens=16)
    model.generate(warm, max_new_tokens=4, do_sample=False, pad_token_id=0)
    hf_runs: dict = {}
    graph_ms: dict = {}
    prefills: dict = {}
    for workload in [WORKLOADS[i] for i in args.workloads] if args.workloads else WORKLOADS:
        batch, prompt_len, new, width, refine_iter = workload
        seed = torch.Generator(device).manual_seed(batch * 100003 + prompt_len)
        ids = torch.randint(3, vocab, (batch, prompt_len), device=device, generator=seed)
        label = f"b{batch} {prompt_len}+{new} blk{width} R{refine_iter}"
        try:  # device time is scarce: a workload that fails is reported, and the next one still runs
            for mode, seconds, forwards, same in time_workload(model, ids, workload, args, hf_runs):
                print(
                    f"| {label} | {mode} | {batch * new / seconds:.1f} | {forwards} | "
                    f"{1e3 * seconds / forwards:.2f} | {floor_of(batch * width):.2f} | {100 * same:.1f} % |",
                    flush=True,
                )
            if device.type == "cuda" and "compiled" in args.modes:
                graph_ms[label] = replay_ms(model, device, batch)  # the compiled engine's graphs for this workload
                prefills[label] = prefill_ms(model, ids, width)
        except Exception as error:  # noqa: BLE001 - printed in the table, the traceback on stderr
            traceback.print_exc()
            print(f"| {label} | FAILED: {type(error).__name__}: {error} | | | | | |", flush=True)
    if graph_ms:
        print(
            "\nCompiled engine, one CUDA-graph replay (median of 20), ms by input width at the shortest and "
            "the longest attention span captured (floor in brackets), and the eager prefill's:\n"
        )
        for label, by_width in graph_ms.items():
            batch = int(label.split()[0][1:])
            cells = [
                f"{width} tok: {short:.2f}-{long:.2f} ({floor_of(batch * width):.2f})"
                for width, (short, long) in by_width.items()
            ]
            done, returned = prefills[label]
            cells.append(f"eager prefill {done:.2f} (the host returns after {returned:.2f})")
            print(f"- {label}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
