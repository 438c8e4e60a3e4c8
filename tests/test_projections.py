"""Sibling projections (q/k/v, gate/up) as one product each: the model's own logits, no memory added,
weights that still train, save and reload, and only plain linear layers fused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama import modeling_llama

from conftest import VOCAB, OpCounts
from dllm_lit import projections
from dllm_lit.tiny import tiny_llama

IDS = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2's q/k/v projections have biases."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_(0, 0.3)
    return model


MODELS = {"llama": lambda: tiny_llama(VOCAB, kv_heads=2, initializer_range=0.3), "qwen2": tiny_qwen2}


def storages(model: torch.nn.Module) -> int:
    """Bytes held by the distinct storages of the model's parameters."""
    seen = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(seen.values())


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9), (1, 1), (3, 1), (1, 5)])  # an axis of one has any stride
def test_fused_projections_give_the_models_own_logits(name, dtype, shape):
    model = MODELS[name]().to(dtype)
    size, ids = storages(model), IDS[: shape[0], : shape[1]]
    with torch.inference_mode():
        with OpCounts() as own_ops:
            own = model(input_ids=ids).logits
        groups = projections.fuse_weights(model)
        with OpCounts() as fused_ops, projections.fused_projections(model):
            ours = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    layers = model.config.num_hidden_layers
    assert len(groups) == 2 * layers
    assert (fused_ops.counts["linear"], own_ops.counts["linear"]) == (
        4 * layers + 1,
        7 * layers + 1,
    )  # +1: the output head
    # q and k rotated at once, rotate_half's neg moved into sin (once a pass)
    assert (fused_ops.counts["neg"], own_ops.counts["neg"]) == (1, 2 * layers)
    assert own_ops.counts["cat"] - fused_ops.counts["cat"] == layers - 1
    assert torch.equal(ours, own) and torch.equal(again, own)
    assert storages(model) == size  # the modules' weights are views of the fused matrices
    assert not any("forward" in vars(m) for m in model.modules())
    assert modeling_llama.apply_rotary_pos_emb is projections.modeling_llama.apply_rotary_pos_emb


def test_fused_weights_still_train_save_and_reload(tmp_path):
    model = tiny_llama(VOCAB, kv_heads=2, initializer_range=0.3)
    projections.fuse_weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(input_ids=IDS).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.inference_mode():
        trained = model(input_ids=IDS).logits
        with projections.fused_projections(model):  # the fused matrices hold the updated weights
            assert torch.equal(model(input_ids=IDS).logits, trained)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=IDS).logits, trained)


def test_weights_replaced_since_are_fused_again():
    model = tiny_llama(VOCAB, kv_heads=2, initializer_range=0.3)
    first = projections.fuse_weights(model)
    assert projections.fuse_weights(model) is first  # laid out once
    model.to(torch.bfloat16)  # new tensors: the old matrices no longer hold the weights
    with torch.inference_mode():
        own = model(input_ids=IDS).logits
        with projections.fused_projections(model):
            assert torch.equal(model(input_ids=IDS).logits, own)
    assert projections.fuse_weights(model) is not first
    groups = projections.fuse_weights(model)
    attention = model.model.layers[0].self_attn
    attention.k_proj.weight = torch.nn.Parameter(attention.k_proj.weight.clone())  # one weight replaced
    again = projections.fuse_weights(model)
    assert again[0] is not groups[0] and again[1:] == groups[1:]  # only its group is laid out again
    assert attention.k_proj.weight.untyped_storage().data_ptr() == attention.q_proj.weight.untyped_storage().data_ptr()


def test_only_plain_linear_layers_that_own_their_weights_are_fused():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(VOCAB, kv_heads=2, initializer_range=0.3)
    layers = model.model.layers
    layers[0].mlp.up_proj.register_forward_hook(lambda *args: None)  # hooks must run: left alone
    with torch.no_grad():  # a weight that is a view of a larger tensor (sharded, offloaded): left alone
        layers[1].self_attn.v_proj.weight.data = torch.zeros(2, *layers[1].self_attn.v_proj.weight.shape)[0]
    fused = [[m for m in group.members] for group in projections.fuse_weights(model)]
    attention, mlp = layers[0].self_attn, layers[1].mlp
    assert fused == [[attention.q_proj, attention.k_proj, attention.v_proj], [mlp.gate_proj, mlp.up_proj]]
    lora = get_peft_model(tiny_llama(VOCAB, kv_heads=2), LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    assert projections.fuse_weights(lora) == []  # a LoRA layer in each group
