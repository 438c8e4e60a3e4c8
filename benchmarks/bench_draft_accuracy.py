"""How far ahead a model guesses right from fill tokens: draft accuracy by offset in the block.

    python benchmarks/bench_draft_accuracy.py smollm2 outputs/smollm2-fast --rows 48

For each model (an alias, adapter or HF directory), one forward under ``noise_layout: blocks``'
block-causal mask reads held-out rows (their responses are the base model's greedy answers) cut into
blocks of ``--block-size`` positions, each an opening token then fills, after a clean prefix: what a
decoding pass sees. Offset k is the k-th position of a block: offset 0 is the plain next-token
prediction, offset 1 guesses the token after next from one fill, and so on. A lossless window
accepts drafted tokens while they are right, so these numbers bound its tokens per forward; this is
a quicker read than decoding, and it compares training recipes at equal steps.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dllm_lit.data import RightPadCollator, SFTDataset, read_rows
from dllm_lit.models import load_model, load_tokenizer
from dllm_lit.training import attention_bias, block_causal_mask, block_starts, drafted_positions, read_blocks


def accuracy_by_offset(model, batch: dict, fill_id: int, block_size: int, offsets: int) -> list[float]:
    """Greedy accuracy against the rows' responses at offsets ``0..offsets-1`` of each block."""
    ids, response = batch["input_ids"], batch["response_mask"]
    length = ids.shape[1]
    positions = torch.arange(length)
    starts = block_starts(response, block_size, torch.Generator().manual_seed(0))
    block = torch.where(drafted_positions(response, starts), torch.full_like(ids, fill_id), ids)
    with torch.no_grad():
        mask = attention_bias(model, block_causal_mask(starts))
        logits = read_blocks(model, ids, block, mask, logits_to_keep=length).logits
    right = logits.argmax(-1)[:, :-1] == ids[:, 1:]
    scored, offset = response[:, 1:], (positions - starts)[:, :-1]
    return [right[scored & (offset == k)].float().mean().item() for k in range(offsets)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="aliases, adapter or HF directories")
    parser.add_argument("--prompts", default="examples/smollm2_distill/val.jsonl")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--offsets", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    tokenizer = load_tokenizer("smollm2")
    rows = read_rows(args.prompts)[: args.rows]
    data = SFTDataset(
        rows, tokenizer, use_chat_template=True, max_length=args.max_length, truncation="right", source=""
    )
    batch = RightPadCollator(tokenizer.eos_token_id)([data[i] for i in range(len(data))])
    print(f"\n`python benchmarks/bench_draft_accuracy.py {' '.join(sys.argv[1:])}`\n")
    print("| model | " + " | ".join(f"offset {k}" for k in range(args.offsets)) + " |")
    print("|---|" + "---|" * args.offsets)
    for name in args.models:
        model = load_model(name).eval()
        found = accuracy_by_offset(model, batch, tokenizer.eos_token_id, args.block_size, args.offsets)
        print(f"| {name} | " + " | ".join(f"{100 * a:.1f} %" for a in found) + " |")


if __name__ == "__main__":
    main()
