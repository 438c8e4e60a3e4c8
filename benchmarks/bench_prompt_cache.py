"""Prompt caching on a multi-turn chat: time to the first token and per turn, with and without it.

    python benchmarks/bench_prompt_cache.py                       # smollm2-fast, lossless W8 (serve's defaults)
    python benchmarks/bench_prompt_cache.py --system-tokens 1500 --turns 6 --repeats 5
    python benchmarks/bench_prompt_cache.py --refine-iter 8       # block mode, exact (W = R = 8)

A conversation with a long system message (the start of the README, ``--system-tokens`` tokens) and
``--turns`` user questions is decoded once without a cache to fix its prompts (each turn's prompt is
the conversation so far). Then, ``--repeats`` times with a fresh :class:`~dllm_lit.prompt_cache.PromptCache`
that follows the conversation as ``chat`` and ``serve`` keep theirs, every turn's prompt is decoded
with and without the cache side by side (alternating which goes first). The table gives per turn
the prompt and the tokens reused, the median seconds to the first committed token and to the end of
the answer, their ratios, and whether the answers equal the uncached ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dllm_lit import generate_blocks
from dllm_lit.data import encode_prompt
from dllm_lit.models import load_model, load_tokenizer
from dllm_lit.prompt_cache import PromptCache

QUESTIONS = [
    "What does the lossless mode guarantee?",
    "And how many tokens per forward does the demo reach?",
    "Which backends are there?",
    "How do I serve the model over HTTP?",
    "What does the draft adapter do?",
    "Summarise all of that in one sentence.",
    "Thanks. What should I read next?",
    "Is there a terminal chat?",
]


def timed_answer(model, tokenizer, ids: list[int], settings: dict, cache: PromptCache | None):
    """``(seconds to the first commit, seconds in all, tokens, reused prompt tokens)`` of one answer."""
    start, first = time.perf_counter(), []

    def on_commit(row, new_ids, result) -> bool:
        if new_ids and not first:
            first.append(time.perf_counter() - start)
        return False

    result = generate_blocks(
        model,
        torch.tensor([ids]),
        eos_token_id=tokenizer.eos_token_id,
        on_commit=on_commit,
        prompt_cache=cache,
        **settings,
    )
    row = result.rows[0]
    return (first or [time.perf_counter() - start])[0], time.perf_counter() - start, row.token_ids, row.cached_tokens


def conversation(model, tokenizer, system: str, turns: int, settings: dict) -> list[list[int]]:
    """Each turn's prompt ids, the answers decoded without a cache."""
    messages, prompts = [{"role": "system", "content": system}], []
    for question in (QUESTIONS * turns)[:turns]:
        messages.append({"role": "user", "content": question})
        prompts.append(encode_prompt(tokenizer, {"messages": messages}, use_chat_template=True))
        tokens = timed_answer(model, tokenizer, prompts[-1], settings, None)[2]
        messages.append({"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)})
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-fast")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--refine-iter", type=int, help="block mode with this refine_iter (default: lossless mode)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    system = tokenizer.decode(tokenizer(readme)["input_ids"][: args.system_tokens], skip_special_tokens=True)
    settings = {"lossless": True, "add_eos_length": 7, "max_new_tokens": args.max_new_tokens, "max_length": 8192}
    if args.refine_iter:
        settings |= {"lossless": False, "refine_iter": args.refine_iter}
    prompts = conversation(model, tokenizer, system, args.turns, settings)
    runs = {turn: {"plain": [], "cached": [], "reused": 0, "equal": True} for turn in range(args.turns)}
    for repeat in range(args.repeats):
        cache = PromptCache(1 << 30)
        for turn, ids in enumerate(prompts):
            order = ("plain", "cached") if (repeat + turn) % 2 == 0 else ("cached", "plain")
            answers = {}
            for kind in order:
                first, total, tokens, reused = timed_answer(
                    model, tokenizer, ids, settings, cache if kind == "cached" else None
                )
                runs[turn][kind].append((first, total))
                answers[kind] = tokens
                runs[turn]["reused"] = reused if kind == "cached" else runs[turn]["reused"]
            runs[turn]["equal"] &= answers["plain"] == answers["cached"]
    print(f"`python {shlex.join(['benchmarks/bench_prompt_cache.py', *sys.argv[1:]])}`")
    mode = f"block mode R={args.refine_iter}" if args.refine_iter else "lossless mode"
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, model {args.model}, {mode}\n"
    )
    print(
        "| turn | prompt tokens | reused | first token s (no cache) | first token s (cache) | ratio "
        "| answer s (no cache) | answer s (cache) | ratio | answers equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for turn, ids in enumerate(prompts):
        plain = [statistics.median(column) for column in zip(*runs[turn]["plain"])]
        cached = [statistics.median(column) for column in zip(*runs[turn]["cached"])]
        print(
            f"| {turn + 1} | {len(ids)} | {runs[turn]['reused']} | {plain[0]:.3f} | {cached[0]:.3f} "
            f"| {plain[0] / cached[0]:.2f}x | {plain[1]:.2f} | {cached[1]:.2f} | {plain[1] / cached[1]:.2f}x "
            f"| {'yes' if runs[turn]['equal'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
