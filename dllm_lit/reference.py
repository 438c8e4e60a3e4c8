"""The reference loop: the original research script's decoding, written plainly.

No cache, no early exit, no left padding, every pass over the whole sequence. Tests use it as an
oracle for the engine and benchmarks as the baseline the engine is measured against.
"""

from __future__ import annotations

import torch

from dllm_lit.ledger import StopReason


@torch.inference_mode()
def reference_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    eos: int,
    add_eos_length: int,
    refine_iter: int,
    max_new_tokens: int,
    stop_at_eos: bool = True,
) -> tuple[list[tuple[list[int], StopReason]], int]:
    """Decode ``input_ids`` (``[batch, prompt_len]``, no padding) block by block.

    Returns, per row, the generated ids before its first EOS with ``"eos"`` (or the first
    ``max_new_tokens`` ids with ``"max_new_tokens"``; always so when ``stop_at_eos`` is false), and
    the number of forward passes. The loop ends when every row has an EOS or the budget is spent.
    """
    seq, forwards = input_ids, 0
    start = input_ids.shape[1]
    while seq.shape[1] - start < max_new_tokens:
        pre = seq.shape[1]
        x = torch.cat([seq, torch.full((seq.shape[0], add_eos_length), eos, device=seq.device)], dim=1)
        for _ in range(refine_iter):
            block = model(x).logits[:, pre - 1 :].argmax(-1)
            forwards += 1
            x = torch.cat([seq, block[:, :-1]], dim=1)
        seq = torch.cat([seq, block], dim=1)
        if stop_at_eos and bool((seq[:, start:] == eos).any(1).all()):
            break
    return [_cut(row, eos, max_new_tokens, stop_at_eos) for row in seq[:, start:].tolist()], forwards


def _cut(generated: list[int], eos: int, max_new_tokens: int, stop_at_eos: bool) -> tuple[list[int], StopReason]:
    if stop_at_eos and eos in generated[:max_new_tokens]:
        return generated[: generated.index(eos)], "eos"
    return generated[:max_new_tokens], "max_new_tokens"
