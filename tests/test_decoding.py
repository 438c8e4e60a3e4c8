"""The decoding contract, checked against oracles on tiny random models (fp32, CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import EOS, MODELS, left_pad, random_prompts
from dllm_lit import DecodeSettings, generate_blocks, iterative_generate
from dllm_lit.reference import reference_generate

PROMPTS_3 = random_prompts([5, 11, 2], seed=1)
MODES = {
    "block": dict(add_eos_length=3, refine_iter=2),
    "block-compiled": dict(add_eos_length=3, refine_iter=2, backend="cuda_graph"),
    "lossless": dict(add_eos_length=3, lossless=True),
    "lossless-compiled": dict(add_eos_length=3, lossless=True, backend="cuda_graph"),
}


def run(model, prompts, **kwargs):
    ids, mask = left_pad(prompts)
    kwargs.setdefault("eos_token_id", EOS)
    return generate_blocks(model, ids, attention_mask=mask, **kwargs)


def tokens(result):
    return [(row.token_ids, row.stop_reason, row.stop_token_id) for row in result.rows]


# 1. Cached == uncached over a grid.
@pytest.mark.parametrize("width", [1, 2, 8, 33])
@pytest.mark.parametrize("refine_iter", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_equals_uncached(model, width, refine_iter, batch):
    prompts = PROMPTS_3[:batch]
    settings = dict(add_eos_length=width - 1, refine_iter=refine_iter, max_new_tokens=45)
    cached = run(model, prompts, **settings)
    uncached = run(model, prompts, use_cache=False, **settings)
    assert tokens(cached) == tokens(uncached)
    assert cached.forwards == uncached.forwards
    assert all(row.num_generated > 0 for row in cached.rows)


# 2. refine_iter >= width is exactly greedy autoregressive decoding.
@pytest.mark.parametrize("width,refine_iter", [(1, 1), (4, 4), (8, 9), (16, 16)])
@pytest.mark.parametrize("prompts", [PROMPTS_3[:1], PROMPTS_3], ids=["batch1", "padded3"])
def test_exact_settings_equal_greedy_generate(model, width, refine_iter, prompts):
    ids, mask = left_pad(prompts)
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=EOS, pad_token_id=0
    )[:, ids.shape[1] :]
    result = run(model, prompts, add_eos_length=width - 1, refine_iter=refine_iter, max_new_tokens=40)
    for row, hf in zip(result.rows, expected.tolist()):
        ours = row.ids_with_stop
        assert ours == hf[: len(ours)]
        assert len(ours) == 40 or hf[len(ours) - 1] == EOS


# 3. A batched call equals the same prompts one by one.
@pytest.mark.parametrize("width,refine_iter", [(1, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_equals_one_by_one(model, width, refine_iter, use_cache):
    prompts = random_prompts([7, 1, 13, 4], seed=2)
    settings = dict(add_eos_length=width - 1, refine_iter=refine_iter, max_new_tokens=30, use_cache=use_cache)
    batched = tokens(run(model, prompts, **settings))
    alone = [tokens(run(model, [p], **settings))[0] for p in prompts]
    assert batched == alone


# 4. Rows stop on their own; nothing is cut inside a prompt that contains EOS, pad == eos.
def test_one_rows_eos_does_not_stop_the_others(model):
    settings = dict(add_eos_length=3, refine_iter=2, max_new_tokens=40)
    candidates = [p[:3] + [EOS] + p[3:] for p in random_prompts([6] * 40, seed=3)]
    solo = {i: run(model, [p], **settings).rows[0] for i, p in enumerate(candidates)}
    early = next(i for i, r in solo.items() if r.stop_reason == "eos" and r.num_generated <= 20)
    late = [i for i, r in solo.items() if r.stop_reason == "max_new_tokens"][:2]
    assert len(late) == 2, "the fixture needs rows that never emit EOS"
    chosen = [candidates[late[0]], candidates[early], candidates[late[1]]]
    ids, mask = left_pad(chosen, pad=EOS)
    result = generate_blocks(model, ids, attention_mask=mask, eos_token_id=EOS, **settings)
    assert [r.stop_reason for r in result.rows] == ["max_new_tokens", "eos", "max_new_tokens"]
    assert tokens(result) == [tokens(run(model, [p], **settings))[0] for p in chosen]

    out = iterative_generate(model, ids, EOS, None, attention_mask=mask, **settings)
    assert torch.equal(out[:, : ids.shape[1]], ids)  # the prompt, EOS inside it included, is intact
    row = out[1, ids.shape[1] :].tolist()
    stop_at = len(result.rows[1].token_ids)
    assert row[: stop_at + 1] == result.rows[1].token_ids + [EOS]
    assert set(row[stop_at:]) == {EOS}  # pad_token_id=None falls back to EOS
    assert out.shape[1] == ids.shape[1] + 40


# 5. Lengths are cut exactly.
@pytest.mark.parametrize("width,refine_iter", [(8, 2), (5, 1), (1, 1)])
def test_length_limits(model, width, refine_iter):
    prompts = random_prompts([5, 9, 3], seed=4)
    settings = dict(add_eos_length=width - 1, refine_iter=refine_iter)
    by_new = run(model, prompts, max_new_tokens=13, **settings)
    for row in by_new.rows:
        assert row.num_generated <= 13
        assert row.stop_reason == "eos" or (row.num_generated == 13 and row.stop_reason == "max_new_tokens")
    by_len = run(model, prompts, max_new_tokens=100, max_length=20, **settings)
    for prompt, row in zip(prompts, by_len.rows):
        assert len(prompt) + row.num_generated <= 20
        if row.stop_reason != "eos":
            assert row.stop_reason == "max_length" and len(prompt) + row.num_generated == 20


def test_max_length_and_max_new_tokens_tie_reports_max_new_tokens(model):
    row = run(model, [[5, 6, 7]], max_new_tokens=5, max_length=8, add_eos_length=3, eos_token_id=95).rows[0]
    assert row.stop_reason == "eos" or (row.stop_reason, row.num_generated) == ("max_new_tokens", 5)


# 6. Early exit saves forwards and never changes tokens.
@pytest.mark.parametrize("width,refine_iter", [(2, 4), (4, 8), (8, 3)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_early_exit(model, width, refine_iter, use_cache):
    settings = dict(add_eos_length=width - 1, refine_iter=refine_iter, max_new_tokens=32, use_cache=use_cache)
    fast = run(model, PROMPTS_3, **settings)
    slow = run(model, PROMPTS_3, early_exit=False, **settings)
    assert tokens(fast) == tokens(slow)
    assert slow.forwards == slow.blocks * refine_iter
    if refine_iter > width:  # pass `width` already fixes every token, so the next one converges
        assert fast.forwards < fast.blocks * refine_iter
    assert fast.forwards <= slow.forwards


# 7. The reference loop (the original script's: no cache, no early exit).
@pytest.mark.parametrize("width,refine_iter", [(1, 1), (4, 2), (8, 1), (8, 3), (16, 2)])
def test_matches_the_reference_loop(model, width, refine_iter):
    for prompt in PROMPTS_3:
        (expected,), _ = reference_generate(
            model,
            torch.tensor([prompt]),
            eos=EOS,
            add_eos_length=width - 1,
            refine_iter=refine_iter,
            max_new_tokens=30,
        )
        row = run(model, [prompt], add_eos_length=width - 1, refine_iter=refine_iter, max_new_tokens=30).rows[0]
        assert (row.token_ids, row.stop_reason) == expected


# Statistics, sampling, the legacy call and argument checks.
def test_statistics_are_consistent(model):
    result = run(model, PROMPTS_3, add_eos_length=7, refine_iter=3, max_new_tokens=30)
    assert result.forwards == result.blocks + sum(result.refine_passes_per_block)
    assert all(0 <= r <= 2 for r in result.refine_passes_per_block)
    assert max(row.forwards for row in result.rows) == result.forwards
    assert result.tokens_per_forward == pytest.approx(result.generated_tokens / result.forwards)


def test_sampling_with_top_k_1_is_greedy_and_seeded_sampling_repeats(model):
    settings = dict(add_eos_length=7, refine_iter=2, max_new_tokens=24)
    greedy = tokens(run(model, PROMPTS_3, **settings))
    assert tokens(run(model, PROMPTS_3, temperature=0.7, top_k=1, seed=3, **settings)) == greedy
    first = tokens(run(model, PROMPTS_3, temperature=1.5, top_p=0.95, seed=11, **settings))
    assert tokens(run(model, PROMPTS_3, temperature=1.5, top_p=0.95, seed=11, **settings)) == first
    assert tokens(run(model, PROMPTS_3, temperature=1.5, top_p=0.95, seed=12, **settings)) != first


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sampling_with_min_p_1_keeps_only_the_most_likely_token(model, mode):
    settings = dict(MODES[mode], max_new_tokens=24, ignore_eos=True)
    greedy = tokens(run(model, PROMPTS_3, **settings))
    assert tokens(run(model, PROMPTS_3, temperature=2.0, seed=3, **settings)) != greedy, "hot sampling wanders"
    assert tokens(run(model, PROMPTS_3, temperature=2.0, min_p=1.0, seed=3, **settings)) == greedy


class RecordingStreamer:
    """What a transformers streamer is given: ``put`` tensors, then ``end``."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_streamer_gets_the_prompt_then_the_rows_tokens_then_end(model, mode):
    letters = LetterTokenizer()
    whole = letters.decode(
        run(model, PROMPTS_3[:1], max_new_tokens=30, ignore_eos=True, **MODES[mode]).rows[0].token_ids
    )
    for stop in ([], [whole[len(whole) // 2 :][:3]]):  # without, and with a stop string halfway
        streamer = RecordingStreamer()
        settings = dict(MODES[mode], max_new_tokens=30, ignore_eos=True, stop_strings=stop, tokenizer=letters)
        row = run(model, PROMPTS_3[:1], streamer=streamer, **settings).rows[0]
        assert streamer.puts[0] == [PROMPTS_3[0]] and streamer.ended == 1
        assert sum(streamer.puts[1:], []) == row.token_ids and row.stop_reason == (
            "stop_string" if stop else "max_new_tokens"
        )
    with pytest.raises(ValueError, match="A streamer takes one prompt"):
        run(model, PROMPTS_3, streamer=RecordingStreamer(), **MODES[mode])


def test_a_text_streamer_reads_the_text_it_reads_from_generate(tiny_dir):
    from transformers import TextIteratorStreamer

    from dllm_lit.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    ids = tokenizer("Once upon", return_tensors="pt").input_ids

    def streamed(call) -> str:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = threading.Thread(target=call, args=(streamer,))
        thread.start()
        text = "".join(streamer)
        thread.join()
        return text

    eos = tokenizer.eos_token_id
    ours = streamed(
        lambda s: generate_blocks(model, ids, lossless=True, max_new_tokens=20, eos_token_id=eos, streamer=s)
    )
    theirs = streamed(lambda s: model.generate(ids, do_sample=False, max_new_tokens=20, pad_token_id=eos, streamer=s))
    assert ours == theirs and ours


def test_extra_stop_tokens_end_a_row(model):
    settings = dict(add_eos_length=3, refine_iter=4, max_new_tokens=20)
    plain = run(model, PROMPTS_3[:1], **settings).rows[0]
    stop = plain.token_ids[5]
    first = plain.token_ids.index(stop)
    row = run(model, PROMPTS_3[:1], stop_token_ids=[stop], **settings).rows[0]
    assert (row.token_ids, row.stop_reason, row.stop_token_id) == (plain.token_ids[:first], "eos", stop)


class LetterTokenizer:
    """Token id i reads as one to three letters, so a stop string can span tokens and end inside one."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join("abcdefgh"[i % 8] * (1 + i % 3) for i in ids)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_stop_string_ends_a_row_after_the_fewest_tokens_that_hold_it(model, mode):
    settings = dict(MODES[mode], max_new_tokens=40, ignore_eos=True)
    letters = LetterTokenizer()
    plain = run(model, PROMPTS_3, **settings)
    texts = [letters.decode(row.token_ids) for row in plain.rows]
    stop = texts[1][len(texts[1]) // 2 :][:4]  # from the middle of row 1's text
    seen, streamed = {}, {0: [], 1: [], 2: []}

    def listen(row, new_ids, result):
        streamed[row] += new_ids
        if result is not None:
            seen[row] = (list(result.token_ids), result.stop_reason)  # as it reads when the listener sees it
        return False

    stopped = run(model, PROMPTS_3, stop_strings=[stop], tokenizer=letters, on_commit=listen, **settings)
    assert [seen[i] for i in range(3)] == [(r.token_ids, r.stop_reason) for r in stopped.rows], "the returned result"
    assert [streamed[i] for i in range(3)] == [r.token_ids for r in stopped.rows], "commits add up to the result"
    for plain_row, row, text in zip(plain.rows, stopped.rows, texts):
        if stop not in text:
            assert (row.token_ids, row.stop_reason) == (plain_row.token_ids, "max_new_tokens")
            continue
        shortest = next(n for n in range(1, 41) if stop in letters.decode(plain_row.token_ids[:n]))
        assert (row.token_ids, row.stop_reason, row.stop_token_id) == (
            plain_row.token_ids[:shortest],
            "stop_string",
            None,
        )
    assert stopped.rows[1].stop_reason == "stop_string" and stopped.forwards <= plain.forwards
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        run(model, PROMPTS_3, stop_strings=[stop], **settings)


def test_ignore_eos_runs_to_max_new_tokens_through_the_same_tokens(model):
    settings = dict(add_eos_length=3, refine_iter=4, max_new_tokens=40)
    prompts = random_prompts([6] * 12, seed=5)
    stopped = run(model, prompts, **settings).rows
    ignored = run(model, prompts, ignore_eos=True, **settings).rows
    assert any(r.stop_reason == "eos" for r in stopped)
    for stop, full in zip(stopped, ignored):
        assert (full.stop_reason, full.num_generated) == ("max_new_tokens", 40)
        ended = [stop.stop_token_id] if stop.stop_token_id is not None else []
        assert full.token_ids[: stop.num_generated] == stop.token_ids + ended


def test_iterative_generate_shape_and_list_of_eos_ids(model):
    ids, mask = left_pad(PROMPTS_3)
    out = iterative_generate(model, ids, [EOS, 7], 0, max_new_tokens=12, add_eos_length=3, attention_mask=mask)
    result = generate_blocks(
        model, ids, eos_token_id=[EOS, 7], attention_mask=mask, max_new_tokens=12, add_eos_length=3
    )
    assert out.dtype == torch.long and out.shape[0] == 3
    for row, full in zip(result.rows, out.tolist()):
        gen = full[ids.shape[1] :]
        n = row.num_generated
        assert gen[: len(row.token_ids)] == row.token_ids
        assert all(t == 0 for t in gen[n:])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(refine_iter=0), "refine_iter must be at least 1"),
        (dict(add_eos_length=-1), "add_eos_length must be at least 0, got -1."),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(eos_token_id=None), "eos_token_id is required"),
        (dict(max_length=5), "leaves no room under max_length=5"),
        (dict(input_ids=torch.zeros((1, 0), dtype=torch.long)), "Empty prompt"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0]])), "Right padding is not supported"),
        (dict(attention_mask=torch.tensor([[0, 0, 0, 0, 0]])), "Empty prompt"),
        (dict(attention_mask=torch.tensor([[1, 1]])), "does not match"),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), "must hold integer token ids, got dtype torch.float32"),
        (dict(input_ids=torch.tensor([[5, 100000]])), r"token id 100000, outside the model's vocabulary \(0\.\."),
        (dict(input_ids=torch.tensor([[-1, 5]]), attention_mask=torch.tensor([[0, 1]])), "token id -1, outside"),
    ],
)
def test_bad_arguments_raise_one_clear_sentence(change, message):
    model = MODELS["llama"]()
    kwargs = dict(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), eos_token_id=EOS, max_new_tokens=4)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        generate_blocks(model, **kwargs)


def test_a_settings_object_equals_flat_keywords_and_keywords_override_it(model):
    flat = run(model, PROMPTS_3, add_eos_length=5, refine_iter=3, max_new_tokens=20)
    settings = DecodeSettings(add_eos_length=5, refine_iter=3, max_new_tokens=20)
    ids, mask = left_pad(PROMPTS_3)
    assert tokens(generate_blocks(model, ids, settings, attention_mask=mask, eos_token_id=EOS)) == tokens(flat)
    overridden = generate_blocks(model, ids, settings.replace(refine_iter=1), attention_mask=mask, eos_token_id=EOS)
    assert tokens(overridden) == tokens(run(model, PROMPTS_3, add_eos_length=5, refine_iter=1, max_new_tokens=20))
    assert settings.refine_iter == 3, "settings are not changed by a call"


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(temperature=-0.5), ValueError, "temperature must be 0 \\(greedy\\) or above, got -0.5."),
        (dict(top_p=1.5), ValueError, "top_p must be above 0 and at most 1, got 1.5."),
        (dict(top_p=0.0), ValueError, "top_p must be above 0"),
        (dict(min_p=1.5), ValueError, "min_p must be between 0 and 1, got 1.5."),
        (dict(prompt_cache_mib=-1), ValueError, "prompt_cache_mib must be 0 \\(off\\) or more, got -1."),
        (dict(top_k=-1), ValueError, "top_k must be at least 0"),
        (dict(refine_iters=2), TypeError, "Unknown decoding setting\\(s\\): refine_iters."),
        (dict(stop_strings=["ok", ""]), ValueError, "stop_strings must be non-empty strings, got \\['ok', ''\\]."),
    ],
)
def test_bad_settings_raise_one_sentence(change, error, message):
    with pytest.raises(error, match=message):
        DecodeSettings().replace(**change)


# Streaming hook: what on_commit saw, concatenated, is the result; a cancelled row stops alone.


@pytest.mark.parametrize("mode", sorted(MODES))
def test_streamed_commits_add_up_to_the_result(model, mode):
    streamed, ends = {}, {}

    def listen(row, new_ids, result):
        streamed.setdefault(row, []).extend(new_ids)
        if result is not None:
            ends[row] = result
        return False

    result = run(model, PROMPTS_3, max_new_tokens=30, on_commit=listen, **MODES[mode])
    assert [streamed[i] for i in range(3)] == [row.token_ids for row in result.rows]
    assert [ends[i] for i in range(3)] == result.rows
    assert tokens(result) == tokens(run(model, PROMPTS_3, max_new_tokens=30, **MODES[mode]))


@pytest.mark.parametrize("mode", ["block", "block-compiled", "lossless"])
def test_a_cancelled_row_stops_and_the_others_do_not_change(model, mode):
    settings = dict(MODES[mode], max_new_tokens=30, ignore_eos=True)
    if mode == "lossless":
        settings["adaptive_window"] = False  # the adaptive window reads the whole batch's acceptance
    full = run(model, PROMPTS_3, **settings)
    cancelled = run(model, PROMPTS_3, on_commit=lambda row, ids, r: row == 1, **settings)
    assert cancelled.rows[1].stop_reason == "cancelled"
    assert 0 < cancelled.rows[1].num_generated < 30
    assert cancelled.rows[1].token_ids == full.rows[1].token_ids[: cancelled.rows[1].num_generated]
    assert tokens(cancelled)[::2] == tokens(full)[::2]
    if mode != "block-compiled":  # the compiled block loop keeps finished rows in the batch
        assert cancelled.forwards == full.forwards
