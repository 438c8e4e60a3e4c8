"""Does iterative refine training buy tokens per forward? Plain SFT vs refine, same budget, on CPU.

For each synthetic task (``dllm_lit.tasks``), trains the ``tiny-char`` model twice with the same
steps, batch and learning rate:

* plain SFT: ``num_iterations=1``, no noise;
* iterative refine: ``num_iterations=2``, noise fraction ``t ~ U[0, 1]`` scattered over the response;
* refine, blocks: ``num_iterations=2``, ``noise_layout="blocks"`` (blocks of 16 after a clean prefix,
  as decoding sees them; a window of W <= 16 sees the first W positions of such a block);

then decodes the held-out set one prompt at a time (so tokens per forward is per prompt, not
inflated or deflated by batching) with autoregressive decoding and several block settings, and
prints accuracy (exact final answer) and tokens per forward.

    python benchmarks/train_tiny.py --steps 800 --tasks addition reverse
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import torch

from dllm_lit.answers import is_correct
from dllm_lit.data import DataModule, read_rows
from dllm_lit.decoding import generate_blocks
from dllm_lit.models import TINY_MODEL
from dllm_lit.module import BlockRefineLM
from dllm_lit.tasks import write_task

VARIANTS = {
    "plain SFT": dict(num_iterations=1, noise_min=0.0, noise_max=0.0),
    "iterative refine": dict(num_iterations=2, noise_min=0.0, noise_max=1.0),
    "refine, blocks": dict(num_iterations=2, noise_layout="blocks", add_eos_length=15),
}
SETTINGS = ["1:1", "4:1", "4:2", "8:1", "8:2", "16:1", "16:2", "16:3", "16:16", "16:lossless"]


def train(variant: dict, train_file: str, args) -> tuple[BlockRefineLM, float]:
    L.seed_everything(args.seed, verbose=False)
    module = BlockRefineLM(
        model_name_or_path=TINY_MODEL, max_length=64, learning_rate=args.lr, warmup_steps=args.steps // 20, **variant
    )
    data = DataModule(train_file=train_file, batch_size=args.batch_size, max_length=64, model_name_or_path=TINY_MODEL)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return module.eval(), time.perf_counter() - start


def evaluate(module: BlockRefineLM, rows: list[dict], setting: str, max_new_tokens: int) -> tuple[float, float]:
    """(accuracy in %, mean tokens per forward) over ``rows``, one prompt at a time.
    ``setting`` is ``WIDTH:REFINE_ITER`` (block mode) or ``WIDTH:lossless``."""
    width, mode = setting.split(":")
    decoding = dict(lossless=True) if mode == "lossless" else dict(refine_iter=int(mode))
    tokenizer, correct, tpf = module.tokenizer, 0, 0.0
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt").input_ids
        out = generate_blocks(
            module.model,
            ids,
            eos_token_id=tokenizer.eos_token_id,
            add_eos_length=int(width) - 1,
            max_new_tokens=max_new_tokens,
            **decoding,
        ).rows[0]
        correct += is_correct(tokenizer.decode(out.token_ids, skip_special_tokens=True), row["answer"])
        tpf += out.tokens_per_forward
    return 100 * correct / len(rows), tpf / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["addition", "reverse"])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-rows", type=int, default=50000)
    parser.add_argument("--val-rows", type=int, default=300)
    parser.add_argument(
        "--settings", nargs="+", default=SETTINGS, help="WIDTH:REFINE_ITER or WIDTH:lossless; 1:1 is autoregressive"
    )
    parser.add_argument("--min-digits", type=int, default=5)
    parser.add_argument("--max-digits", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="which training objectives to compare",
    )
    args = parser.parse_args()

    print(f"\n`{' '.join(sys.argv)}`  ")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            folder = write_task(
                task,
                os.path.join(tmp, task),
                train=args.train_rows,
                val=args.val_rows,
                seed=args.seed,
                min_digits=args.min_digits,
                max_digits=args.max_digits,
            )
            val_rows = read_rows(folder / "val.jsonl")
            results = {}
            variants = {name: VARIANTS[name] for name in args.variants}
            for name, variant in variants.items():
                module, seconds = train(variant, str(folder / "train.jsonl"), args)
                print(f"[{task}] {name}: trained {args.steps} steps in {seconds:.0f}s", file=sys.stderr, flush=True)
                for setting in args.settings:
                    results[name, setting] = evaluate(module, val_rows, setting, args.max_new_tokens)
            print(f"**{task}** ({len(val_rows)} held-out prompts, {args.steps} steps x batch {args.batch_size})\n")
            print("| decoding | " + " | ".join(f"{n} acc % | {n} tok/fwd" for n in variants) + " |")
            print("|---|" + "---|---|" * len(variants))
            for setting in args.settings:
                width, refine_iter = setting.split(":")
                label = "autoregressive" if setting == "1:1" else f"block {width}, refine {refine_iter}"
                if refine_iter == "lossless":
                    label = f"lossless, window {width}"
                cells = " | ".join(f"{results[n, setting][0]:.1f} | {results[n, setting][1]:.2f}" for n in variants)
                print(f"| {label} | {cells} |")
            print(flush=True)


if __name__ == "__main__":
    main()
