"""Predicted Outputs on a code edit: forwards and seconds with and without the prediction.

    python benchmarks/bench_predicted.py                      # smollm2, lossless W8, eager and cuda_graph
    python benchmarks/bench_predicted.py --repeats 5 --backends eager

The model is asked to rename a function in a block of code and is given the code itself as the
prediction (what OpenAI's Predicted Outputs are for: most of the answer repeats the code, the renamed
places do not). Each backend decodes the request with and without the prediction, side by side
(alternating which goes first), ``--repeats`` times. The table gives the answer's tokens, the
forwards and tokens per forward, the median seconds, the speed-up, and whether the answers are equal
(they must be: the prediction only drafts).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dllm_lit import generate_blocks
from dllm_lit.data import encode_prompt
from dllm_lit.models import load_model, load_tokenizer

CODE = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b


def total(values):
    """Add up a list of numbers with add."""
    result = 0
    for value in values:
        result = add(result, value)
    return result


if __name__ == "__main__":
    print(total([1, 2, 3]))
'''

ASK = "Rename the function `add` to `plus` everywhere in this code. Reply with the whole code only.\n\n"


def answer(model, tokenizer, ids: list[int], settings: dict, prediction: list[int] | None):
    """``(seconds, token ids, forwards)`` of one answer."""
    start = time.perf_counter()
    result = generate_blocks(
        model, torch.tensor([ids]), eos_token_id=tokenizer.eos_token_id, row_predictions=[prediction], **settings
    )
    row = result.rows[0]
    return time.perf_counter() - start, row.ids_with_stop, result.forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--backends", nargs="+", default=["eager", "cuda_graph"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model).eval()
    messages = [{"role": "user", "content": ASK + "```python\n" + CODE + "```"}]
    ids = encode_prompt(tokenizer, {"messages": messages}, use_chat_template=True)
    prediction = tokenizer("```python\n" + CODE + "```", add_special_tokens=False)["input_ids"]
    rows = []
    for backend in args.backends:
        settings = {"lossless": True, "add_eos_length": 7, "max_new_tokens": args.max_new_tokens, "backend": backend}
        runs = {"plain": [], "predicted": []}
        for repeat in range(args.repeats):
            for kind in ("plain", "predicted") if repeat % 2 == 0 else ("predicted", "plain"):
                runs[kind].append(answer(model, tokenizer, ids, settings, prediction if kind == "predicted" else None))
        rows.append((backend, runs))
    print(f"`python {shlex.join(['benchmarks/bench_predicted.py', *sys.argv[1:]])}`")
    print(f"\n{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, model {args.model}, fp32\n")
    print("| backend | prediction | answer tokens | forwards | tokens/forward | seconds | speed-up | answers equal |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, runs in rows:
        plain_s = statistics.median(seconds for seconds, _, _ in runs["plain"])
        equal = all(tokens == runs["plain"][0][1] for _, tokens, _ in runs["plain"] + runs["predicted"])
        for kind, found in runs.items():
            seconds, tokens, forwards = statistics.median(s for s, _, _ in found), found[0][1], found[0][2]
            print(
                f"| {backend} | {'yes' if kind == 'predicted' else 'no'} | {len(tokens)} | {forwards} "
                f"| {len(tokens) / forwards:.2f} | {seconds:.2f} | {plain_s / seconds:.2f}x "
                f"| {'yes' if equal else 'NO'} |"
            )
    print("\nThe answer:\n\n```\n" + tokenizer.decode(runs["plain"][0][1], skip_special_tokens=True) + "\n```")


if __name__ == "__main__":
    main()
