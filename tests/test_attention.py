"""Grouped-head attention without copied K/V equals transformers' own SDPA path."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import OpCounts
from dllm_lit.attention import NAME, grouped_attention, grouped_sdpa
from dllm_lit.tiny import tiny_llama


class Heads(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (8, 1), (4, 4)])
def test_grouped_sdpa_equals_transformers_sdpa(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    batch, length, slots, dim = 2, 5, 13, 8
    query = torch.randn(batch, heads, length, dim, generator=g)
    key, value = (torch.randn(batch, kv_heads, slots, dim, generator=g) for _ in range(2))
    see = torch.rand(batch, 1, length, slots, generator=g) < 0.6
    see[..., 0] = True
    mask = torch.zeros(see.shape).masked_fill_(~see, torch.finfo(torch.float32).min)
    module = Heads(heads // kv_heads)
    ours, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (batch, length, heads, dim)
    torch.testing.assert_close(ours, theirs)


def test_a_pass_repeats_its_mask_once_for_all_layers():
    """Every layer of a pass gets the same mask object: it is repeated for the stacked heads once."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 3, 8, generator=g)
    key, value = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(2))
    mask = torch.zeros(1, 1, 3, 6).masked_fill_(torch.rand(1, 1, 3, 6, generator=g) < 0.4, -1e9)
    mask[..., 0] = 0
    module, model = Heads(2), tiny_llama(96, kv_heads=2)
    with grouped_attention(model), OpCounts() as ops:
        outputs = [grouped_sdpa(module, q, key, value, m)[0] for q, m in ((query, mask), (-query, mask))]
        outputs.append(grouped_sdpa(module, query, key, value, mask.clone())[0])  # the next pass's mask
    assert ops.counts["repeat"] == 2
    for q, out in zip((query, -query, query), outputs):
        torch.testing.assert_close(out, sdpa_attention_forward(module, q, key, value, mask)[0])


def test_the_model_gets_its_own_attention_back():
    model = tiny_llama(96, kv_heads=2)
    own = model.config._attn_implementation
    with pytest.raises(RuntimeError), grouped_attention(model):
        assert model.config._attn_implementation == NAME
        raise RuntimeError
    assert model.config._attn_implementation == own
