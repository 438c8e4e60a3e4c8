"""Sampling keyed by row seed and answer position.

Oracles: an autoregressive sampler written here (one forward per token, transformers' warpers, the
inverse CDF at the same keyed number), which exact block mode and lossless mode must equal token for
token on every backend; one-by-one runs, which batches must equal in every mode; the exact
probabilities of the model, which many samples must follow.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_penalties import EXACT_MODES, processors
from test_penalties import run as answers
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from conftest import EOS, LOSSLESS_MODELS, left_pad, model_fixture, random_prompts
from dllm_lit import generate_blocks, lossless
from dllm_lit.sampling import keyed_uniforms

PROMPTS = [p[:2] + [EOS] + p[2:] for p in random_prompts([6, 1, 11], seed=13)]
SAMPLING = dict(temperature=1.3, top_p=0.9)
SEEDS = [11, 12, 13]


@torch.no_grad()
def sampled(model, prompt: list[int], seed: int, steps: int, penalties: dict | None = None) -> list[int]:
    """One token per forward: the warped distribution's inverse CDF at the keyed number of each
    answer position (through EOS)."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(SAMPLING["temperature"]), TopPLogitsWarper(SAMPLING["top_p"])])
    adjust = processors(len(prompt), penalties) if penalties else LogitsProcessorList()
    ids = list(prompt)
    for step in range(steps):
        text = torch.tensor([ids])
        token = keyed_pick(
            torch.softmax(warp(text, adjust(text, model(text).logits[:, -1].float())), -1)[0], seed, step
        )
        ids.append(token)
        if token == EOS:
            break
    return ids[len(prompt) :]


def keyed_pick(probs: torch.Tensor, seed: int, step: int) -> int:
    """The token where the running sum of ``probs`` passes the keyed number of ``(seed, step)``,
    summed in a Python loop."""
    target = float(keyed_uniforms(torch.tensor([seed]), torch.tensor([[step]]))) * float(probs.sum())
    mass = probs.tolist()
    return next(t for t, below in enumerate(itertools.accumulate(mass)) if below > target and mass[t] > 0)


def run(model, prompts=PROMPTS, row_seeds=SEEDS, **settings):
    """Each row's answer through its stop token (30 tokens at most), sampled with ``row_seeds``."""
    return answers(model, prompts, row_seeds=row_seeds, **{**SAMPLING, **settings})


model = model_fixture(LOSSLESS_MODELS)


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", sorted(EXACT_MODES))
def test_exact_modes_equal_an_autoregressive_sampler_with_the_same_numbers(model, mode, backend):
    expected = [sampled(model, prompt, seed, 30) for prompt, seed in zip(PROMPTS, SEEDS)]
    assert run(model, **EXACT_MODES[mode], backend=backend) == expected
    assert expected != [sampled(model, prompt, seed + 1, 30) for prompt, seed in zip(PROMPTS, SEEDS)]


def test_penalties_and_sampling_together_stay_exact():
    model, penalties = LOSSLESS_MODELS["gpt2"](), dict(repetition_penalty=1.4, frequency_penalty=0.8)
    expected = [sampled(model, prompt, seed, 30, penalties) for prompt, seed in zip(PROMPTS, SEEDS)]
    assert run(model, lossless=True, add_eos_length=5, **penalties) == expected


MODES = {**EXACT_MODES, "approximate-blocks": dict(add_eos_length=5, refine_iter=2)}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_row_samples_the_same_answer_alone_or_in_a_batch(model, mode):
    batched = run(model, **MODES[mode])
    alone = [run(model, [prompt], [seed], **MODES[mode])[0] for prompt, seed in zip(PROMPTS, SEEDS)]
    assert batched == alone


def test_approximate_blocks_sample_the_same_on_every_backend_and_cache_mode(model):
    settings = MODES["approximate-blocks"]
    eager = run(model, **settings)
    assert run(model, **settings, backend="cuda_graph") == eager
    assert run(model, **settings, use_cache=False) == eager


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
def test_drawing_every_position_at_once_gives_the_same_tokens_and_passes(model, backend, monkeypatch):
    """A CPU draws only the positions a sampled lossless pass verifies, a GPU all of them at once:
    the same tokens, guesses and so passes, with alternatives, penalties and ``min_new_tokens``."""
    ids, mask = left_pad(PROMPTS)
    settings = dict(lossless=True, add_eos_length=5, repetition_penalty=1.3, min_new_tokens=4, backend=backend)

    def decode():
        result = generate_blocks(
            model, ids, attention_mask=mask, eos_token_id=EOS, row_seeds=SEEDS, **SAMPLING, **settings
        )
        return [(row.token_ids, row.forwards) for row in result.rows]

    drawn_lazily = decode()
    monkeypatch.setattr(lossless, "LAZY_DRAW_DEVICES", set())
    assert decode() == drawn_lazily


def test_the_seed_setting_seeds_row_r_with_seed_plus_r():
    model = LOSSLESS_MODELS["llama"]()
    twice = run(model, [PROMPTS[0]] * 2, None, seed=40, lossless=True, add_eos_length=3)
    assert twice == [run(model, [PROMPTS[0]], [seed], lossless=True, add_eos_length=3)[0] for seed in (40, 41)]
    assert twice[0] != twice[1]


def test_without_a_seed_rows_draw_their_seeds_from_torchs_generator():
    model = LOSSLESS_MODELS["llama"]()
    torch.manual_seed(3)
    first = run(model, [PROMPTS[0]] * 2, None, lossless=True)
    torch.manual_seed(3)
    assert run(model, [PROMPTS[0]] * 2, None, lossless=True) == first and first[0] != first[1]


def test_keyed_numbers_are_uniform_and_differ_by_key_and_position():
    numbers = keyed_uniforms(torch.tensor([0, 1, -5, 2**40]), torch.arange(50000)[None, :])
    assert numbers.min() > 0 and numbers.max() < 1
    counts = torch.histc(numbers[0].float(), bins=10, min=0, max=1)
    assert float(((counts - 5000) ** 2 / 5000).sum()) < 27.88  # chi-square, 9 degrees, p = 0.001
    assert len({tuple(row[:8].tolist()) for row in numbers}) == 4
    correlation = torch.corrcoef(numbers[:2])[0, 1]
    assert abs(float(correlation)) < 0.02


def test_a_wrong_number_of_row_seeds_is_one_sentence():
    with pytest.raises(ValueError, match="row_seeds has 2 seeds for 3 prompts"):
        run(LOSSLESS_MODELS["llama"](), row_seeds=[1, 2])


def test_greedy_decoding_leaves_torchs_generator_alone():
    """Training validates with the engine between steps: a greedy call must not move the global
    generator that dropout and noise draw from."""
    model = LOSSLESS_MODELS["llama"]()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    run(model, row_seeds=None, temperature=0.0, lossless=True)
    assert torch.equal(torch.rand(3), expected)
