"""Where HF ``generate``'s time goes on a GPU: the baseline checked before any ratio is quoted against it.

    python benchmarks/bench_hf_generate.py               # on one H100/H200: 8B shape, bf16
    python benchmarks/bench_hf_generate.py --shape tiny --device cpu --dtype float32 --new-tokens 32

Issue 16 found ``generate`` at 16.8 tok/s inside bench_gpu.py where a plain eager ``generate`` of the
same shape had read 38.5 tok/s; in the same bench_gpu run it read 59.6 ms/token with 1024 new tokens
and 21.0 with 256 (prompt 512 both). This times, in one process and on the same inputs, greedy
autoregressive decoding six ways: a bare loop (one forward over a ``DynamicCache`` and an argmax
per token, no per-step host sync); ``generate``; ``generate`` with a static cache; and the engine at
width 1, eager and compiled, in block mode (the host reads each token, then launches the next pass
before it commits) and in lossless mode (the host reads one pass late). Then the ms of each
``generate`` step (a logits-processor clock): with ``max_new_tokens`` 128, with 1024 but stopped
after 128 (does the setting matter?), and a whole 1024-token run by quarter (does the position?).
Last, the operators that take the most host time in a few profiled steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from bench_gpu import SHAPES, add_model_arguments, build, device_name, roofline
from timing import timed
from transformers import DynamicCache, LogitsProcessor, StoppingCriteria

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


class StepClock(LogitsProcessor):
    """Records the time of every generation step (generate reads the stop flag each step, so the
    host is in step with the device here)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores

    def step_ms(self, parts: int = 1) -> list[float]:
        """Median ms per step in each of ``parts`` equal stretches of the run."""
        steps = [b - a for a, b in zip(self.times, self.times[1:])]
        size = len(steps) // parts
        return [1e3 * statistics.median(steps[i * size : (i + 1) * size]) for i in range(parts)]


class StopAfter(StoppingCriteria):
    def __init__(self, prompt_len: int, steps: int):
        self.end = prompt_len + steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.end, device=input_ids.device)


def generate_steps(model, ids: torch.Tensor, config, max_new: int, stop_after: int | None = None, parts: int = 1):
    """Median ms per ``generate`` step (by stretch) with ``max_new_tokens=max_new``."""
    config = copy.deepcopy(config)
    config.update(max_new_tokens=max_new, min_new_tokens=None)
    clock = StepClock()
    stops = [StopAfter(ids.shape[1], stop_after)] if stop_after else []
    model.generate(ids, generation_config=config, logits_processor=[clock], stopping_criteria=stops)
    return clock.step_ms(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=int, nargs="+", default=[512], help="prompt lengths")
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
        "engine W=1 lossless, compiled": lambda ids: generate_blocks(
            model, ids, backend="cuda_graph", lossless=True, adaptive_window=False, **engine
        ),
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
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompts[0]), device=device)
    print(f"\nms per `generate` step, prompt {ids.shape[1]}:\n")
    print(f"- max_new_tokens {new}: {generate_steps(model, ids, config, new)[0]:.2f}")
    print(f"- max_new_tokens 1024, stopped after {new}: {generate_steps(model, ids, config, 1024, new)[0]:.2f}")
    quarters = ", ".join(f"{ms:.2f}" for ms in generate_steps(model, ids, config, 1024, parts=4))
    print(f"- max_new_tokens 1024, by quarter of the run: {quarters}", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    few = copy.deepcopy(config)
    few.update(max_new_tokens=16, min_new_tokens=16)
    with torch.profiler.profile(activities=activities) as profile:
        model.generate(ids, generation_config=few)
    print("\nHost time of 16 `generate` steps, top operators:\n")
    print(profile.key_averages().table(sort_by="cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
