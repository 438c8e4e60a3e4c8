"""Attention for the compiled path's fixed-shape forwards: grouped heads without copying K/V.

With an explicit mask, transformers' SDPA path copies every K/V head once per query head of its group
(``repeat_kv``), because PyTorch's fused kernels take ``enable_gqa`` only without a mask. Here the query
heads of a group are stacked along the sequence axis instead (``[batch, kv_heads, group * q_len,
head_dim]``) and the mask is repeated to match, so each K/V head is read once by one SDPA call: the
same products, on any SDPA kernel; the repeated mask is made once a pass, not once a layer.
:class:`~dllm_lit.compiled.StaticForward` selects it for its own forwards only (:func:`grouped_attention`);
every other forward of the model keeps its implementation.
:func:`attention_bias` turns a boolean 4D mask into what SDPA or eager attention takes (the training
blocks and the lossless draft branch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "dllm_lit_grouped_sdpa"


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Masked attention for ``query [b, h, q, d]`` over ``key``/``value [b, kv, s, d]`` (``h = g * kv``).

    Anything this does not cover (no grouping, no mask, dropout, soft-capping, attention sinks) goes to
    transformers' own SDPA function unchanged.
    """
    group = query.shape[1] // key.shape[1]
    special = dropout > 0 or any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "position_bias"))
    if group == 1 or attention_mask is None or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, length, dim = query.shape
    stacked = query.reshape(batch, key.shape[1], group * length, dim)  # head kv*g + j -> rows j*q ..
    mask = stacked_mask(attention_mask, group, key.shape[2])
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


class PassMemo:
    """The last tensor made from a ``source`` tensor (by identity) and a few settings. Every layer of
    a pass gets the same mask and the same rotary sin, so what is derived from them is made once a
    pass; :meth:`clear` when the block that swaps in its user ends (the kept tensors go with it)."""

    def __init__(self):
        self.last: tuple | None = None  # (source, settings, made)

    def get(self, source: torch.Tensor, make: Callable[[], torch.Tensor], *settings) -> torch.Tensor:
        if self.last is not None and self.last[0] is source and self.last[1] == settings:
            return self.last[2]
        made = make()
        self.last = (source, settings, made)
        return made

    def clear(self) -> None:
        self.last = None


_STACKED_MASKS = PassMemo()


def stacked_mask(attention_mask: torch.Tensor, group: int, slots: int) -> torch.Tensor:
    """``attention_mask`` cut to ``slots`` columns and repeated for ``group`` stacked query heads, once
    a pass (a copy per layer otherwise; under ``torch.compile``, which would guard on the kept one,
    once per layer)."""

    def make() -> torch.Tensor:
        return attention_mask[:, :, :, :slots].repeat(1, 1, group, 1)

    return make() if torch.compiler.is_compiling() else _STACKED_MASKS.get(attention_mask, make, group, slots)


AttentionInterface.register(NAME, grouped_sdpa)


@contextmanager
def grouped_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention through :func:`grouped_sdpa` inside the block (a graph capture or a
    compiled trace keeps it), and restore the model's own implementation after."""
    config = model.config
    own = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = own
        _STACKED_MASKS.clear()


def attention_bias(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """``allowed`` as the 4D mask ``model``'s attention takes: boolean for SDPA, additive for eager."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if implementation == "sdpa":
        return allowed
    if implementation != "eager":
        raise ValueError(f"A 4D attention mask needs SDPA or eager attention, not {implementation!r}.")
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
