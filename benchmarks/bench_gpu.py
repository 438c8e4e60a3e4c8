"""GPU decoding speed on a Llama-3-8B-shaped model with random bf16 weights (issue 6), one process.

    python benchmarks/bench_gpu.py                      # on one H100/H200: the full table
    python benchmarks/bench_gpu.py --shape tiny --device cpu --dtype float32   # smoke test anywhere

Builds the model directly on the device (no download), then times, on the same inputs:
HF ``generate`` (autoregressive), the seed's no-cache loop, and the eager engine
(``generate_blocks``). Prints tok/s, forwards, ms per forward against the roofline floor
``max(2 * params * tokens / peak_flops, weight_bytes / bandwidth)``, and the share of tokens that
match the eager engine (for HF generate this is 100 % only at exact settings,
``refine_iter >= width``). EOS is ignored as a stop so every run makes the same number of tokens.
The compiled engine (static cache + CUDA graphs) is not built yet; its column will join here.
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
from transformers import LlamaConfig, LlamaForCausalLM

from dllm_lit import generate_blocks

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


def timed(fn, device: torch.device, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak (H100/H200 ~790)")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.3, help="HBM bandwidth (H200 4.8, H100 3.35)")
    parser.add_argument("--skip-seed-loop", action="store_true", help="the seed loop is slow on long runs")
    parser.add_argument("--workloads", type=int, nargs="*", help="indices into the workload list")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=8192, eos_token_id=2, bos_token_id=1,
                         tie_word_embeddings=False)
    torch.set_default_dtype(dtype)  # build the weights directly in bf16 on the device: no fp32 copy
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n`{' '.join(sys.argv)}`  \ndevice: {name}; shape {args.shape} ({params / 1e9:.2f}B params), "
          f"{args.dtype}, torch {torch.__version__}, median of {args.repeats}\n")
    print("| workload | mode | tok/s | forwards | ms/forward | floor ms (block fwd) | tokens = eager |")
    print("|---|---|---|---|---|---|---|")
    chosen = [WORKLOADS[i] for i in args.workloads] if args.workloads else WORKLOADS
    warm = torch.randint(3, config.vocab_size, (1, 16), device=device)  # kernels, allocator, autotuning
    generate_blocks(model, warm, eos_token_id=2, add_eos_length=7, max_new_tokens=16)
    model.generate(warm, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for batch, prompt_len, new, width, refine_iter in chosen:
        ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device=device)
        label = f"b{batch} {prompt_len}+{new} blk{width} R{refine_iter}"
        floor = floor_ms(params, weight_bytes, batch * width, args.peak_tflops, args.bandwidth_tbs)
        eager_time, eager = timed(lambda: generate_blocks(model, ids, eos_token_id=2, add_eos_length=width - 1,
                                                          refine_iter=refine_iter, max_new_tokens=new,
                                                          max_length=prompt_len + new, ignore_eos=True),
                                  device, args.repeats)
        eager_tokens = torch.tensor([row.token_ids for row in eager.rows], device=device)
        total = batch * new
        rows = [("eager engine", eager_time, eager.forwards, 1.0)]
        no_stop = copy.deepcopy(model.generation_config)
        no_stop.update(eos_token_id=None, pad_token_id=0, max_new_tokens=new, do_sample=False)
        ar_time, ar = timed(lambda: model.generate(ids, generation_config=no_stop), device, 1)
        rows.append(("HF generate", ar_time, new, (ar[:, prompt_len:] == eager_tokens).float().mean().item()))
        if not args.skip_seed_loop:
            seed_time, (seed_tokens, seed_forwards) = timed(
                lambda: seed_loop(model, ids, eos=2, width=width, refine_iter=refine_iter, new_tokens=new), device, 1)
            rows.append(("seed no-cache loop", seed_time, seed_forwards,
                         (seed_tokens == eager_tokens).float().mean().item()))
        for mode, seconds, forwards, same in rows:
            share = "-" if same is None else f"{100 * same:.1f} %"
            print(f"| {label} | {mode} | {total / seconds:.1f} | {forwards} | {1e3 * seconds / forwards:.2f} | "
                  f"{floor:.2f} | {share} |", flush=True)


if __name__ == "__main__":
    main()
