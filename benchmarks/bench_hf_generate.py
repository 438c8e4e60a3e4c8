"""Where HF ``generate``'s time goes on a GPU: the baseline checked before any ratio is quoted against it.

    python benchmarks/bench_hf_generate.py               # on one H100/H200: 8B shape, bf16
    python benchmarks/bench_hf_generate.py --shape tiny --device cpu --dtype float32 --new-tokens 32

Issue 16 found ``generate`` at 16.8 tok/s inside bench_gpu.py where a plain eager ``generate`` of the
same shape had read 38.5 tok/s. This times, in one process and on the same inputs, greedy
autoregressive decoding five ways: a bare loop (one forward over a ``DynamicCache`` and an argmax
per token, no per-step host sync); ``generate``; ``generate`` with a static cache; and the engine at
width 1, eager and compiled. Then it profiles a few ``generate`` steps and prints the operators
that take the most host time.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from bench_gpu import SHAPES, add_model_arguments, build, device_name, roofline
from timing import timed
from transformers import DynamicCache

from dllm_lit import generate_blocks


@torch.inference_mode()
def bare_loop(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding with nothing but the forwards and an argmax (the host never waits)."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new - 1):
        logits = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True).logits
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, new = torch.device(args.device), args.new_tokens
    torch.manual_seed(0)
    model = build(SHAPES[args.shape], device, getattr(torch, args.dtype))
    _params, floor_of = roofline(model, args)
    config = copy.deepcopy(model.generation_config)
    config.update(eos_token_id=None, pad_token_id=0, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    static = copy.deepcopy(config)
    static.update(cache_implementation="static")
    engine = dict(eos_token_id=2, add_eos_length=0, max_new_tokens=new, ignore_eos=True)
    ways = {
        "bare loop (DynamicCache + argmax)": lambda ids: bare_loop(model, ids, new),
        "HF generate": lambda ids: model.generate(ids, generation_config=config)[:, ids.shape[1] :],
        "HF generate, static cache": lambda ids: model.generate(ids, generation_config=static)[:, ids.shape[1] :],
        "engine W=1, eager": lambda ids: generate_blocks(model, ids, **engine),
        "engine W=1, compiled": lambda ids: generate_blocks(model, ids, backend="cuda_graph", **engine),
    }
    print(
        f"\n`{' '.join(sys.argv)}`  \n{device_name(device)}, torch {torch.__version__}, shape {args.shape}, "
        f"{args.dtype}, {new} new tokens, median of {args.repeats}; weights-read floor "
        f"{floor_of(1):.2f} ms/token\n"
    )
    print("| prompt | way | tok/s | ms/token | tokens = bare loop |")
    print("|---|---|---|---|---|")
    for length in args.prompts:
        ids = torch.randint(3, model.config.vocab_size, (1, length), device=device)
        reference = None
        for name, way in ways.items():
            way(ids)  # warm: kernels, allocator, graph capture
            seconds, out = timed(lambda: way(ids), args.repeats, device=device)
            tokens = out if isinstance(out, torch.Tensor) else torch.tensor([out.rows[0].token_ids], device=device)
            reference = tokens if name.startswith("bare") else reference
            same = "-" if reference is None else f"{(tokens == reference).float().mean().item():.0%}"
            print(f"| {length} | {name} | {new / seconds:.1f} | {1e3 * seconds / new:.2f} | {same} |", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompts[0]), device=device)
    few = copy.deepcopy(config)
    few.update(max_new_tokens=16, min_new_tokens=16)
    with torch.profiler.profile(activities=activities) as profile:
        model.generate(ids, generation_config=few)
    print("\nHost time of 16 `generate` steps, top operators:\n")
    print(profile.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
