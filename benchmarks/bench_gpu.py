"""GPU decoding speed on a Llama-3-8B-shaped model with random bf16 weights (issue 6), one process.

    python benchmarks/bench_gpu.py                      # on one H100/H200: the full table
    python benchmarks/bench_gpu.py --shape tiny --device cpu --dtype float32   # smoke test anywhere

Builds the model directly on the device (no download), then times, on the same inputs:
HF ``generate`` (autoregressive, once per input shape), the seed's no-cache loop, the eager engine
(``generate_blocks``) and the compiled engine (``generate_blocks(compile=True)``: static cache,
CUDA graphs; ``--modes ... inductor`` adds ``compile="inductor"``). Prints tok/s, forwards, ms per forward against the roofline floor
``max(2 * params * tokens / peak_flops, weight_bytes / bandwidth)`` of one block-wide forward,
and the share of tokens that match the eager engine (random bf16 weights give near-tied logits,
so one rounding difference changes all later tokens: the fp32 check printed first is the
correctness evidence). EOS is ignored as a stop so every run makes the same number of tokens.
After the table, the compiled engine's graphs are replayed alone: ms per forward by input width.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from dllm_lit import generate_blocks
from dllm_lit.static import _GRAPHS_BY_MODEL

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
# (batch, prompt tokens, new tokens, block width, refine_iter)
WORKLOADS = [
    (1, 512, 1024, 128, 2), (1, 512, 1024, 128, 1), (1, 512, 1024, 128, 4), (1, 512, 1024, 256, 2),
    (1, 512, 1024, 32, 1), (1, 2048, 2048, 128, 2), (8, 512, 1024, 128, 2), (1, 512, 256, 8, 8),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, budget_s: float = 20.0):
    """Median wall time of up to ``repeats`` runs (fewer once ``budget_s`` is spent)."""
    times, result = [], None
    while len(times) < repeats and sum(times) < budget_s:
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def build(shape: dict, device: torch.device, dtype: torch.dtype, **extra) -> LlamaForCausalLM:
    config = LlamaConfig(**shape, max_position_embeddings=8192, eos_token_id=2, bos_token_id=1,
                         tie_word_embeddings=False, **extra)
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
        kwargs = dict(eos_token_id=2, attention_mask=mask, add_eos_length=width - 1, refine_iter=refine_iter,
                      max_new_tokens=max_new)
        eager = generate_blocks(model, ids, **kwargs)
        for compile in (True, "inductor") if inductor and width == 8 else (True,):
            compiled = generate_blocks(model, ids, compile=compile, **kwargs)
            same = [r.token_ids for r in eager.rows] == [r.token_ids for r in compiled.rows]
            verdicts.append(f"blk{width} R{refine_iter}{' inductor' if compile == 'inductor' else ''}: tokens "
                            f"{'equal' if same else 'DIFFER'}, forwards {eager.forwards}/{compiled.forwards}")
    return "; ".join(verdicts)


@torch.inference_mode()
def replay_ms(model, device: torch.device, repeats: int = 20) -> dict:
    """Median ms of one replay of each captured graph of the compiled engine, by input width."""
    static = _GRAPHS_BY_MODEL.get(model)
    if static is None or not static.graphs:
        return {}
    result = {}
    static.start.fill_(0)  # write at the first slots: every width fits the cache there
    for (width, _keep), (graph, _ids, _logits) in sorted(static.graphs.items()):
        times = []
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        result[width] = statistics.median(times)
    return result


@torch.inference_mode()
def seed_loop(model, input_ids, *, eos: int, width: int, refine_iter: int, new_tokens: int):
    """The seed's loop: no cache, no early exit, every pass over the whole sequence."""
    seq, forwards = input_ids, 0
    while seq.shape[1] - input_ids.shape[1] < new_tokens:
        pre = seq.shape[1]
        x = torch.cat([seq, torch.full((seq.shape[0], width - 1), eos, device=seq.device)], dim=1)
        for _ in range(refine_iter):
            block = model(x).logits[:, pre - 1 :].argmax(-1)
            forwards += 1
            x = torch.cat([seq, block[:, :-1]], dim=1)
        seq = torch.cat([seq, block], dim=1)
    return seq[:, input_ids.shape[1] : input_ids.shape[1] + new_tokens], forwards


def floor_ms(params: int, weight_bytes: int, tokens: int, peak_tflops: float, bandwidth_tbs: float) -> float:
    return 1e3 * max(2 * params * tokens / (peak_tflops * 1e12), weight_bytes / (bandwidth_tbs * 1e12))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, device and roofline flags shared by the GPU benchmarks."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak (H100/H200 ~790)")
    parser.add_argument("--bandwidth-tbs", type=float,
                        help="HBM bandwidth; default: 3.0 on an H100, 4.3 otherwise (copies measured here)")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def roofline(model: torch.nn.Module, args: argparse.Namespace):
    """``(params, floor(tokens) -> ms)`` for this model on ``args.device``; fills in the bandwidth."""
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.bandwidth_tbs is None:
        args.bandwidth_tbs = 3.0 if "H100" in device_name(torch.device(args.device)) else 4.3
    return params, lambda tokens: floor_ms(params, weight_bytes, tokens, args.peak_tflops, args.bandwidth_tbs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["compiled", "hf", "seed"],
                        choices=["compiled", "inductor", "hf", "seed"],
                        help="what to time beside the eager engine (inductor: compile=\"inductor\", "
                             "about 40 s of compiling per batch size and width on an H200)")
    parser.add_argument("--workloads", type=int, nargs="*", help="indices into the workload list")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    fp32_check = check_fp32(device, "inductor" in args.modes)
    torch.manual_seed(0)
    model = build(SHAPES[args.shape], device, dtype)
    config = model.config
    params, floor_of = roofline(model, args)
    name = device_name(device)
    print(f"\n`{' '.join(sys.argv)}`  \ndevice: {name}; shape {args.shape} ({params / 1e9:.2f}B params), "
          f"{args.dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"median of up to {args.repeats}; floor at {args.peak_tflops} TFLOP/s, {args.bandwidth_tbs} TB/s\n")
    print(f"fp32 check on {args.device} (tiny model, 3 left-padded rows), eager vs compiled: {fp32_check}\n")
    print("| workload | mode | tok/s | forwards | ms/forward | floor ms (block fwd) | tokens = eager |")
    print("|---|---|---|---|---|---|---|")
    chosen = [WORKLOADS[i] for i in args.workloads] if args.workloads else WORKLOADS
    warm = torch.randint(3, config.vocab_size, (1, 16), device=device)  # kernels, allocator, autotuning
    generate_blocks(model, warm, eos_token_id=2, add_eos_length=7, max_new_tokens=16)
    model.generate(warm, max_new_tokens=4, do_sample=False, pad_token_id=0)
    hf_runs: dict = {}  # HF generate does not depend on the block settings: once per input shape
    graph_ms: dict = {}
    for batch, prompt_len, new, width, refine_iter in chosen:
        ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device=device,
                            generator=torch.Generator(device).manual_seed(batch * 100003 + prompt_len))
        label = f"b{batch} {prompt_len}+{new} blk{width} R{refine_iter}"
        floor = floor_of(batch * width)
        settings = dict(eos_token_id=2, add_eos_length=width - 1, refine_iter=refine_iter, max_new_tokens=new,
                        max_length=prompt_len + new, ignore_eos=True)
        eager_time, eager = timed(lambda: generate_blocks(model, ids, **settings), device, args.repeats)
        eager_tokens = torch.tensor([row.token_ids for row in eager.rows], device=device)
        total = batch * new
        rows = [("eager engine", eager_time, eager.forwards, 1.0)]
        for mode, compile in (("compiled", True), ("inductor", "inductor")):
            if mode not in args.modes:
                continue
            generate_blocks(model, ids, compile=compile, **settings)  # capture (and compile) this shape
            seconds, result = timed(lambda: generate_blocks(model, ids, compile=compile, **settings), device,
                                    args.repeats)
            same = (torch.tensor([row.token_ids for row in result.rows], device=device) == eager_tokens)
            rows.append((f"{mode} engine", seconds, result.forwards, same.float().mean().item()))
            if device.type == "cuda" and mode == "compiled":
                graph_ms[label] = replay_ms(model, device)
        shape_key = (batch, prompt_len, new)
        if "hf" in args.modes and shape_key not in hf_runs:
            no_stop = copy.deepcopy(model.generation_config)
            no_stop.update(eos_token_id=None, pad_token_id=0, max_new_tokens=new, do_sample=False)
            hf_runs[shape_key] = timed(lambda: model.generate(ids, generation_config=no_stop), device, 1)
        if shape_key in hf_runs:
            ar_time, ar = hf_runs[shape_key]
            rows.append(("HF generate", ar_time, new, (ar[:, prompt_len:] == eager_tokens).float().mean().item()))
        if "seed" in args.modes:
            seed_time, (seed_tokens, seed_forwards) = timed(
                lambda: seed_loop(model, ids, eos=2, width=width, refine_iter=refine_iter, new_tokens=new), device, 1)
            rows.append(("seed no-cache loop", seed_time, seed_forwards,
                         (seed_tokens == eager_tokens).float().mean().item()))
        for mode, seconds, forwards, same in rows:
            share = "-" if same is None else f"{100 * same:.1f} %"
            print(f"| {label} | {mode} | {total / seconds:.1f} | {forwards} | {1e3 * seconds / forwards:.2f} | "
                  f"{floor:.2f} | {share} |", flush=True)
    if graph_ms:
        print("\nCompiled engine, one CUDA-graph replay (median of 20), ms by input width (floor in brackets):\n")
        for label, by_width in graph_ms.items():
            batch = int(label.split()[0][1:])
            cells = [f"{width} tok: {ms:.2f} ({floor_of(batch * width):.2f})"
                     for width, ms in by_width.items()]
            print(f"- {label}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
