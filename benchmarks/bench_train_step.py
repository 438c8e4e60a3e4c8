"""Time one LoRA training step of `dllm_lit fit`'s objective (issue 13), three ways side by side.

    python benchmarks/bench_train_step.py                        # the launch-bound proxy, CPU
    python benchmarks/bench_train_step.py --shape smollm2 --device cuda --dtype bfloat16

A step is the iterative-refine rounds plus the autoregressive loss, backward, AdamW. "stacked" is what
`fit` runs with scattered noise (the clean rows share round 0's forward: 2 passes for 2 rounds);
"separate" is the earlier step (a third forward for the clean rows); "blocks" is `noise_layout:
blocks` (round 0 reads the clean and the noised copy, twice as long, under a block-causal mask; round 1
reads a new noised copy against round 0's cached clean copy); "blocks-reread" is blocks as it was before
that cache (round 1 reads both copies again), as a model with gradient checkpointing still runs it;
"draft" is ``draft_adapter: true`` (the base reads the clean copy without gradients, the adapter the
noised copies; no autoregressive loss).
``--shape narrow`` keeps SmolLM2's 30 layers and LoRA on every linear layer but makes each layer tiny,
so the time is the per-operation overhead that bounds a 135M model on a GPU; ``--shape smollm2`` is
the real size (random weights). Prints ms per step, rows per second and operators dispatched per
step, for each batch size.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from timing import timed
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from dllm_lit.adapters import add_lora
from dllm_lit.training import block_refine_losses, iterative_refine_losses, response_cross_entropy

SMOLLM2 = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
LAYOUTS = ("separate", "stacked", "blocks", "blocks-reread", "draft")
SHAPES = {
    "narrow": dict(SMOLLM2, hidden_size=72, intermediate_size=144, vocab_size=512),
    "smollm2": dict(SMOLLM2, hidden_size=576, intermediate_size=1536, vocab_size=49152),
}


class CountOps(TorchDispatchMode):
    """Counts the operators dispatched (each one a kernel launch or more on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def step(model, optimizer, ids, mask, layout: str) -> None:
    """One training step: rounds + autoregressive loss, backward, optimizer."""
    rounds = dict(fill_id=0, num_iterations=2, clean_logits=layout not in ("separate", "draft"))
    if layout == "draft":
        losses, clean = block_refine_losses(model, ids, mask, block_size=16, clean_by_base=True, **rounds)
        sum(losses).backward()
    elif layout.startswith("blocks"):
        # The flag that makes block_refine_losses skip the cache, set on the inner model, where it checkpoints nothing.
        model.get_base_model().model.gradient_checkpointing = layout == "blocks-reread"
        losses, clean = block_refine_losses(model, ids, mask, block_size=16, **rounds)
    else:
        losses, clean = iterative_refine_losses(model, ids, mask, **rounds)
    if layout != "draft":
        clean = model(input_ids=ids).logits if layout == "separate" else clean
        (sum(losses) + response_cross_entropy(clean, ids, mask)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model, optimizer, ids, mask, layout: str, repeats: int, autocast) -> tuple[float, int, float]:
    """``(median seconds, operators, peak GiB on CUDA)`` of one layout's step."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with autocast:
        step(model, optimizer, ids, mask, layout)  # warm-up
        counter = CountOps()
        with counter:
            step(model, optimizer, ids, mask, layout)
        seconds, _ = timed(lambda: step(model, optimizer, ids, mask, layout), repeats, device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, counter.count, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="narrow")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="autocast dtype on CUDA (bfloat16), else float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--prompt", type=int, help="prompt tokens per row (default: half the row)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).to(device)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model = add_lora(model, 8, 16, 0.0, base_name="random")
    if args.checkpointing:
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")
    print(f"`python benchmarks/bench_train_step.py {' '.join(sys.argv[1:])}`")
    threads = torch.get_num_threads()
    prompt = args.length // 2 if args.prompt is None else args.prompt
    print(f"torch {torch.__version__}, {threads} threads, rows of {args.length} tokens ({prompt} prompt), ", end="")
    print(f"median of {args.repeats}\n")
    print("| batch | step | ms/step | rows/s | operators/step | speed vs first | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        ids = torch.randint(1, SHAPES[args.shape]["vocab_size"], (batch, args.length), device=device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, prompt:] = True
        first = None
        for layout in args.layouts:
            try:
                seconds, operators, peak = measure(model, optimizer, ids, mask, layout, args.repeats, autocast)
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"| {batch} | {layout} | out of memory | | | | |", flush=True)
                continue
            first = first or seconds
            ms, rate = seconds * 1e3, batch / seconds
            print(f"| {batch} | {layout} | {ms:.1f} | {rate:.1f} | {operators} | {first / seconds:.2f}x | {peak:.1f} |")


if __name__ == "__main__":
    main()
