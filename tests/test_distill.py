"""`dllm_lit distill`: prompts, splits, the model's own answers, and resuming after an interruption."""

from __future__ import annotations

import json

import pytest
import torch

import dllm_lit.distill as distill_module
from dllm_lit.distill import distill, unique_prompts
from dllm_lit.settings import DecodeSettings

SETTINGS = DecodeSettings(max_new_tokens=16, stop_token_ids=(12,))  # the character ' ' stops answers early


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_are_distinct_and_the_held_out_split_never_overlaps():
    train = unique_prompts(500, seed=0)
    val = unique_prompts(100, seed=1, exclude=set(train))
    assert len(set(train)) == 500 and len(set(val)) == 100 and not set(train) & set(val)
    kinds = {p.split()[0] for p in train}
    assert {"Write", "What", "Explain", "List"} <= kinds, "many task kinds"
    assert unique_prompts(50, seed=0) == train[:50], "deterministic"


def test_distill_writes_the_models_own_answers_and_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_model, load_tokenizer

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    distill(tiny_dir, False, SETTINGS, out=str(whole), train=24, val=8, batch_size=8)
    err = capsys.readouterr().err  # not a terminal: progress lines, no carriage-return redraws
    assert "train: prompt 8/24 (33 %), " in err and "train: prompt 24/24 (100 %), " in err
    assert "val: prompt 8/8 (100 %), " in err and "\rtrain" not in err and "\rval" not in err
    calls = {"n": 0}
    real = distill_module.generate_blocks

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "generate_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_dir, False, SETTINGS, out=str(resumed), train=24, val=8, batch_size=8)
    assert 0 < len(rows(resumed / "train.jsonl")) < len(rows(whole / "train.jsonl")) + 1
    monkeypatch.setattr(distill_module, "generate_blocks", real)
    distill(tiny_dir, False, SETTINGS, out=str(resumed), train=24, val=8, batch_size=8)
    for name in ("train.jsonl", "val.jsonl"):
        assert rows(resumed / name) == rows(whole / name)
    train, val = rows(whole / "train.jsonl"), rows(whole / "val.jsonl")
    skipped = json.loads((whole / "train.skipped.json").read_text())
    assert len(train) + len(skipped) == 24 and train and val
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in val}

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    first = train[0]["messages"]
    ids = encode_prompt(tokenizer, {"messages": first[:1]}, True)
    stops = [tokenizer.eos_token_id, 12]
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=stops)
    answer = tokenizer.decode(greedy[0, len(ids) :].tolist(), skip_special_tokens=True).strip()
    assert answer == first[1]["content"], "the answer is the model's own greedy answer"

    with pytest.raises(ValueError, match="other settings"):
        distill(tiny_dir, False, SETTINGS, out=str(whole), train=25, val=8, batch_size=8)

    grown, earlier = tmp_path / "grown", [str(whole / "train.jsonl"), str(whole / "val.jsonl")]
    distill(tiny_dir, False, SETTINGS, out=str(grown), train=24, val=0, exclude=earlier, batch_size=8)
    drawn = {r["messages"][0]["content"] for r in rows(grown / "train.jsonl")}
    assert drawn and not drawn & {r["messages"][0]["content"] for r in train + val}, "the same seed, none reused"
    with pytest.raises(ValueError, match="other settings"):
        distill(tiny_dir, False, SETTINGS, out=str(grown), train=24, val=0, batch_size=8)


def test_answers_that_never_stop_are_one_clear_error(tiny_dir, tmp_path, capsys):
    never = DecodeSettings(max_new_tokens=2)  # the random tiny model does not say EOS within 2 tokens
    message = r"Every train prompt was skipped \(no EOS within 2 tokens\): raise --model.max_new_tokens."
    with pytest.raises(ValueError, match=message):
        distill(tiny_dir, False, never, out=str(tmp_path / "d"), train=4, val=2, batch_size=4)
    assert "0 rows" in capsys.readouterr().err
    gated = dict(gate_model=tiny_dir, max_gate_nll=0.0, keep_unfinished=True)  # no answer scores 0 nats
    with pytest.raises(ValueError, match=r"skipped \(over --max_gate_nll 0.0\): raise --max_gate_nll."):
        distill(tiny_dir, False, never, out=str(tmp_path / "g"), train=4, val=2, batch_size=4, **gated)


def test_unfinished_answers_are_kept_when_asked_as_the_models_own_greedy_prefix(tiny_dir, tmp_path, capsys):
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_model, load_tokenizer

    never = DecodeSettings(max_new_tokens=2)  # the random tiny model does not say EOS within 2 tokens
    distill(tiny_dir, False, never, out=str(tmp_path / "d"), train=6, val=2, batch_size=4, keep_unfinished=True)
    assert "(0 prompts skipped)" in capsys.readouterr().err
    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    kept = rows(tmp_path / "d" / "train.jsonl")
    assert kept and all(row["finished"] is False for row in kept)
    for row in kept:
        ids = encode_prompt(tokenizer, {"messages": row["messages"][:1]}, True)
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)
        answer = tokenizer.decode(greedy[0, len(ids) :].tolist(), skip_special_tokens=True).strip()
        assert row["messages"][1]["content"] == answer


def test_the_gate_leaves_out_exactly_the_answers_the_gate_model_finds_unlikely(tiny_dir, tmp_path, capsys):
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_model, load_tokenizer

    distill(tiny_dir, False, SETTINGS, out=str(tmp_path / "all"), train=24, val=0, batch_size=8)
    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir).eval()
    scores = {}
    for row in rows(tmp_path / "all" / "train.jsonl"):  # the oracle: generate, then transformers' shifted loss
        prompt = encode_prompt(tokenizer, {"messages": row["messages"][:1]}, True)
        stops = [tokenizer.eos_token_id, 12]
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=stops)
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad():
            scores[row["messages"][0]["content"]] = model(ids, labels=labels).loss.item()
    ordered = sorted(scores.values())  # a threshold halfway between two scores: batched scoring differs by ~1e-5
    threshold = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    gated = tmp_path / "gated"
    distill(
        tiny_dir,
        False,
        SETTINGS,
        out=str(gated),
        train=24,
        val=0,
        batch_size=8,
        gate_model=tiny_dir,
        max_gate_nll=threshold,
    )
    kept = {row["messages"][0]["content"] for row in rows(gated / "train.jsonl")}
    assert kept == {prompt for prompt, score in scores.items() if score <= threshold}
    assert 0 < len(kept) < len(scores) and "or over --max_gate_nll" in capsys.readouterr().err


@pytest.mark.slow
def test_magpie_samples_distinct_user_turns_from_the_embedded_models_user_prefix(capsys):
    from dllm_lit.distill import magpie_prompts
    from dllm_lit.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer("smollm2"), load_model("smollm2").eval()
    turns = magpie_prompts(model, tokenizer, 6, seed=0, batch_size=3)
    assert turns and len(set(turns)) == len(turns) and all(10 <= len(turn) <= 300 for turn in turns)
    assert "magpie: turn 3/6 (50 %)" in capsys.readouterr().err
    assert magpie_prompts(model, tokenizer, 6, seed=0, batch_size=3) == turns, "seeded"
