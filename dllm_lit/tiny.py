"""Tiny models built locally: a character tokenizer and a small Llama, for tests and toy tasks.

Nothing here is downloaded: the tokenizer is assembled with ``tokenizers`` and the model is
randomly initialised from a config.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (  # enable_thinking: a template variable, as Qwen3's (chat_template_kwargs)
    "{{ bos_token }}{% if enable_thinking is defined and not enable_thinking %}<|system|>/no_think\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(alphabet: str = string.printable) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet``, plus specials; adds BOS and has a chat template."""
    chars = sorted(set(alphabet))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    # Fuse joins the characters; in a sentencepiece-style sequence, so that llguidance reads the vocabulary.
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    max_positions: int = 1024,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small random Llama in eval mode (pad 0, BOS 1, EOS 2, as in :func:`char_tokenizer`).

    ``intermediate_size`` defaults to 4x ``hidden_size`` and ``kv_heads`` to ``heads``. Tests use
    a wide ``initializer_range`` (0.3) so that argmaxes are far from ties.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """A small random GPT-2 (learned absolute positions) in eval mode, same special ids as :func:`tiny_llama`."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=layers,
        n_head=heads,
        n_positions=max_positions,
        initializer_range=initializer_range,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


def save_tiny_model(directory: str | Path, **kwargs) -> Path:
    """Save a random tiny Llama and the character tokenizer as an HF directory."""
    directory = Path(directory)
    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer), **kwargs).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
