"""Lossless mode: the model's own autoregressive output, at least one token per forward pass.

Oracles: greedy ``model.generate``; one-by-one runs; the exact autoregressive sampling distribution.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers.generation.logits_process import LogitsProcessorList, TopKLogitsWarper

from conftest import EOS, LOSSLESS_MODELS, MODELS, left_pad, model_fixture, random_prompts
from dllm_lit import generate_blocks
from dllm_lit.lossless import PromptLookup, RaggedBatch, WindowSchedule

PROMPTS = random_prompts([5, 11, 2], seed=1)


model = model_fixture(LOSSLESS_MODELS)


WITH_EOS = [p[:2] + [EOS] + p[2:] for p in random_prompts([6, 3, 9], seed=7)]


def run(model, prompts, **kwargs):
    ids, mask = left_pad(prompts)
    return generate_blocks(model, ids, attention_mask=mask, eos_token_id=EOS, lossless=True, **kwargs)


def greedy(model, prompts, max_new_tokens: int, stop=(EOS,)) -> list[list[int]]:
    """HF greedy generate, cut after the first stop token."""
    ids, mask = left_pad(prompts)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop),
        pad_token_id=0,
    )[:, ids.shape[1] :].tolist()
    rows = []
    for tokens in out:
        cut = next((i + 1 for i, t in enumerate(tokens) if t in stop), len(tokens))
        rows.append(tokens[:cut])
    return rows


BACKENDS = pytest.mark.parametrize("backend", ["eager", "cuda_graph"])


@BACKENDS
@pytest.mark.parametrize("width", [1, 2, 8, 33])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS, WITH_EOS], ids=["batch1", "padded3", "eos-in-prompt"])
def test_greedy_lossless_equals_generate(model, width, prompts, backend):
    result = run(model, prompts, add_eos_length=width - 1, max_new_tokens=40, backend=backend)
    assert [row.ids_with_stop for row in result.rows] == greedy(model, prompts, 40)
    for row in result.rows:
        assert row.forwards <= row.num_generated, "at least one token per forward"
        if width == 1:
            assert row.forwards == row.num_generated


@pytest.mark.parametrize("name", ["llama-drafty", "gpt2-drafty"])
def test_drafty_models_accept_several_tokens_per_pass(name):
    """The fixture behind the ragged-acceptance cases: rows accept many, and different, counts."""
    result = run(LOSSLESS_MODELS[name](), PROMPTS, add_eos_length=7, max_new_tokens=40)
    counts = [n for per_pass in result.accepted_per_pass for n in per_pass]
    assert max(counts) >= 4 and len(set(counts)) >= 3
    assert result.forwards < result.generated_tokens / 2


@BACKENDS
@pytest.mark.parametrize("width", [1, 4, 9])
def test_stop_ids_and_length_cuts_are_exact(model, width, backend):
    plain = run(model, PROMPTS, add_eos_length=width - 1, max_new_tokens=30).rows
    stop = plain[0].token_ids[4]
    settings = dict(add_eos_length=width - 1, backend=backend)
    stopped = run(model, PROMPTS, max_new_tokens=30, stop_token_ids=[stop], **settings).rows
    assert [r.ids_with_stop for r in stopped] == greedy(model, PROMPTS, 30, stop=(EOS, stop))
    assert stopped[0].stop_token_id == stop
    by_length = run(model, PROMPTS, max_new_tokens=100, max_length=17, **settings).rows
    for prompt, row, full in zip(PROMPTS, by_length, plain):
        assert len(prompt) + row.num_generated <= 17
        assert row.ids_with_stop == full.ids_with_stop[: row.num_generated]
        assert row.stop_reason == "eos" or len(prompt) + row.num_generated == 17
    short = run(model, PROMPTS, max_new_tokens=7, **settings).rows
    assert all(r.stop_reason == "eos" or (r.stop_reason, r.num_generated) == ("max_new_tokens", 7) for r in short)


@BACKENDS
@pytest.mark.parametrize("width", [2, 8])
def test_batched_equals_one_by_one(model, width, backend):
    prompts = random_prompts([7, 1, 13, 4], seed=2)
    settings = dict(add_eos_length=width - 1, max_new_tokens=30, backend=backend)
    batched = run(model, prompts, **settings).rows
    alone = [run(model, [p], **settings).rows[0] for p in prompts]
    assert [r.ids_with_stop for r in batched] == [r.ids_with_stop for r in alone]


def summary(result):
    rows = [(r.token_ids, r.stop_reason, r.stop_token_id, r.forwards) for r in result.rows]
    return rows, result.forwards, result.accepted_per_pass


@pytest.mark.parametrize("width", [1, 3, 8])
def test_compiled_equals_eager(model, width):
    """Tokens, stop reasons, forwards per row and accepted counts per pass, over rows that stop at
    different passes by EOS, stop ids and length."""
    prompts = [p[:3] + [EOS] + p[3:] for p in random_prompts([6, 9, 2, 14, 7, 3], seed=3)]
    for settings in (
        dict(max_new_tokens=40),
        dict(max_new_tokens=100, max_length=24),
        dict(max_new_tokens=30, stop_token_ids=[11, 12]),
        dict(max_new_tokens=21, ignore_eos=True),
    ):
        settings["adaptive_window"] = False  # the compiled path always keeps the full window
        eager = run(model, prompts, add_eos_length=width - 1, **settings)
        assert summary(run(model, prompts, add_eos_length=width - 1, backend="cuda_graph", **settings)) == summary(
            eager
        )


def test_the_window_narrows_while_drafts_fail_and_widens_when_one_is_accepted():
    schedule = WindowSchedule(8, adaptive=True)
    one, two = torch.tensor([1, 1]), torch.tensor([1, 2])
    widths = [schedule.next_width(8, one), schedule.next_width(8, one)]  # two misses: narrow for 4
    widths += [schedule.next_width(1, one) for _ in range(4)]  # then probe with two wide passes
    widths += [schedule.next_width(8, one), schedule.next_width(8, one)]  # missed again: narrow for 8
    widths += [schedule.next_width(1, one) for _ in range(8)]
    widths += [schedule.next_width(8, two), schedule.next_width(8, one), schedule.next_width(8, one)]
    assert widths == [8, 1, 1, 1, 1, 8, 8, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8, 8, 1]
    assert schedule.narrow_left == 3, "an accepted draft resets the back-off to 4"
    batch = WindowSchedule(8, adaptive=True)
    lone = torch.tensor([1, 1, 1, 2])  # one draft token over four rows does not pay for a wide pass
    assert [batch.next_width(8, lone), batch.next_width(8, lone), batch.next_width(1, lone)] == [8, 1, 1]
    assert {WindowSchedule(8, adaptive=False).next_width(8, one) for _ in range(5)} == {8}


def test_prompt_lookup_drafts_what_followed_the_latest_earlier_match():
    lookup = PromptLookup([[5, 6, 7, 8]], longest=3)
    assert lookup.draft(0, [5, 6], size=4) == [7, 8, 5, 6], "the 2-gram (5, 6) was followed by 7, 8"
    assert lookup.draft(0, [5, 6, 9], size=4) == [], "9 never came before"
    assert lookup.draft(0, [5, 6, 9, 9, 6, 7], size=3) == [8, 5, 6], "the longest match first: (6, 7)"
    assert lookup.draft(0, [5, 6, 9, 9, 6, 7, 1, 6], size=2) == [7, 1], "after the latest of three earlier 6s"
    two = PromptLookup([[5, 6, 7, 8]], longest=3, shortest=2)
    assert two.draft(0, [6], size=2) == [] and two.draft(0, [6, 7], size=2) == [8, 6], "no match under 2 tokens"


@pytest.mark.parametrize("width", [2, 8])
def test_prompt_lookup_never_changes_the_tokens(model, width):
    settings = dict(add_eos_length=width - 1, max_new_tokens=60, prompt_lookup_max=3, prompt_lookup_min=1)
    result = run(model, PROMPTS, **settings)
    assert [row.ids_with_stop for row in result.rows] == greedy(model, PROMPTS, 60)


def test_prompt_lookup_saves_passes_where_the_models_drafts_do_not():
    model = MODELS["gpt2"]()
    settings = dict(add_eos_length=7, max_new_tokens=200, ignore_eos=True, draft_alternatives=0)
    plain = run(model, PROMPTS[:1], **settings)
    lookup = run(model, PROMPTS[:1], prompt_lookup_max=3, prompt_lookup_min=1, **settings)
    assert lookup.rows[0].token_ids == plain.rows[0].token_ids and plain.forwards == 200
    assert lookup.forwards < 195


@pytest.mark.parametrize("name", ["llama", "gpt2-drafty"])
def test_the_adaptive_window_never_changes_the_tokens(name):
    model = LOSSLESS_MODELS[name]()
    fixed, adaptive = (
        run(model, PROMPTS, add_eos_length=7, max_new_tokens=60, adaptive_window=on, draft_alternatives=0)
        for on in (False, True)
    )
    assert [r.ids_with_stop for r in adaptive.rows] == [r.ids_with_stop for r in fixed.rows]
    if name == "llama":  # drafts are never right: the adaptive window spends one-token passes
        assert adaptive.forwards == fixed.forwards == max(r.num_generated for r in fixed.rows)


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-drafty"])
@pytest.mark.parametrize("width", [2, 8])
@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
def test_alternatives_for_the_first_draft_token_save_passes_and_never_change_the_tokens(name, width, backend):
    """Where the draft's first token is wrong and an alternative is right, a pass accepts two tokens
    read at different columns of one cache (eager) or moved into consecutive slots (compiled): greedy
    ``generate``'s tokens, batched or alone, in fewer passes than without alternatives."""
    model = LOSSLESS_MODELS[name]()
    settings = dict(add_eos_length=width - 1, max_new_tokens=60, adaptive_window=False, backend=backend)
    without = run(model, PROMPTS, draft_alternatives=0, **settings)
    for count in (1, 5):
        batched = run(model, PROMPTS, draft_alternatives=count, **settings)
        assert [row.ids_with_stop for row in batched.rows] == greedy(model, PROMPTS, 60)
        alone = [run(model, [prompt], draft_alternatives=count, **settings).rows[0] for prompt in PROMPTS]
        assert batched.rows == alone
        assert sum(row.forwards for row in batched.rows) < sum(row.forwards for row in without.rows)


def test_dropping_the_cache_columns_no_row_reads_never_changes_the_tokens(monkeypatch):
    model, settings = LOSSLESS_MODELS["gpt2"](), dict(add_eos_length=3, max_new_tokens=60, adaptive_window=False)
    expected = run(model, PROMPTS, **settings)
    dropped, compact = [], RaggedBatch._compacted

    def recorded(self, valid, read):
        kept = compact(self, valid, read)
        dropped.append(valid.shape[1] - kept.shape[1])
        return kept

    monkeypatch.setattr(RaggedBatch, "COMPACT_AT", 1)
    monkeypatch.setattr(RaggedBatch, "_compacted", recorded)
    assert run(model, PROMPTS, **settings) == expected
    assert sum(dropped) > 10


def test_sampled_alternatives_never_change_the_tokens():
    """A sampled token is a function of its logits and its keyed number: alternatives verify as in
    greedy passes, and the tokens are the same with or without them."""
    model, settings = LOSSLESS_MODELS["llama-drafty"](), dict(add_eos_length=3, max_new_tokens=30, temperature=1.0)
    with_them = run(model, PROMPTS, seed=4, **settings)
    without = run(model, PROMPTS, seed=4, draft_alternatives=0, **settings)
    assert [row.token_ids for row in with_them.rows] == [row.token_ids for row in without.rows]
    row_forwards = [sum(row.forwards for row in result.rows) for result in (with_them, without)]
    assert row_forwards[0] < row_forwards[1], "sampled passes take alternatives too"


@BACKENDS
def test_statistics_count_accepted_tokens(model, backend):
    result = run(model, PROMPTS, add_eos_length=7, max_new_tokens=30, backend=backend)
    assert len(result.accepted_per_pass) == result.forwards
    assert all(1 <= n <= 8 for counts in result.accepted_per_pass for n in counts)
    # Every generated token was accepted; a row's last pass may accept more than it keeps.
    assert sum(map(sum, result.accepted_per_pass)) >= result.generated_tokens
    assert [len(counts) for counts in result.accepted_per_pass] == sorted(
        (len(counts) for counts in result.accepted_per_pass), reverse=True
    ), "finished rows leave the batch"


# Sampling: the keyed draw keeps the autoregressive distribution.
CHI2_CRITICAL = {4: 18.47, 8: 26.12}  # chi-square critical values at significance 0.001


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@BACKENDS
def test_sampled_lossless_matches_autoregressive_sampling(backend):
    """The first two tokens of 6000 samples of one prompt, against their exact probabilities under
    the model with the same warpers (top-k 3, temperature 1)."""
    model = MODELS["llama"]()
    prompt = PROMPTS[0]
    warp = LogitsProcessorList([TopKLogitsWarper(3)])

    def next_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[:, -1]
        return torch.softmax(warp(None, logits), -1)[0]

    first = next_probs(prompt)
    support = first.nonzero().squeeze(1).tolist()
    exact = {(a, b): float(first[a] * p) for a in support for b, p in enumerate(next_probs(prompt + [a])) if p > 0}
    samples = 6000
    ids = torch.tensor([prompt] * samples)
    result = generate_blocks(
        model,
        ids,
        eos_token_id=95,
        lossless=True,
        add_eos_length=3,
        max_new_tokens=2,
        temperature=1.0,
        top_k=3,
        seed=5,
        ignore_eos=True,
        backend=backend,
    )
    pairs = [tuple(row.token_ids[:2]) for row in result.rows]
    keys = sorted(exact)
    counts = torch.tensor([pairs.count(k) for k in keys], dtype=torch.float)
    assert sum(counts) == samples, "every sample lies in the support"
    assert chi_square(counts, torch.tensor([exact[k] for k in keys])) < CHI2_CRITICAL[8]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(use_cache=False), "lossless=True needs use_cache=True"),
        (dict(prompt_lookup_max=-1), "prompt_lookup_max must be at least 0"),
        (dict(prompt_lookup_max=2, prompt_lookup_min=3), "prompt_lookup_min must be at least 1 and at most"),
        (dict(prompt_lookup_max=2, adaptive_window=False), "prompt_lookup_max drafts up to add_eos_length"),
        (dict(prompt_lookup_max=2, backend="cuda_graph"), "it needs lossless=True, adaptive_window=True, backend="),
        (dict(prompt_lookup_max=2, add_eos_length=0), "and add_eos_length >= 1"),
    ],
)
def test_unsupported_combinations_are_one_sentence(change, message):
    with pytest.raises(ValueError, match=message):
        run(MODELS["llama"](), PROMPTS[:1], max_new_tokens=4, **change)


def test_predict_and_the_legacy_flag_run_lossless(tiny_dir, tmp_path):
    """`--model.lossless true` and the demo's `--lossless` give the greedy answers (the exact block
    setting is the oracle), and report at least one token per forward."""
    from dllm_lit import cli, demo

    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2+2?\nName a color.\nx\n")
    common = ["--model.add_eos_length=5", "--model.max_new_tokens=20", f"--data.prompts_file={prompts}"]
    outputs = {}
    for name, extra in (("lossless", ["--model.lossless=true"]), ("exact", ["--model.refine_iter=6"])):
        outputs[name] = tmp_path / f"{name}.jsonl"
        cli.main(
            [
                "predict",
                f"--model.model_name_or_path={tiny_dir}",
                *common,
                *extra,
                f"--writer.output_file={outputs[name]}",
            ]
        )
    legacy = tmp_path / "legacy.jsonl"
    demo.main(
        [
            "--model_path",
            tiny_dir,
            "--prompts_file",
            str(prompts),
            "--add_eos_length",
            "5",
            "--max_new_tokens",
            "20",
            "--lossless",
            "--output_file",
            str(legacy),
        ]
    )
    read = {
        name: [json.loads(line) for line in path.read_text().splitlines()]
        for name, path in {**outputs, "legacy": legacy}.items()
    }
    answers = {name: [row["response"] for row in rows] for name, rows in read.items()}
    assert answers["lossless"] == answers["exact"] == answers["legacy"]
    assert all(row["tokens_per_forward"] >= 1 for row in read["lossless"])


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 5}])
def test_a_predicted_answer_drafts_the_model_s_own_tokens_in_fewer_forwards(model, sampling, backend):
    settings = {"add_eos_length": 3, "max_new_tokens": 16, "backend": backend, **sampling}
    prompts = random_prompts([5, 8, 3], seed=11)
    plain = run(model, prompts, **settings)
    answers = [row.ids_with_stop for row in plain.rows]
    edited = [answer[:5] + [7] + answer[5:] for answer in answers]  # a token slipped in: the rest re-found
    forwards = []
    for predictions in (answers, edited, [answers[0], None, [9, 9, 9]], [None, [5], None]):
        predicted = run(model, prompts, row_predictions=predictions, **settings)
        assert [row.ids_with_stop for row in predicted.rows] == answers, "the same answers, whatever predicted"
        forwards.append(predicted.forwards)
    assert forwards[0] <= 16 // 4 + 1, "a right prediction: W tokens a pass"
    assert forwards[1] <= forwards[0] + 2, "an edit costs its pass, and the answer finds its place again"
