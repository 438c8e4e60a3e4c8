"""Tiny random causal LMs in fp32 for CPU logic tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 96
EOS = 2


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (RoPE) with a wide init so argmaxes are far from ties."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (learned absolute positions) with a wide init."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        initializer_range=0.3,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(MODELS), scope="module")
def model(request):
    return MODELS[request.param]()


def random_prompts(lengths, seed: int = 0, low: int = 3) -> list[list[int]]:
    """Prompts of the given lengths with ids that avoid EOS/BOS/PAD."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, VOCAB, (n,), generator=g).tolist() for n in lengths]


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama with the character tokenizer, saved as an HF directory."""
    from dllm_lit.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny"), initializer_range=0.3))
