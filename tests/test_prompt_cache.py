"""Prompt caching: reused K/V never change a token, and they are reused.

Oracles: the same calls (and `predict` runs) without a prompt cache; the tokens each forward pass is fed.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_drafter import with_drafter

from conftest import EOS, LOSSLESS_MODELS, left_pad, model_fixture, predict_args, random_prompts, write
from dllm_lit import cli, generate_blocks
from dllm_lit.prompt_cache import ADAPTER, PromptCache, model_prompt_cache, prefix_first

SHARED = random_prompts([9], seed=3)[0]
FIRST = [SHARED + tail for tail in random_prompts([4, 1, 7], seed=4)]  # three prompts, one beginning
LATER = [FIRST[0] + [5, 6], SHARED[:6] + [7], FIRST[2] + [8, 9, 10]]  # a chat's next turns, an earlier cut
SETTING = {"lossless": True, "prompt_cache_mib": 1}  # the model's own cache, 1 MiB
MODES = {
    "lossless-W1": {"lossless": True, "add_eos_length": 0},
    "lossless-W4": {"lossless": True, "add_eos_length": 3},
    "exact-blocks": {"add_eos_length": 2, "refine_iter": 3},
    "approximate-blocks": {"add_eos_length": 3, "refine_iter": 2},
}


def decode(model, prompts, cache=None, **settings):
    """Each row's tokens and reused count, and the tokens the forward passes were fed in all."""
    fed = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        ids, mask = left_pad(prompts)
        out = generate_blocks(
            model, ids, attention_mask=mask, eos_token_id=EOS, max_new_tokens=12, prompt_cache=cache, **settings
        )
    finally:
        hook.remove()
    return [(row.token_ids, row.stop_token_id) for row in out.rows], [row.cached_tokens for row in out.rows], sum(fed)


model = model_fixture(LOSSLESS_MODELS)


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_reused_prompts_decode_the_same_tokens_with_fewer_fed(model, mode, backend):
    cache = PromptCache(1 << 30)
    settings = MODES[mode] | {"backend": backend}
    for prompts in (FIRST, LATER[:1], LATER, [LATER[2]] * 2):
        plain, none, plain_fed = decode(model, prompts, **settings)
        reused, counts, fed = decode(model, prompts, cache, **settings)
        assert reused == plain and none == [0] * len(prompts)
        assert fed == plain_fed - sum(counts)
    assert counts == [len(LATER[2]) - 1] * 2, "the third call's prompt serves the fourth (its last token is fed)"
    assert cache.hits == 3
    assert_entries_are_their_tokens_keys_and_values(model, cache)


def test_a_draft_adapter_s_passes_reuse_the_base_s_prompt_keys_and_values():
    _, drafter = with_drafter("llama", 0.5)
    cache = PromptCache(1 << 30)
    for prompts in (FIRST, LATER):
        assert (
            decode(drafter, prompts, cache, **MODES["lossless-W4"])[0]
            == decode(drafter, prompts, **MODES["lossless-W4"])[0]
        )
    assert cache.reused_tokens == len(SHARED[:6]) * 3


def test_keys_and_values_of_other_weights_are_not_reused():
    model, weights = LOSSLESS_MODELS["llama"](), ["a"]
    cache = PromptCache(1 << 30, weights=lambda: weights[0])
    decode(model, FIRST, cache, lossless=True)
    weights[0] = "b"
    assert decode(model, LATER[:1], cache, lossless=True)[1] == [0]
    weights[0] = "a"
    assert decode(model, LATER[:1], cache, lossless=True)[1] == [len(FIRST[0])]


def test_the_least_recently_used_prompts_leave_first_and_longer_prompts_replace_their_beginnings():
    model = LOSSLESS_MODELS["gpt2"]()
    prompts_alone = {"add_eos_length": 0, "row_max_new_tokens": [1]}  # one-token answers, never fed
    decode(model, FIRST[:1], probe := PromptCache(1 << 30), **prompts_alone)
    per_token = probe.used_bytes // len(FIRST[0])
    cache = PromptCache(per_token * 30)
    one, two, three = random_prompts([10, 10, 12], seed=9)
    for prompt in (one, two, one + [4]):  # the third replaces the first
        decode(model, [prompt], cache, **prompts_alone)
    assert [len(tokens) for _, tokens in cache.entries] == [10, 11]
    decode(model, [one], cache, **prompts_alone)  # a stored prompt's beginning: refreshed, not stored
    decode(model, [three], cache, **prompts_alone)  # 33 tokens: the least recently used, two, leaves
    assert [len(tokens) for _, tokens in cache.entries] == [11, 12] and cache.used_bytes == 23 * per_token
    decode(model, [random_prompts([31], seed=2)[0]], cache, **prompts_alone)  # over the budget alone
    assert [len(tokens) for _, tokens in cache.entries] == [11, 12]


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_answers_are_kept_with_their_prompts_for_the_next_turn(mode, backend):
    model, settings = LOSSLESS_MODELS["llama-drafty"](), MODES[mode] | {"backend": backend}
    cache = PromptCache(1 << 30)
    answers = decode(model, FIRST, cache, **settings, row_max_new_tokens=[3, 12, 5])[0]  # the compiled batch shrinks
    assert_entries_are_their_tokens_keys_and_values(model, cache)
    for prompt, (answer, stop) in zip(FIRST, answers):
        turn = prompt + answer + [stop] * (stop is not None) + [5, 6]  # the conversation so far, then more
        tokens, counts, _ = decode(model, [turn], cache, **settings)
        assert tokens == decode(model, [turn], **settings)[0]
        unfed = 1 if settings.get("lossless") else settings["add_eos_length"] + 1  # the last token or block
        assert counts[0] >= len(prompt) + max(len(answer) - unfed, 0), "the prompt and the answer"


def assert_entries_are_their_tokens_keys_and_values(model, cache):
    """Every stored entry's K/V equal those of a plain forward over its tokens."""
    for (_, tokens), key_values in cache.entries.items():
        with torch.no_grad():
            fresh = model(torch.tensor([tokens]), use_cache=True).past_key_values
        for (keys, values), layer in zip(key_values, fresh.layers, strict=True):
            torch.testing.assert_close((keys, values), (layer.keys, layer.values), rtol=1e-4, atol=1e-5)


def test_the_shared_beginning_moves_in_front_of_the_left_padding():
    ids, mask = left_pad([[5, 6, 7, 8], [5, 6, 9]])
    moved, moved_mask = prefix_first(ids, mask, 2)
    assert moved.tolist() == [[5, 6, 7, 8], [5, 6, 0, 9]] and moved_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]


def test_the_setting_keeps_a_cache_with_the_model_emptied_when_its_weights_change():
    model, reused = LOSSLESS_MODELS["llama"](), lambda prompts: decode(model, prompts, **SETTING)[1]
    fresh = decode(model, LATER[:1], lossless=True)[0]
    assert reused(FIRST) == [0, 0, 0] and reused(LATER[:1]) == [len(FIRST[0])]
    setattr(model, ADAPTER, "sql")  # serve's adapter switch names the adapter its forwards run
    assert reused(LATER[:1]) == [0], "K/V of other weights"
    setattr(model, ADAPTER, None)
    assert reused(LATER[:1]) == [len(LATER[0]) - 1]
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # in place, as an optimizer step: the K/V stay right, the logits change
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # and these K/V are stale
    tokens, counts, _ = decode(model, LATER[:1], **SETTING)
    assert counts == [0] and tokens == decode(model, LATER[:1], lossless=True)[0] != fresh
    assert decode(model, LATER[:1], **SETTING, backend="cuda_graph")[1] == [len(LATER[0]) - 1], "the compiled path too"


def test_running_out_of_memory_drops_the_kept_prompts():
    model = LOSSLESS_MODELS["llama"]()
    decode(model, FIRST, **SETTING)
    assert model_prompt_cache(model, 1).entries

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    hook = model.register_forward_pre_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        decode(model, LATER[:1], **SETTING)
    hook.remove()
    assert not model_prompt_cache(model, 1).entries and decode(model, LATER[:1], **SETTING)[1] == [0]


def test_a_prompt_cache_needs_a_kv_cache():
    with pytest.raises(ValueError, match="prompt_cache needs use_cache"):
        decode(LOSSLESS_MODELS["llama"](), FIRST, PromptCache(1 << 20), use_cache=False)


def test_predict_reuses_a_shared_beginning_across_batches_and_writes_the_same_responses(tiny_dir, tmp_path, capsys):
    shots = "Q: 1+1=\nA: 2\nQ: 2+3=\nA: 5\nQ: "
    rows = [{"prompt": f"{shots}{a}+{a}=\nA:"} for a in (12, 7, 5, 9)]
    prompts = write(tmp_path / "p.jsonl", "".join(json.dumps(row) + "\n" for row in rows))

    def responses(*extra: str) -> list[dict]:
        out = tmp_path / f"out{len(extra)}.jsonl"
        cli.main(predict_args(tiny_dir, out, prompts, "--model.max_new_tokens=12", *extra))
        return [json.loads(line) for line in out.read_text().splitlines()]

    plain = responses()
    assert "prompt cache:" not in capsys.readouterr().err
    cached = responses("--model.prompt_cache_mib=64")
    counts = [sum(row[name] for row in cached) for name in ("cached_tokens", "prompt_length")]
    assert "prompt cache: {} of {} prompt tokens".format(*counts) in capsys.readouterr().err
    assert [row["response"] for row in cached] == [row["response"] for row in plain]
    shared = len(shots) + 1  # the character tokenizer's BOS, then a token a character
    assert [row["cached_tokens"] >= shared for row in cached] == [False, False, True, True], "the second batch"
    assert "cached_tokens" not in plain[0]


def test_a_model_made_under_inference_mode_keeps_a_cache_too():
    with torch.inference_mode():
        model = LOSSLESS_MODELS["gpt2"]()
    decode(model, FIRST, **SETTING)
    assert decode(model, LATER[:1], **SETTING)[1] == [len(FIRST[0])]
