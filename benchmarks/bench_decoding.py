"""Side-by-side decoding speed in one process: HF generate, the reference no-cache loop, the engine.

Usage:
    python benchmarks/bench_decoding.py smollm2 --prompt-tokens 302 --new-tokens 256 \
        --settings 8:2 32:1 128:2 --repeats 3

MODEL is anything ``dllm_lit.models`` loads (the ``smollm2`` alias, an HF directory, a GGUF
file). EOS is ignored as a stop so that every run generates exactly ``--new-tokens`` tokens;
it still fills the blocks. Prints a Markdown table: median tok/s over ``--repeats`` runs,
forwards, tokens per forward, speed-up over the no-cache loop, and whether the tokens equal the
no-cache loop's (and, for exact settings, greedy ``generate``'s).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timing import timed

from dllm_lit import generate_blocks
from dllm_lit.models import load_model, load_tokenizer
from dllm_lit.reference import reference_generate

TEXT = (
    "The history of numerical weather prediction begins in 1922, when Lewis Fry Richardson "
    "tried to forecast the weather by hand with the equations of fluid motion. His forecast "
    "was badly wrong, but the method was sound. Decades later, electronic computers made the "
    "calculation fast enough to be useful, and forecasts improved year after year. "
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model alias, HF directory or GGUF file")
    parser.add_argument("--prompt-tokens", type=int, default=302)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--settings", nargs="+", default=["8:2", "32:1", "128:2"], help="WIDTH:REFINE_ITER")
    parser.add_argument(
        "--lossless",
        type=int,
        nargs="*",
        default=[],
        metavar="WIDTH",
        help="also time lossless mode at these window widths (compared with HF generate)",
    )
    parser.add_argument(
        "--backends", nargs="+", default=["eager"], help="engine backends to time (eager, cuda_graph, inductor)"
    )
    parser.add_argument(
        "--logprobs", type=int, metavar="K", help="also time each engine row with logprobs=K (the cost of scoring)"
    )
    parser.add_argument(
        "--penalties",
        action="store_true",
        help="also time each engine row with repetition, presence and frequency penalties and a logit bias",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32)
    eos = tokenizer.eos_token_id
    ids = tokenizer(TEXT * (args.prompt_tokens // 40 + 2), return_tensors="pt").input_ids[:, : args.prompt_tokens]
    n = args.new_tokens

    def engine(**settings):
        """Median seconds and the result of the engine on the prompt (EOS not a stop: n tokens)."""
        run = partial(generate_blocks, model, ids, eos_token_id=eos, max_new_tokens=n, ignore_eos=True, **settings)
        return timed(run, args.repeats)

    rows = []

    variants = {}
    if args.logprobs is not None:
        variants[f"logprobs={args.logprobs}"] = {"logprobs": args.logprobs}
    if args.penalties:
        variants["penalties"] = {
            "repetition_penalty": 1.2,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logit_bias": {eos: -5.0},
        }

    def scored(label: str, seconds: float, result, **settings) -> None:
        """The same engine row with each --logprobs/--penalties variant: its tokens (the same, for
        logprobs) and its time per forward as a share of the row's (penalties change the text)."""
        for name, extra in variants.items():
            variant_time, variant = engine(**extra, **settings)
            same = "yes" if variant.rows[0].token_ids == result.rows[0].token_ids else "NO"
            ratio = (variant_time / variant.forwards) / (seconds / result.forwards)
            rows.append(
                (
                    f"{label} + {name}",
                    "-",
                    n / variant_time,
                    variant.forwards,
                    variant.tokens_per_forward,
                    None,
                    f"same tokens: {same} ({ratio:.3f}x the time per forward without)",
                )
            )

    no_stop = copy.deepcopy(model.generation_config)
    no_stop.update(eos_token_id=None, pad_token_id=eos, max_new_tokens=n, do_sample=False)
    ar_time, ar = timed(lambda: model.generate(ids, generation_config=no_stop), args.repeats)
    greedy = ar[0, ids.shape[1] :].tolist()
    rows.append(("HF generate (autoregressive)", "-", n / ar_time, n, 1.0, None, "-"))
    for setting in args.settings:
        width, refine_iter = (int(x) for x in setting.split(":"))
        label = f"blk{width} R{refine_iter}"
        base_time, (base_rows, base_forwards) = timed(
            lambda: reference_generate(
                model,
                ids,
                eos=eos,
                add_eos_length=width - 1,
                refine_iter=refine_iter,
                max_new_tokens=n,
                stop_at_eos=False,
            ),
            args.repeats,
        )
        rows.append(
            (f"{label} reference no-cache loop", label, n / base_time, base_forwards, n / base_forwards, 1.0, "-")
        )
        for backend in args.backends:
            engine_time, result = engine(add_eos_length=width - 1, refine_iter=refine_iter, backend=backend)
            same = result.rows[0].token_ids == base_rows[0][0]
            exact = refine_iter >= width
            verdict = ("yes" if same else "NO") + (
                f", = generate: {'yes' if result.rows[0].token_ids == greedy else 'NO'}" if exact else ""
            )
            rows.append(
                (
                    f"{label} engine ({backend})",
                    label,
                    n / engine_time,
                    result.forwards,
                    result.tokens_per_forward,
                    base_time / engine_time,
                    verdict,
                )
            )
            scored(rows[-1][0], engine_time, result, add_eos_length=width - 1, refine_iter=refine_iter, backend=backend)

    for width, backend in ((width, backend) for width in args.lossless for backend in args.backends):
        lossless_time, result = engine(add_eos_length=width - 1, lossless=True, backend=backend)
        same = "= generate: " + ("yes" if result.rows[0].token_ids == greedy else "NO")
        rows.append(
            (
                f"lossless W{width} ({backend})",
                "-",
                n / lossless_time,
                result.forwards,
                result.tokens_per_forward,
                None,
                f"{same} ({ar_time / lossless_time:.2f}x generate's speed)",
            )
        )
        scored(rows[-1][0], lossless_time, result, add_eos_length=width - 1, lossless=True, backend=backend)

    print(f"\n`{' '.join(sys.argv)}`  ")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; prompt {ids.shape[1]} tokens, {n} new tokens, "
        f"median of {args.repeats}\n"
    )
    print(
        "| mode | tok/s | forwards | tokens/forward | speed-up vs no-cache loop | tokens identical to no-cache loop |"
    )
    print("|---|---|---|---|---|---|")
    for name, _, tps, forwards, tpf, speedup, same in rows:
        speed = "-" if speedup is None else f"{speedup:.2f}x"
        print(f"| {name} | {tps:.1f} | {forwards} | {tpf:.2f} | {speed} | {same} |")


if __name__ == "__main__":
    main()
