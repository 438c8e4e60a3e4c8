"""`dllm_lit evaluate` and its lm-eval model. Oracles: `dllm_lit predict` on the same prompts, and
log-probabilities computed directly with the model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, assert_one_line_error, write
from dllm_lit import cli

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from dllm_lit.lm_eval_model import DllmLM  # noqa: E402

SETTINGS = dict(add_eos_length=3, refine_iter=2)


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return DllmLM(tiny_dir, batch_size=2, device="cpu", **SETTINGS)


def request(kind: str, args: tuple, index: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=index, metadata=("task", index, 1))


def predicted(tiny_dir: str, tmp_path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """`dllm_lit predict` on plain prompts with the same settings."""
    source = write(tmp_path / "p.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    cli.main(
        [
            "predict",
            f"--model.model_name_or_path={tiny_dir}",
            *(f"--model.{name}={value}" for name, value in SETTINGS.items()),
            f"--model.max_new_tokens={max_new_tokens}",
            f"--data.prompts_file={source}",
            f"--writer.output_file={out}",
        ]
    )
    return [json.loads(line)["response"] for line in out.read_text().splitlines()]


def test_generate_until_equals_predict_and_cuts_at_stop_sequences(lm, tiny_dir, tmp_path):
    prompts = ["12+34=", "What is the capital of France?", "a", "Name three colors, please."]
    expected = predicted(tiny_dir, tmp_path, prompts, 20)
    plain = lm.generate_until([request("generate_until", (p, {"max_gen_toks": 20})) for p in prompts])
    assert plain == expected
    stops = [text[3:5] for text in expected]
    stopped = lm.generate_until(
        [request("generate_until", (p, {"until": [s], "max_gen_toks": 20})) for p, s in zip(prompts, stops)]
    )
    assert stopped == [text.split(stop)[0] for text, stop in zip(expected, stops)]
    assert all(len(s) < len(t) for s, t in zip(stopped, expected))
    assert lm.stats["task"]["requests"] == 8 and lm.stats["task"]["forwards"] > 0


def test_few_shot_prompts_reuse_their_shared_examples_and_answer_as_predict(tiny_dir, tmp_path):
    shots = "Q: 1+1=\nA: 2\nQ: 2+3=\nA: 5\nQ: "
    prompts = [shots + q for q in ("12+34=\nA:", "7+8=\nA:", "5+5=\nA:", "9+9=\nA:")]  # two batches of two
    lm = DllmLM(tiny_dir, batch_size=2, device="cpu", prompt_cache_mib=64, **SETTINGS)
    answers = lm.generate_until([request("generate_until", (p, {"max_gen_toks": 12})) for p in prompts])
    assert answers == predicted(tiny_dir, tmp_path, prompts, 12)
    stats, shared = (
        lm.decoding_statistics()["task"],
        len(shots) + 1,
    )  # the character tokenizer's BOS, then one a character
    assert stats["prompt_tokens"] == sum(len(p) + 1 for p in prompts) and stats["cached_prompt_tokens"] >= 2 * shared


def direct_logprob(model, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    total = sum(float(logprobs[p, t]) for p, t in zip(positions, continuation_ids))
    greedy = all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation_ids))
    return total, greedy


def test_a_tasks_sampling_arguments_reach_the_engine_only_when_it_samples_and_its_repetition_penalty_always(lm):
    task = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "until": ["\n"], "max_gen_toks": 7}
    sampled, until = lm._settings_for({**task, "do_sample": True})
    chosen = (sampled.temperature, sampled.top_k, sampled.top_p, sampled.min_p, sampled.max_new_tokens)
    assert chosen == (0.7, 40, 0.9, 0.05, 7) and "\n" in until
    greedy, _ = lm._settings_for({**task, "do_sample": False})
    assert (greedy.temperature, greedy.top_k, greedy.top_p, greedy.min_p) == (0.0, None, None, None)
    penalized, _ = lm._settings_for({**task, "do_sample": False, "repetition_penalty": 1.2})
    assert (penalized.temperature, penalized.repetition_penalty) == (0.0, 1.2)


def test_loglikelihood_equals_a_direct_computation(lm):
    """The character tokenizer splits context and continuation unambiguously, mid-word included; the
    context starts with BOS, as the tokenizer (and `predict`) encode prompts."""
    pairs = [("The cat sat on the", " mat"), ("hel", "lo world"), ("12+34=", "46"), ("x", "y")]
    scores = lm.loglikelihood([request("loglikelihood", pair, i) for i, pair in enumerate(pairs)])
    encode = lm.tokenizer
    for (context, continuation), (logprob, greedy) in zip(pairs, scores):
        c, n = encode(context).input_ids, encode(continuation, add_special_tokens=False).input_ids
        expected, expected_greedy = direct_logprob(lm.model, c, n)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy


def test_loglikelihood_rolling_equals_a_direct_computation(lm):
    """lm-eval's convention: every token of the encoded text (BOS included), each given the ones
    before it, the first given the prefix token (BOS, else EOS)."""
    text = "Block decoding fills many tokens per pass."
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    prefix = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    expected, _ = direct_logprob(lm.model, [prefix], lm.tokenizer(text).input_ids)
    assert rolling == pytest.approx(expected, abs=1e-3)


def test_lm_eval_s_chat_prompts_go_through_the_chat_template_given(tiny_dir, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    given = DllmLM(tiny_dir, batch_size=1, device="cpu", chat_template=str(write(tmp_path / "t.jinja", template)))
    chat = [{"role": "user", "content": "2+2="}]
    assert given.apply_chat_template(chat) == "[user] 2+2=\n[assistant]"
    assert DllmLM(tiny_dir, batch_size=1, device="cpu").apply_chat_template(chat) == "<s><|user|>2+2=\n<|assistant|>"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_evaluate_on_the_shipped_tasks(dllm_lit, tiny_dir, tmp_path, model):
    name = tiny_dir if model == "tiny" else "smollm2"
    out = tmp_path / "eval"
    done = dllm_lit(
        [
            "evaluate",
            f"--model.model_name_or_path={name}",
            "--model.lossless=true",
            "--model.add_eos_length=3",
            f"--include_path={ROOT / 'examples/eval_tasks'}",
            "--tasks=dllm_arith,dllm_arith_choice",
            "--limit=6",
            "--log_samples=true",
            f"--output_dir={out}",
        ],
        tmp_path,  # the tasks find their data from any working directory
        env={"HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "exact_match,first-number" in results["results"]["dllm_arith"]
    assert "acc,none" in results["results"]["dllm_arith_choice"]
    stats = results["dllm_lit"]["statistics"]["dllm_arith"]
    assert stats["requests"] == 6 and stats["tokens_per_forward"] >= 1.0
    assert results["dllm_lit"]["decoding"]["lossless"] is True
    assert len((out / "samples_dllm_arith.jsonl").read_text().splitlines()) == 6
    assert "tokens/forward" in done.stdout and "exact_match" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--tasks=no_such_task"], "Unknown lm-eval task(s): no_such_task"),
        (["--tasks=dllm_arith", "--include_path=/nonexistent"], "is not a directory"),
        (["--tasks=gsm8k", "--limit=1"], "Couldn't reach 'openai/gsm8k' on the Hub"),
    ],
)
def test_bad_evaluate_flags_are_one_line(dllm_lit, tmp_path, args, fragment):
    out = f"--output_dir={tmp_path / 'eval'}"
    env = {"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}  # no gsm8k cached
    done = dllm_lit(["evaluate", "--model.model_name_or_path=tiny-char", out, *args], tmp_path, env=env)
    assert_one_line_error(done, fragment)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--limit=0"], "--limit must be above 0"),
        (["--num_fewshot=-1"], "--num_fewshot must be at least 0, got -1."),
        (["--batch_size=0"], "--batch_size must be at least 1, got 0."),
        (["--limit=2"], "holds an earlier run's results: pass --overwrite true"),
    ],
)
def test_evaluate_refuses_bad_counts_and_keeps_earlier_results(dllm_lit_here, tmp_path, args, fragment):
    earlier = tmp_path / "results.json"
    earlier.write_text('{"earlier": true}')
    task = [f"--include_path={ROOT / 'examples/eval_tasks'}", "--tasks=dllm_arith", f"--output_dir={tmp_path}"]
    done = dllm_lit_here(["evaluate", "--model.model_name_or_path=tiny-char", *task, *args], tmp_path)
    assert_one_line_error(done, fragment)
    assert earlier.read_text() == '{"earlier": true}'


def test_an_interrupted_evaluation_resumes_from_the_answers_it_kept_to_the_results_of_one_run(
    dllm_lit_here, tmp_path, monkeypatch
):
    tasks = [f"--include_path={ROOT / 'examples/eval_tasks'}", "--tasks=dllm_arith,dllm_arith_choice", "--limit=4"]
    args = ["evaluate", "--model.model_name_or_path=tiny-char", "--model.add_eos_length=3", *tasks, "--batch_size=2"]
    assert dllm_lit_here([*args, f"--output_dir={tmp_path / 'whole'}"], tmp_path).returncode == 0
    whole = json.loads((tmp_path / "whole/results.json").read_text())
    decode, batches = DllmLM._decode, []

    def interrupted(self, jobs):  # Ctrl-C during the second batch of generations
        if batches:
            raise KeyboardInterrupt
        batches.append(len(jobs))
        return decode(self, jobs)

    monkeypatch.setattr(DllmLM, "_decode", interrupted)
    cut = [*args, f"--output_dir={tmp_path / 'cut'}"]
    stopped = dllm_lit_here(cut, tmp_path)
    assert stopped.returncode == 130 and "answers are kept; --resume true finishes the run." in stopped.stderr
    monkeypatch.setattr(DllmLM, "_decode", decode)
    assert_one_line_error(dllm_lit_here(cut, tmp_path), "holds the answers of an interrupted run: pass --resume true")
    other = dllm_lit_here([*cut, "--model.add_eos_length=2", "--resume=true"], tmp_path)
    assert_one_line_error(other, "Cannot resume the evaluation in", "add_eos_length 3 -> 2")
    resumed = dllm_lit_here([*cut, "--resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    finished = json.loads((tmp_path / "cut/results.json").read_text())
    assert finished["results"] == whole["results"], "the same scores as one uninterrupted run"
    kept = finished["dllm_lit"]["resumed_answers"]
    assert kept >= 2 and finished["dllm_lit"]["statistics"]["dllm_arith"]["requests"] == 4 - batches[0]
    assert not list((tmp_path / "cut").glob(".*")), "the kept answers go once the results are written"
    assert_one_line_error(dllm_lit_here([*cut, "--resume=true"], tmp_path), "its results.json is complete")


def test_every_rank_s_kept_answers_read_back_without_a_line_a_kill_cut_and_never_from_an_unreadable_file(tmp_path):
    from dataclasses import asdict

    from dllm_lit.answer_log import AnswerLog
    from dllm_lit.outputs import OutputError, run_fingerprint
    from dllm_lit.settings import DecodeSettings

    folder = tmp_path / ".results.json.parts"
    fingerprint = run_fingerprint([], data={}, decoding=asdict(DecodeSettings()), model={"name": "m"})
    log, other = AnswerLog(folder, fingerprint), AnswerLog(folder, fingerprint, rank=1)  # two ranks
    log.add_partial("loglikelihood", ("2+2=", "4"), (-0.5, True))
    other.add_partial("generate_until", ("Q", {"until": ["\n"]}), "A")
    log.close()
    other.close()
    log.path.write_text(log.path.read_text() + '{"key": "cut', encoding="utf-8")
    again = AnswerLog(folder, fingerprint, resume=True)  # one rank now: it reads both files
    asked = []
    questions = [request("loglikelihood", ("2+2=", "4")), request("loglikelihood", ("1+1=", "2"))]
    answers = again.answered("loglikelihood", questions, lambda rest: asked.extend(rest) or [(-1.0, False)])
    assert answers == [(-0.5, True), (-1.0, False)] and asked == questions[1:] and again.resumed == 2
    again.close()
    other.path.write_text("garbage\n", encoding="utf-8")
    with pytest.raises(OutputError, match="are unreadable; pass --overwrite true"):
        AnswerLog(folder, fingerprint, resume=True)


def samples(folder, task: str) -> dict:
    """Each document's prompt and answers in a run's ``samples_<task>.jsonl``."""
    rows = [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]
    return {row["doc_id"]: (row["arguments"], row["resps"]) for row in rows}


@pytest.mark.slow
def test_two_processes_under_torchrun_answer_and_score_as_one(dllm_lit, tmp_path):
    tasks = [f"--include_path={ROOT / 'examples/eval_tasks'}", "--tasks=dllm_arith,dllm_arith_choice", "--limit=6"]
    args = ["evaluate", "--model.model_name_or_path=tiny-char", *tasks, "--num_fewshot=0", "--log_samples=true"]
    env = {"HF_DATASETS_OFFLINE": "1"}
    one = dllm_lit([*args, f"--output_dir={tmp_path / 'one'}"], tmp_path, env=env)
    ranks = ["--standalone", "--nproc_per_node=2", "-m", "dllm_lit.cli"]
    two = dllm_lit(
        [*ranks, *args, f"--output_dir={tmp_path / 'two'}"], tmp_path, env=env, module="torch.distributed.run"
    )
    assert one.returncode == two.returncode == 0, two.stderr[-3000:]
    alone, shared = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert alone["results"] == shared["results"]
    assert samples(tmp_path / "one", "dllm_arith") == samples(tmp_path / "two", "dllm_arith")
    scored = [samples(tmp_path / name, "dllm_arith_choice") for name in ("one", "two")]
    assert scored[0].keys() == scored[1].keys()
    for doc, (prompts, scores) in scored[0].items():  # batched otherwise: the same to 1e-6
        other = scored[1][doc][1]
        assert prompts == scored[1][doc][0] and [greedy for ((_, greedy),) in scores] == [g for ((_, g),) in other]
        assert [logprob for ((logprob, _),) in scores] == pytest.approx([p for ((p, _),) in other], abs=1e-4)
    counts = ("requests", "prompt_tokens", "generated_tokens", "forwards")
    assert [shared["dllm_lit"]["statistics"]["dllm_arith"][name] for name in counts] == [
        alone["dllm_lit"]["statistics"]["dllm_arith"][name] for name in counts
    ], "every rank's statistics, summed"
    assert two.stdout.count("| dllm_arith |") == 1, "rank 0 alone prints the tables"
    assert not list((tmp_path / "two").glob(".*")), "every rank's kept answers go at the end"


def test_a_system_instruction_and_generation_arguments_reach_every_request(dllm_lit_here, tmp_path):
    tasks = [f"--include_path={ROOT / 'examples/eval_tasks'}", "--tasks=dllm_arith", "--limit=3", "--log_samples=true"]
    extra = ["--system_instruction=Add.", '--gen_kwargs={"max_gen_toks": 3, "until": ["#"]}']
    args = ["evaluate", "--model.model_name_or_path=tiny-char", *tasks, *extra, f"--output_dir={tmp_path}"]
    assert dllm_lit_here(args, tmp_path).returncode == 0
    rows = samples(tmp_path, "dllm_arith").values()
    assert all(prompt.startswith("Add.") and kwargs["max_gen_toks"] == 3 for (((prompt, kwargs),), _) in rows)
    stats = json.loads((tmp_path / "results.json").read_text())["dllm_lit"]["statistics"]["dllm_arith"]
    assert stats["requests"] == 3 and stats["generated_tokens"] <= 9
