"""Synthetic tasks generated locally, for training and measuring block decoding on a CPU.

* ``addition``: multi-digit addition written least significant digit first, so each answer digit
  depends on the carry out of the digits before it (answer tokens depend on earlier answer tokens).
  ``253+967=`` -> ``1211`` (352 + 769 = 1121).
* ``reverse``: reverse a string of digits and letters; every answer token is a direct copy, so it is
  trivially parallel (a sanity row).

    python -m dllm_lit.tasks addition --out data/addition --train 20000 --val 200
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

TASKS = ("addition", "reverse")


def addition_row(rng: random.Random, min_digits: int, max_digits: int) -> dict[str, str]:
    n = rng.randint(min_digits, max_digits)
    a, b = rng.randrange(10**n), rng.randrange(10**n)
    prompt = f"{str(a).zfill(n)[::-1]}+{str(b).zfill(n)[::-1]}="
    response = str(a + b).zfill(n + 1)[::-1]
    return {"prompt": prompt, "response": response, "answer": response}


def reverse_row(rng: random.Random, min_digits: int, max_digits: int) -> dict[str, str]:
    n = rng.randint(min_digits, max_digits)
    text = "".join(rng.choice(string.digits + string.ascii_lowercase) for _ in range(n))
    return {"prompt": f"{text}>", "response": text[::-1], "answer": text[::-1]}


def make_rows(task: str, count: int, *, seed: int, min_digits: int = 5, max_digits: int = 5) -> list[dict[str, str]]:
    """``count`` rows of ``task``, reproducible from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}.")
    make = addition_row if task == "addition" else reverse_row
    rng = random.Random(f"{task}-{seed}")
    return [make(rng, min_digits, max_digits) for _ in range(count)]


def write_task(task: str, out: str | Path, *, train: int, val: int, seed: int = 0, **digits) -> Path:
    """Write ``train.jsonl`` and ``val.jsonl`` (disjoint seeds) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count, split_seed in (("train", train, seed), ("val", val, seed + 1)):
        with (out / f"{name}.jsonl").open("w") as f:
            for row in make_rows(task, count, seed=split_seed, **digits):
                f.write(json.dumps(row) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_lit.tasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_digits", type=int, default=5)
    parser.add_argument("--max_digits", type=int, default=5)
    args = parser.parse_args(argv)
    path = write_task(
        args.task,
        args.out,
        train=args.train,
        val=args.val,
        seed=args.seed,
        min_digits=args.min_digits,
        max_digits=args.max_digits,
    )
    print(f"wrote {path / 'train.jsonl'} and {path / 'val.jsonl'}")


if __name__ == "__main__":
    main()
