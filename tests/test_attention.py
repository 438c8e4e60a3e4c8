"""Grouped-head attention without copied K/V equals transformers' own SDPA path."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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


def test_the_model_gets_its_own_attention_back():
    model = tiny_llama(96, kv_heads=2)
    own = model.config._attn_implementation
    with pytest.raises(RuntimeError), grouped_attention(model):
        assert model.config._attn_implementation == NAME
        raise RuntimeError
    assert model.config._attn_implementation == own
