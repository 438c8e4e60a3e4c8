"""Speed against quality on a real LM: the base SmolLM2 and a block-trained one, per decoding mode.

    python benchmarks/bench_real_model.py --prompts examples/smollm2_distill/val.jsonl --limit 200 \
        --trained outputs/smollm2-fast --plot docs/speed_quality.png

For each model (``smollm2``, and ``--trained`` if given: an adapter or HF directory) and each mode
(autoregressive, lossless, and approximate blocks), decodes the held-out chat prompts and
``--arithmetic`` generated one-digit addition questions, and prints one Markdown table: tokens per forward,
tok/s, agreement (the response equals the same model's own autoregressive answer, token for token),
the share equal to the base model's autoregressive answer (how far training moved the answers),
the base model's negative log-likelihood per response token, mean over responses and the share above
1.5 nats (a quality gate: a broken answer reads as improbable to the base, a reworded one does not;
the base's own greedy answers score about 0.5, none above 1.5) and arithmetic accuracy (checked with
math-verify). HF ``generate`` on the base model is timed in
the same process, on the same batches (``--batch-size``; its prompt lookup only takes one prompt).
A mode on a compiled backend (``graphs``, ``inductor``) decodes every prompt once untimed first, so
that every shape is compiled or captured (a batch shrinks as its rows finish); that run's seconds are
printed, not counted.
``--plot`` draws tokens/forward against agreement and accuracy (needs matplotlib: ``pip install -e
.[bench]``); ``--answers`` writes every arithmetic response, graded, as JSON lines to read the accuracy
column by.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dllm_lit import generate_blocks
from dllm_lit.answers import is_correct
from dllm_lit.data import encode_prompt, left_pad
from dllm_lit.distill import answer_nll
from dllm_lit.models import load_model, load_tokenizer

MODES = {
    "AR": dict(add_eos_length=0),
    "lossless W16": dict(add_eos_length=15, lossless=True),
    "lossless W16 fixed": dict(add_eos_length=15, lossless=True, adaptive_window=False),  # every pass wide
    "lossless W8": dict(add_eos_length=7, lossless=True),  # configs/demo.yaml's settings
    "lossless W8 fixed": dict(add_eos_length=7, lossless=True, adaptive_window=False),
    "lossless W8 fixed, no alternatives": dict(
        add_eos_length=7, lossless=True, adaptive_window=False, draft_alternatives=0
    ),
    "lossless W8 graphs": dict(add_eos_length=7, lossless=True, backend="cuda_graph"),  # fixed shapes
    "lossless W16 graphs": dict(add_eos_length=15, lossless=True, backend="cuda_graph"),
    "AR inductor": dict(add_eos_length=0, backend="inductor"),  # torch.compile's fused kernels, also on CPU
    "lossless W8 inductor": dict(add_eos_length=7, lossless=True, backend="inductor"),
    "lossless W4": dict(add_eos_length=3, lossless=True),
    "lossless W4 lookup 3..2": dict(add_eos_length=3, lossless=True, prompt_lookup_max=3),
    "lossless W4 lookup 3..1": dict(add_eos_length=3, lossless=True, prompt_lookup_max=3, prompt_lookup_min=1),
    "lossless W16 lookup 3..2": dict(add_eos_length=15, lossless=True, prompt_lookup_max=3),
    "blk8 R1": dict(add_eos_length=7, refine_iter=1),
    "blk16 R2": dict(add_eos_length=15, refine_iter=2),
    "blk32 R2": dict(add_eos_length=31, refine_iter=2),
}


def chat_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    return [encode_prompt(tokenizer, {"messages": [{"role": "user", "content": q}]}, True) for q in questions]


def decode(model, tokenizer, prompts: list[list[int]], batch: int, **settings) -> tuple[list, int, int, float]:
    """``(answers, generated tokens, forwards, seconds)`` over batches of left-padded prompts."""
    answers, generated, forwards, start = [], 0, 0, time.perf_counter()
    for first in range(0, len(prompts), batch):
        chunk = prompts[first : first + batch]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id)
        result = generate_blocks(
            model, ids, attention_mask=mask, eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer, **settings
        )
        answers += [row.token_ids for row in result.rows]
        generated += result.generated_tokens
        forwards += sum(row.forwards for row in result.rows)
    return answers, generated, forwards, time.perf_counter() - start


def grade(tokenizer, answers: list[list[int]], pairs: list[tuple[int, int]], limit: int) -> list[dict]:
    """Each arithmetic response, its text, whether math-verify finds ``a + b`` in it, and its length."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
    return [
        dict(
            question=f"{a} + {b}",
            response=text,
            correct=is_correct(text, str(a + b)),
            tokens=len(ids),
            at_limit=len(ids) >= limit,
        )
        for (a, b), text, ids in zip(pairs, texts, answers)
    ]


def base_nll(base, prompts: list[list[int]], answers: list[list[int]], known: dict) -> list[float]:
    """:func:`~dllm_lit.distill.answer_nll` of each non-empty answer under ``base``; ``known`` keeps the
    scores already computed (lossless modes repeat the AR answers)."""
    for prompt, answer in zip(prompts, answers):
        key = (tuple(prompt), tuple(answer))
        if answer and key not in known:
            known[key] = answer_nll(base, prompt, answer)
    return [known[(tuple(prompt), tuple(answer))] for prompt, answer in zip(prompts, answers) if answer]


def hf_generate_seconds(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int, **extra
) -> tuple[float, int]:
    """Seconds and tokens (each row's up to its EOS) of greedy HF ``generate`` over batches of
    left-padded prompts, the batches :func:`decode` runs."""
    start, tokens, eos = time.perf_counter(), 0, tokenizer.eos_token_id
    for first in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[first : first + batch], tokenizer.pad_token_id)
        out = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=eos,
            **extra,
        )
        for row in out[:, ids.shape[1] :].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="held-out .jsonl rows with messages (dllm_lit distill)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument(
        "--arithmetic",
        type=int,
        default=100,
        help="generated one-digit addition questions (SmolLM2-135M gets about half right; two-digit ones, 10 %%)",
    )
    parser.add_argument("--trained", help="the block-trained model: an adapter or HF directory")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="prompts per batch, all modes and HF generate (1: latency)",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--base-modes", nargs="+", choices=list(MODES), help="the base model's modes (default: --modes; AR always runs)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sample every mode at this temperature (seed 0: prompt i of a batch samples with seed i, so the "
        "exact modes must agree with the sampled AR answers; HF generate stays greedy, for its speed)",
    )
    parser.add_argument("--top-p", type=float, default=None, help="with --temperature: the nucleus threshold")
    parser.add_argument(
        "--guided-json", help="constrain every mode to this JSON schema (text; HF generate stays unconstrained)"
    )
    parser.add_argument("--hf-limit", type=int, help="time HF generate on the first N prompts only (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", help="write tokens/forward against agreement and accuracy to this PNG")
    parser.add_argument("--answers", help="write each arithmetic response, graded, to this .jsonl")
    args = parser.parse_args()
    if args.plot:
        import matplotlib  # noqa: F401  (fail before the long run, not after it)

    tokenizer = load_tokenizer("smollm2")
    with open(args.prompts) as source:
        rows = [json.loads(line) for line in source][: args.limit]
    held_out = chat_ids(tokenizer, [row["messages"][0]["content"] for row in rows])
    rng = random.Random(0)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(args.arithmetic)]
    arithmetic = chat_ids(tokenizer, [f"What is {a} + {b}? Answer with the number." for a, b in pairs])
    prompts = held_out + arithmetic
    models = {"base": "smollm2", **({"trained": args.trained} if args.trained else {})}
    print(f"\n`python benchmarks/bench_real_model.py {shlex.join(sys.argv[1:])}`  ")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}\n")
    table, graded, base_ar, scored = [], [], None, {}
    for label, name in models.items():
        model = load_model(name).to(args.device)
        limit = dict(max_new_tokens=args.max_new_tokens)
        if args.temperature > 0:
            limit |= dict(temperature=args.temperature, top_p=args.top_p, seed=0)
        if args.guided_json:
            limit |= dict(guided_json=args.guided_json)
        modes = (args.base_modes or args.modes) if label == "base" else args.modes
        if label == "base":
            timed = prompts[: args.hf_limit]
            seconds, tokens = hf_generate_seconds(model, tokenizer, timed, args.max_new_tokens, args.batch_size)
            base = model
            table.append((label, "HF generate", 1.0, tokens / seconds, None, None, None, None))
            if any("lookup" in mode for mode in modes):  # transformers' prompt lookup: one prompt at a time
                extra = dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=3)
                seconds, tokens = hf_generate_seconds(model, tokenizer, timed, args.max_new_tokens, 1, **extra)
                table.append((label, "HF generate, prompt lookup 3, batch 1", None, tokens / seconds) + (None,) * 4)
        own = None
        for mode in ["AR"] + [m for m in modes if m != "AR"]:
            if MODES[mode].get("backend"):  # compile every shape first: batches shrink as their rows finish
                warm = decode(model, tokenizer, prompts, args.batch_size, **MODES[mode], **limit)
                print(f"{label} {mode}: a first run, compiling or capturing, {warm[3]:.1f}s, not timed")
            answers, tokens, forwards, seconds = decode(
                model, tokenizer, prompts, args.batch_size, **MODES[mode], **limit
            )
            own, base_ar = own or answers, base_ar or answers
            agreement = sum(a == b for a, b in zip(answers, own)) / len(own)
            as_base = sum(a == b for a, b in zip(answers, base_ar)) / len(base_ar)
            rows = grade(tokenizer, answers[len(held_out) :], pairs, args.max_new_tokens)
            graded += [dict(model=label, mode=mode) | row for row in rows]
            accuracy = sum(row["correct"] for row in rows) / len(pairs) if pairs else None  # "-" without sums
            scores = base_nll(base, prompts, answers, scored)
            nll = (sum(scores) / max(len(scores), 1), sum(score > 1.5 for score in scores) / max(len(scores), 1))
            table.append((label, mode, tokens / forwards, tokens / seconds, agreement, accuracy, as_base, nll))
    print(
        "| model | mode | tokens/forward | tok/s | agreement with own AR | arithmetic accuracy | same as base AR "
        "| base NLL/token (share > 1.5) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, mode, tpf, speed, agree, acc, as_base, nll in table:
        cells = ["-" if tpf is None else f"{tpf:.2f}", f"{speed:.1f}"]
        cells += ["-" if share is None else f"{100 * share:.1f} %" for share in (agree, acc, as_base)]
        cells.append("-" if nll is None else f"{nll[0]:.2f} ({100 * nll[1]:.1f} %)")
        print(f"| {label} | {mode} | " + " | ".join(cells) + " |")
    if args.answers:
        with open(args.answers, "w") as sink:
            sink.writelines(json.dumps(row) + "\n" for row in graded)
    if args.plot:
        plot(table, args.plot)


def plot(table: list[tuple], path: str) -> None:
    """Tokens/forward against agreement with the own AR answer (left) and arithmetic accuracy (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((axes[0], 4, "agreement with own AR answer (%)"), (axes[1], 5, "arithmetic accuracy (%)"))
    for axis, column, name in panels:
        named = []
        for label, marker in (("base", "o"), ("trained", "s")):
            rows = [t for t in table if t[0] == label and t[column] is not None]
            points = [(t[2], 100 * t[column], f"{label} {t[1]}") for t in rows]
            axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
            named += points
        for index, (x, y, text) in enumerate(near_points_labelled(named)):
            above = index % 2 == 0  # neighbouring labels on opposite sides of their points
            offset, align = ((3, 4), "bottom") if above else ((3, -4), "top")
            axis.annotate(text, (x, y), fontsize=7, xytext=offset, textcoords="offset points", va=align)
        axis.margins(x=0.3, y=0.15)  # room for the labels right of the last point
        axis.set_xlabel("tokens per forward")
        axis.set_ylabel(name)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def near_points_labelled(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One label per cluster of points closer than 0.6 tokens/forward (about a label's width) and 1 point
    of percentage, its lines the points' names with their tokens/forward, so that no label covers another."""
    clusters: list[list[tuple[float, float, str]]] = []
    for point in sorted(points):
        last = clusters[-1][-1] if clusters else None
        if last and point[0] - last[0] < 0.6 and abs(point[1] - last[1]) < 1:
            clusters[-1].append(point)
        else:
            clusters.append([point])
    return [
        (cluster[0][0], cluster[0][1], "\n".join(f"{name} ({x:.2f})" for x, _, name in cluster)) for cluster in clusters
    ]


if __name__ == "__main__":
    main()
