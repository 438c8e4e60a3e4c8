"""Token log-probabilities (``logprobs``) on every loop.

Oracles: the model run once over prompt + answer (teacher forcing) gives every token's
autoregressive log-probability and top tokens, which lossless and exact block mode must report;
approximate block mode reports what its own passes saw, equal across backends and cache modes.
"""

from __future__ import annotations

import pytest
import torch
from test_drafter import with_drafter

from conftest import EOS, LOSSLESS_MODELS, VOCAB, left_pad, model_fixture, random_prompts
from dllm_lit import generate_blocks
from dllm_lit.logprobs import TokenLogprob

PROMPTS = [p[:2] + [EOS] + p[2:] for p in random_prompts([6, 1, 11], seed=5)]
TOP = 3


model = model_fixture(LOSSLESS_MODELS)


def run(model, prompts=PROMPTS, **settings):
    ids, mask = left_pad(prompts)
    settings = {"logprobs": TOP, **settings}
    return generate_blocks(model, ids, attention_mask=mask, eos_token_id=EOS, **settings)


@torch.no_grad()
def teacher_forced(model, prompt: list[int], answer: list[int]) -> list[TokenLogprob]:
    """Each answer token's log-probability and the top tokens, from one forward over prompt + answer."""
    logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
    logprobs = torch.log_softmax(logits.float(), -1)
    best = logprobs.topk(TOP, -1)
    return [
        TokenLogprob(token, float(row[token]), tuple(zip(ids.tolist(), values.tolist())))
        for row, token, ids, values in zip(logprobs, answer, best.indices, best.values)
    ]


def assert_close(found: list[TokenLogprob], expected: list[TokenLogprob]) -> None:
    assert [entry.token_id for entry in found] == [entry.token_id for entry in expected]
    for got, want in zip(found, expected):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [i for i, _ in got.top] == [i for i, _ in want.top]
        assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-4)


MODES = {
    "lossless": dict(lossless=True, add_eos_length=7),
    "lossless-w1": dict(lossless=True, add_eos_length=0),
    "exact-blocks": dict(add_eos_length=5, refine_iter=6),
    "sampled-lossless": dict(lossless=True, add_eos_length=7, temperature=1.3, top_k=20, seed=3),
}


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_lossless_and_exact_modes_report_the_autoregressive_logprobs(model, mode, backend):
    result = run(model, max_new_tokens=30, backend=backend, **MODES[mode])
    assert result.generated_tokens > 10, "the rows produce tokens to score"
    for prompt, row in zip(PROMPTS, result.rows):
        assert_close(row.logprobs, teacher_forced(model, prompt, row.token_ids))


def test_the_draft_adapter_and_its_alternatives_report_the_base_models_logprobs():
    base, drafter = with_drafter("llama", 0.5)
    result = run(drafter, max_new_tokens=30, lossless=True, add_eos_length=5, draft_alternatives=3)
    for prompt, row in zip(PROMPTS, result.rows):
        assert_close(row.logprobs, teacher_forced(base, prompt, row.token_ids))


@pytest.mark.parametrize("width", [2, 8])
def test_approximate_blocks_report_the_same_logprobs_on_every_backend_and_cache_mode(model, width):
    """refine_iter=2 at width 8 commits tokens the model picked from drafts: their logprobs are the
    last pass's, and greedy tokens are that pass's top token."""
    settings = dict(max_new_tokens=30, add_eos_length=width - 1)
    eager = run(model, **settings).rows
    for other in (run(model, backend="cuda_graph", **settings).rows, run(model, use_cache=False, **settings).rows):
        assert [r.token_ids for r in other] == [r.token_ids for r in eager]
        for row, reference in zip(other, eager):
            assert_close(row.logprobs, reference.logprobs)
    for row in eager:
        assert [entry.token_id for entry in row.logprobs] == row.token_ids
        assert [entry.top[0][0] for entry in row.logprobs] == row.token_ids
        assert [entry.logprob for entry in row.logprobs] == [entry.top[0][1] for entry in row.logprobs]


def test_cut_rows_keep_one_logprob_per_token_and_listeners_see_them_commit_by_commit(model):
    seen: dict[int, list[TokenLogprob]] = {}
    result = run(
        model,
        max_new_tokens=30,
        max_length=17,
        lossless=True,
        add_eos_length=3,
        on_logprobs=lambda row, new: seen.setdefault(row, []).extend(new),
    )
    assert {row.stop_reason for row in result.rows} >= {"max_length"}
    for index, row in enumerate(result.rows):
        assert len(row.logprobs) == len(row.token_ids)
        assert seen.get(index, []) == row.logprobs


def test_stop_strings_cut_the_logprobs_with_the_tokens(tiny_dir):
    from dllm_lit.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_dir).eval(), load_tokenizer(tiny_dir)
    ids = torch.tensor([tokenizer("abc").input_ids])
    plain = generate_blocks(model, ids, eos_token_id=tokenizer.eos_token_id, max_new_tokens=20, logprobs=0)
    text = tokenizer.decode(plain.rows[0].token_ids)
    stop = text[5:7]
    cut = generate_blocks(
        model,
        ids,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=20,
        logprobs=0,
        stop_strings=stop,
        tokenizer=tokenizer,
    ).rows[0]
    assert cut.stop_reason == "stop_string" and len(cut.token_ids) < len(plain.rows[0].token_ids)
    assert cut.logprobs == plain.rows[0].logprobs[: len(cut.token_ids)]
    assert all(entry.top == () for entry in cut.logprobs)


def test_logprobs_are_off_by_default_and_checked(model):
    assert all(row.logprobs is None for row in generate_blocks(model, torch.tensor([[5, 6]]), eos_token_id=EOS).rows)
    with pytest.raises(ValueError, match="logprobs must be at least 0"):
        run(model, logprobs=-1)
    with pytest.raises(ValueError, match="needs a vocabulary"):
        generate_blocks(model, torch.tensor([[5, 6]]), eos_token_id=EOS, logprobs=VOCAB + 1)


def test_predict_writes_each_tokens_logprob_as_the_engine_reports_it(tiny_dir, tmp_path):
    import json

    from dllm_lit import cli
    from dllm_lit.models import load_model, load_tokenizer

    out = tmp_path / "out.jsonl"
    settings = ["--model.add_eos_length=3", "--model.max_new_tokens=20", "--model.lossless=true"]
    cli.main(
        ["predict", f"--model.model_name_or_path={tiny_dir}", *settings, "--model.logprobs=2"]
        + ["--data.prompt=12+34=", f"--writer.output_file={out}"]
    )
    row = json.loads(out.read_text())
    model, tokenizer = load_model(tiny_dir), load_tokenizer(tiny_dir)
    ids = torch.tensor([tokenizer("12+34=").input_ids])
    engine = generate_blocks(
        model, ids, eos_token_id=tokenizer.eos_token_id, add_eos_length=3, max_new_tokens=20, lossless=True, logprobs=2
    ).rows[0]
    written = row["logprobs"]
    assert "".join(written["tokens"]) == row["response"] and len(written["tokens"]) == row["response_length"]
    assert written["token_logprobs"] == pytest.approx([entry.logprob for entry in engine.logprobs], abs=1e-5)
    pairs = zip(written["tokens"], written["token_logprobs"], written["top_logprobs"])
    assert all(top[token] == logprob and len(top) <= 3 for token, logprob, top in pairs)


@pytest.mark.parametrize("chunk", [3, 512])
def test_prompt_logprobs_are_the_teacher_forced_ones_in_chunks_of_any_size(model, chunk):
    from dllm_lit.logprobs import prompt_logprobs

    prompt = random_prompts([13], seed=9)[0]
    found = prompt_logprobs(model, prompt, TOP, chunk=chunk)
    assert found[0] == TokenLogprob(prompt[0], None, None)
    assert_close(found[1:], teacher_forced(model, prompt[:1], prompt[1:]))
