"""Llama-style RMSNorm as one ``F.rms_norm`` call: the same outputs, only where the code is Llama's."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from dllm_lit import norms
from dllm_lit.tiny import tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_give_the_models_own_logits(dtype, monkeypatch):
    model = tiny_llama(96, kv_heads=2).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    calls = []
    fused = norms.F.rms_norm
    monkeypatch.setattr(norms.F, "rms_norm", lambda *a, **k: calls.append(1) or fused(*a, **k))
    with torch.no_grad():
        own = model(input_ids=ids).logits
        with norms.fused_norms(model):
            ours = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers + 1  # two per layer and the final norm, inside the block only
    assert torch.equal(ours, own) and torch.equal(again, own)
    assert not any("forward" in vars(m) for m in model.modules())


def test_only_norms_with_llamas_code_are_swapped():
    assert norms.is_llama_rms_norm(LlamaRMSNorm) and norms.is_llama_rms_norm(Qwen2RMSNorm)
    assert not norms.is_llama_rms_norm(GemmaRMSNorm)  # (1 + weight): other arithmetic
    model = torch.nn.Sequential(GemmaRMSNorm(8), LlamaRMSNorm(8))
    with norms.fused_norms(model):
        assert "forward" not in vars(model[0]) and "forward" in vars(model[1])
    with norms.fused_norms(model, enabled=False):
        assert "forward" not in vars(model[1])
