"""RMSNorm as one call for the compiled path's fixed-shape forwards.

transformers' Llama-style RMSNorm is eight small kernels (cast, square, mean, add, rsqrt, multiply,
cast, multiply by the weight); in a replayed CUDA graph each still costs a few microseconds, and an
8B forward has 65 of them. ``torch.nn.functional.rms_norm`` normalises in one call (on CUDA one fused
kernel; on a CPU the same operations, so the same bits): one call in float32, two in bf16, where
the rounding to bf16 before the weight is kept as Llama does it. :func:`fused_norms` swaps it in
for the modules whose forward is exactly Llama's (Mistral, Qwen2/3, Phi-3, SmolLM3, ... share it),
only around :class:`~dllm_lit.compiled.StaticForward`'s own passes; every other forward keeps the
model's code.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm


@functools.cache
def _llama_source() -> str:
    return inspect.getsource(LlamaRMSNorm.forward)


@functools.cache
def is_llama_rms_norm(cls: type) -> bool:
    """Whether ``cls.forward`` is, to the letter, transformers' LlamaRMSNorm forward."""
    try:
        return inspect.getsource(cls.forward) == _llama_source()
    except (OSError, TypeError):
        return False


def _fused_forward(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's arithmetic: normalise in float32, round to the input's dtype, then scale (``F.rms_norm``
    computes a bf16 or fp16 input in float32 and rounds its output once)."""
    weight, eps = module.weight, module.variance_epsilon
    if hidden_states.dtype == weight.dtype == torch.float32:
        return F.rms_norm(hidden_states, weight.shape, weight, eps)
    return weight * F.rms_norm(hidden_states, weight.shape, eps=eps)


@contextmanager
def fused_norms(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run ``model``'s Llama-style RMSNorms through ``F.rms_norm`` inside the block (a graph captured
    there keeps it), and restore their own forward after. Not for ``torch.compile``: the swap is made
    anew on each entry, which its guards would see as a new function."""
    norms = [m for m in model.modules() if is_llama_rms_norm(type(m))] if enabled else []
    for module in norms:
        module.forward = functools.partial(_fused_forward, module)
    try:
        yield
    finally:
        for module in norms:
            del module.forward
