"""Logit bias and repetition, presence and frequency penalties.

Oracles: greedy ``model.generate`` with transformers' ``sequence_bias`` and ``repetition_penalty``
and a processor for OpenAI's presence and frequency penalties, one prompt at a time, which lossless
and exact block mode must equal on every backend; approximate blocks equal across backends and
cache modes; transformers' processors position by position for the adjustment itself.
"""

from __future__ import annotations

import pytest
import torch
from test_drafter import with_drafter
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from conftest import EOS, LOSSLESS_MODELS, VOCAB, left_pad, model_fixture, random_prompts
from dllm_lit import generate_blocks
from dllm_lit.penalties import Penalties
from dllm_lit.settings import DecodeSettings

PROMPTS = [p[:2] + [EOS] + p[2:] for p in random_prompts([6, 1, 11], seed=9)]
PENALTIES = {
    "repetition": dict(repetition_penalty=1.6),
    "bias": dict(logit_bias={5: 3.0, 11: 2.5, 35: -100.0}),
    "presence-frequency": dict(presence_penalty=1.5, frequency_penalty=1.0),
    "all": dict(repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=1.2, logit_bias={5: 2.0, 9: -3.0}),
}


class OutputPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens after the prompt."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).float()


def processors(prompt_len: int, penalties: dict) -> LogitsProcessorList:
    """transformers' bias and repetition penalty, then the presence and frequency penalties."""
    bias = {(token,): value for token, value in (penalties.get("logit_bias") or {}).items()}
    found = LogitsProcessorList([SequenceBiasLogitsProcessor(bias)] if bias else [])
    if penalties.get("repetition_penalty", 1.0) != 1.0:
        found.append(RepetitionPenaltyLogitsProcessor(penalties["repetition_penalty"]))
    presence, frequency = penalties.get("presence_penalty", 0.0), penalties.get("frequency_penalty", 0.0)
    found.append(OutputPenalties(prompt_len, presence, frequency))
    return found


def greedy(model, prompt: list[int], max_new_tokens: int, penalties: dict, **options) -> list[int]:
    """HF greedy generate under the penalties (and ``options``), cut after EOS."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=0,
        logits_processor=processors(len(prompt), penalties),
        **options,
    )[0, len(prompt) :].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def run(model, prompts=PROMPTS, **settings):
    ids, mask = left_pad(prompts)
    result = generate_blocks(model, ids, attention_mask=mask, eos_token_id=EOS, max_new_tokens=30, **settings)
    return [row.ids_with_stop for row in result.rows]


model = model_fixture(LOSSLESS_MODELS)


EXACT_MODES = {
    "lossless": dict(lossless=True, add_eos_length=7),
    "lossless-w1": dict(lossless=True, add_eos_length=0),
    "lossless-no-alternatives": dict(lossless=True, add_eos_length=3, draft_alternatives=0),
    "exact-blocks": dict(add_eos_length=4, refine_iter=5),
}


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", sorted(EXACT_MODES))
@pytest.mark.parametrize("kind", sorted(PENALTIES))
def test_exact_modes_equal_generate_under_the_penalties(model, kind, mode, backend):
    penalties = PENALTIES[kind]
    found = run(model, **EXACT_MODES[mode], **penalties, backend=backend)
    assert found == [greedy(model, prompt, 30, penalties) for prompt in PROMPTS]
    assert found != run(model, **EXACT_MODES[mode], backend=backend), "the penalties change the answers"


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", sorted(EXACT_MODES))
def test_min_new_tokens_equals_generates(model, mode, backend):
    """EOS made likely by a bias, held back for the first 6 tokens as generate's min_new_tokens does."""
    eager = {"logit_bias": {EOS: 6.0}}
    found = run(model, **EXACT_MODES[mode], **eager, min_new_tokens=6, backend=backend)
    assert found == [greedy(model, prompt, 30, eager, min_new_tokens=6) for prompt in PROMPTS]
    assert all(len(row) > 6 for row in found)
    assert any(len(row) < 6 for row in run(model, **EXACT_MODES[mode], **eager, backend=backend))


def test_exact_blocks_without_a_cache_equal_generate():
    model, penalties = LOSSLESS_MODELS["llama"](), PENALTIES["all"]
    found = run(model, add_eos_length=4, refine_iter=5, use_cache=False, **penalties)
    assert found == [greedy(model, prompt, 30, penalties) for prompt in PROMPTS]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_draft_adapter_keeps_the_base_models_answer(name):
    base, drafter = with_drafter(name, 0.05)
    penalties = PENALTIES["all"]
    expected = [greedy(base, prompt, 30, penalties) for prompt in PROMPTS]
    assert run(drafter, lossless=True, add_eos_length=5, **penalties) == expected


@pytest.mark.parametrize("kind", sorted(PENALTIES))
def test_approximate_blocks_agree_across_backends_and_cache(model, kind):
    settings = dict(add_eos_length=5, refine_iter=2, **PENALTIES[kind])
    eager = run(model, **settings)
    assert run(model, **settings, backend="cuda_graph") == eager
    assert run(model, **settings, use_cache=False) == eager


def test_sampling_follows_the_bias():
    """At temperature 1 a +100 bias leaves one token, a -100 one never comes (any mode)."""
    model = LOSSLESS_MODELS["llama"]()
    for mode in ({"lossless": True, "add_eos_length": 3}, {"add_eos_length": 3, "refine_iter": 2}):
        forced = run(model, temperature=1.0, seed=1, logit_bias={7: 100.0}, **mode)
        assert all(set(row) == {7} for row in forced)
        banned = run(model, temperature=1.0, seed=1, logit_bias={7: -100.0}, ignore_eos=True, **mode)
        assert all(7 not in row for row in banned) and any(banned)


def test_each_position_reads_the_tokens_fed_before_it():
    """The adjustment of a pass's positions equals transformers' processors over the text before
    each: the prompt, the generated tokens and the pass's pending tokens (repeats, -1 entries and
    token 0 included)."""
    settings = DecodeSettings(**PENALTIES["all"])
    prompts, generated = [[4, 5, 6, 0], [7, 1, 8]], [[9, 9, 5], [0, 3, 3]]
    pending = torch.tensor([[-1, 3, 3, 0, 9, -1], [-1, 0, 12, 12, 12, 3]])
    ids, mask = left_pad(prompts, pad=1)  # the second row's padding and its text both hold id 1
    penalties = Penalties(settings, ids, mask)
    logits = torch.randn(2, pending.shape[1], VOCAB, generator=torch.Generator().manual_seed(0)) * 5
    penalties(logits[:, :1])  # the first pass sizes the history
    penalties.add(torch.tensor(generated))
    adjusted = penalties(logits, pending)
    for row, (prompt, answer) in enumerate(zip(prompts, generated)):
        for j in range(pending.shape[1]):
            fed = [t for t in pending[row, : j + 1].tolist() if t >= 0]
            text = torch.tensor([prompt + answer + fed])
            want = processors(len(prompt), PENALTIES["all"])(text, logits[row, j][None].clone())
            torch.testing.assert_close(adjusted[row, j], want[0])


def test_rows_follow_the_batch():
    """A row's history leaves with it: after keep(), the kept rows adjust as before."""
    settings = DecodeSettings(repetition_penalty=2.0, frequency_penalty=1.0)
    ids, mask = left_pad([[4, 5], [6, 7], [8, 9]])
    logits = torch.randn(3, 2, VOCAB, generator=torch.Generator().manual_seed(1))
    penalties = Penalties(settings, ids, mask)
    penalties(logits)
    penalties.add(torch.tensor([[10, 11], [12, 12], [13, 14]]))
    before = penalties(logits)
    penalties.keep(torch.tensor([2, 0]))
    torch.testing.assert_close(penalties(logits[[2, 0]]), before[[2, 0]])


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(repetition_penalty=0.0), "repetition_penalty must be above 0"),
        (dict(presence_penalty=2.5), "presence_penalty must be between -2 and 2"),
        (dict(frequency_penalty=-3), "frequency_penalty must be between -2 and 2"),
        (dict(logit_bias={5: 101}), "logit_bias maps token ids"),
        (dict(logit_bias={-1: 1}), "logit_bias maps token ids"),
        (dict(logit_bias={VOCAB: 1}), "outside the model's vocabulary"),
    ],
)
def test_bad_settings_are_one_sentence(settings, message):
    with pytest.raises(ValueError, match=message):
        run(LOSSLESS_MODELS["llama"](), **settings)


def test_no_penalty_is_no_adjustment():
    assert not DecodeSettings(logit_bias={}).penalized
    assert DecodeSettings(logit_bias={"3": "-1"}).logit_bias == {3: -1.0}  # YAML and JSON keys


def test_settings_with_a_bias_group_as_equal_settings():
    """The server batches jobs by their settings: equal biases are one key."""
    groups = {DecodeSettings(logit_bias={3: 1, 5: 2}): "a"}
    assert groups[DecodeSettings(logit_bias={"5": 2.0, "3": 1.0})] == "a"
    assert DecodeSettings(logit_bias={3: 1}) not in groups
