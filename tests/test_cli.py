"""The product as users touch it: the `dllm_lit` CLI, the demo flags, the writer and precision.

Oracles: the engine called directly on the same model, one-by-one runs, one-process runs.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import assert_one_line_error, save_without_template, write
from dllm_lit import cli, demo, generate_blocks
from dllm_lit.data import DataModule, PromptError
from dllm_lit.models import load_model, load_tokenizer
from dllm_lit.module import BlockRefineLM
from dllm_lit.summary import RULE

PROMPTS = ["What is 2+2?", "Name a color.", "x", "A much longer prompt about the weather and the sea.", "Count: 1 2 3"]
GEN = ["--model.add_eos_length=3", "--model.refine_iter=2", "--model.max_new_tokens=24"]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n  \n" + "\n".join(PROMPTS[2:]) + "\n")
    return path


def run_cli(args: list[str]) -> None:
    cli.main(args)


def expected_response(model_dir: str, prompt: str, *, chat: bool = False, **settings) -> tuple[int, int, str]:
    """The oracle: the engine called directly, one prompt at a time."""
    tokenizer = load_tokenizer(model_dir)
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    row = generate_blocks(load_model(model_dir), ids, eos_token_id=tokenizer.eos_token_id, **settings).rows[0]
    return ids.shape[1], len(row.token_ids), tokenizer.decode(row.token_ids, skip_special_tokens=True)


def test_single_prompt_prints_the_legacy_layout(tiny_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(["predict", f"--model.model_name_or_path={tiny_dir}", "--data.prompt=What is 2+2?", *GEN])
    out = capsys.readouterr().out
    length, n_response, response = expected_response(
        tiny_dir, "What is 2+2?", add_eos_length=3, refine_iter=2, max_new_tokens=24
    )
    expected = "\n".join(
        [
            RULE,
            "Generated 1 responses",
            RULE,
            "",
            "--- Example 1 ---",
            f"Prompt ({length} tokens):",
            "What is 2+2?",
            "",
            f"Response ({n_response} tokens):",
            response,
            "",
            RULE,
        ]
    )
    assert expected in out
    assert not list(tmp_path.iterdir()), "predict must not litter the working directory"


def test_prompts_file_batches_jsonl_in_input_order(tiny_dir, prompts_file, tmp_path, capsys):
    output = tmp_path / "out" / "results.jsonl"
    args = [
        "predict",
        f"--model.model_name_or_path={tiny_dir}",
        f"--data.prompts_file={prompts_file}",
        "--data.batch_size=2",
        f"--writer.output_file={output}",
        "--summary.max_display=2",
        *GEN,
    ]
    run_cli(args)
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        expected = expected_response(tiny_dir, row["prompt"], add_eos_length=3, refine_iter=2, max_new_tokens=24)
        assert (row["prompt_length"], row["response_length"], row["response"]) == expected
        assert row["stop_reason"] in ("eos", "max_new_tokens")
        assert row["forwards"] >= 1 and row["tokens_per_forward"] > 0
        assert row["response_length"] <= 24
    assert "Generated 5 responses" in out and "--- Example 2 ---" in out and "--- Example 3 ---" not in out
    assert "... and 3 more" in out
    with pytest.raises(SystemExit):  # an existing output is never replaced unless asked
        run_cli(args)
    assert "--writer.overwrite true" in capsys.readouterr().err
    run_cli([*args, "--writer.overwrite=true"])  # a rerun replaces it, without duplicates
    assert [json.loads(line) for line in output.read_text().splitlines()] == rows


@pytest.mark.parametrize(
    "flag", ["--data.prompts_file={file}", "--data.prompts=[second, third]", "--data.prompt=second"]
)
def test_a_prompt_source_on_the_command_line_replaces_the_configs(tiny_dir, tmp_path, flag):
    config = write(tmp_path / "c.yaml", f"model:\n  model_name_or_path: {tiny_dir}\ndata:\n  prompt: first\n")
    file, out = write(tmp_path / "p.txt", "second\nthird\n"), tmp_path / "out.jsonl"
    run_cli(["predict", f"--config={config}", *GEN, flag.format(file=file), f"--writer.output_file={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    wanted = ["second"] if flag.startswith("--data.prompt=") else ["second", "third"]
    assert [row["prompt"] for row in rows] == wanted
    assert (
        rows[0]["response"]
        == expected_response(tiny_dir, "second", add_eos_length=3, refine_iter=2, max_new_tokens=24)[2]
    )


def test_json_output_is_one_array_and_extra_fields_pass_through(tiny_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(
        json.dumps({"prompt": "1+1=", "answer": "2", "id": "a"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2="}], "answer": "4"})
        + "\n"
    )
    output = tmp_path / "results.json"
    run_cli(
        [
            "predict",
            f"--model.model_name_or_path={tiny_dir}",
            f"--data.prompts_file={source}",
            f"--writer.output_file={output}",
            *GEN,
        ]
    )
    rows = json.loads(output.read_text())
    assert isinstance(rows, list) and len(rows) == 2
    assert rows[0]["answer"] == "2" and rows[0]["id"] == "a" and rows[1]["answer"] == "4"
    assert rows[1]["prompt"] == "2+2="
    *_, chat_response = expected_response(
        tiny_dir, "2+2=", chat=True, add_eos_length=3, refine_iter=2, max_new_tokens=24
    )
    assert rows[1]["response"] == chat_response


def test_chat_template_has_one_bos(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    data = DataModule(prompt="Hi there", use_chat_template=True, model_name_or_path=tiny_dir)
    data.setup("predict")
    ids = data.datasets["predict"][0]["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids) == "<s><|user|>Hi there\n<|assistant|>"


def rows_file(tmp_path: Path, rows: list[dict]) -> str:
    return str(write(tmp_path / "rows.jsonl", "".join(json.dumps(row) + "\n" for row in rows)))


def test_chat_rows_may_continue_the_last_message_and_set_template_variables(tiny_dir, tmp_path):
    turns = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "It is"}]
    rows = [
        {"messages": turns, "continue_final_message": True},
        {"messages": turns},  # the assistant's message is the reference answer
        {"messages": turns[:1], "chat_template_kwargs": {"enable_thinking": False}},
    ]
    data = DataModule(prompts_file=rows_file(tmp_path, rows), model_name_or_path=tiny_dir)
    data.setup("predict")
    tokenizer, items = load_tokenizer(tiny_dir), sorted(data.datasets["predict"], key=lambda item: item["index"])
    continued, answered, unthinking = (tokenizer.decode(item["input_ids"]) for item in items)
    complete = tokenizer.apply_chat_template(turns, tokenize=False)
    assert complete.startswith(continued) and continued.endswith("<|assistant|>It is")
    assert answered == tokenizer.apply_chat_template(turns[:1], add_generation_prompt=True, tokenize=False)
    assert unthinking != answered and unthinking.replace("<|system|>/no_think\n", "") == answered


def test_data_template_variables_go_under_each_row_s_own(tiny_dir, tmp_path):
    hi = [{"role": "user", "content": "hi"}]
    rows = [{"messages": hi}, {"messages": hi, "chat_template_kwargs": {"enable_thinking": True}}, {"prompt": "hi"}]
    source = rows_file(tmp_path, rows)
    data = DataModule(prompts_file=source, chat_template_kwargs={"enable_thinking": False}, model_name_or_path=tiny_dir)
    data.setup("predict")
    tokenizer, items = load_tokenizer(tiny_dir), sorted(data.datasets["predict"], key=lambda item: item["index"])
    unthinking, own, plain = (tokenizer.decode(item["input_ids"]) for item in items)
    assert unthinking == "<s><|system|>/no_think\n<|user|>hi\n<|assistant|>" and own == "<s><|user|>hi\n<|assistant|>"
    assert plain == "<s>hi", "a plain prompt has no template"
    with pytest.raises(PromptError, match="chat_template_kwargs cannot set 'tools'"):
        DataModule(prompts_file=source, chat_template_kwargs={"tools": []}, model_name_or_path=tiny_dir)


@pytest.mark.parametrize(
    "row,fragment",
    [
        ({"continue_final_message": True}, "Prompt 0: continue_final_message needs a last message from the assistant"),
        (
            {"continue_final_message": True, "add_generation_prompt": True, "assistant": True},
            "set add_generation_prompt",
        ),
        ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "cannot set 'chat_template'"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "must be an object"),
        ({"add_generation_prompt": "yes"}, "must be true or false"),
    ],
)
def test_bad_template_fields_are_one_sentence(tiny_dir, tmp_path, row, fragment):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    row = {"messages": turns if row.pop("assistant", False) else turns[:1], **row}
    data = DataModule(prompts_file=rows_file(tmp_path, [row]), model_name_or_path=tiny_dir)
    with pytest.raises(PromptError, match=re.escape(fragment)):
        data.setup("predict")


def test_a_template_that_refuses_the_messages_is_one_sentence(tiny_dir):
    from dllm_lit.data import encode_prompt

    tokenizer = load_tokenizer(tiny_dir)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Start with a user.') }}{% endif %}"
    )
    with pytest.raises(PromptError, match=r"^The chat template cannot render these messages: Start with a user\.$"):
        encode_prompt(tokenizer, {"messages": [{"role": "assistant", "content": "x"}]}, True)


def test_chat_template_missing_is_a_clear_error(tiny_dir, tmp_path, capsys):
    plain = save_without_template(tmp_path / "no_template")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["predict", f"--model.model_name_or_path={plain}", "--data.prompt=hi", "--data.use_chat_template=true"])
    assert exit_info.value.code == 2
    assert "has no chat template" in capsys.readouterr().err


def test_a_chat_template_given_as_a_file_or_as_text_replaces_the_tokenizer_s(tiny_dir, tmp_path):
    plain = str(save_without_template(tmp_path / "no_template"))
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    given = write(tmp_path / "t.jinja", template)
    for source in (str(given), template):
        data = DataModule(prompt="2+2=", use_chat_template=True, chat_template=source, model_name_or_path=plain)
        data.setup("predict")
        assert load_tokenizer(plain).decode(data.datasets["predict"][0]["input_ids"]) == "[user] 2+2=\n[assistant]"


@pytest.mark.parametrize(
    "given,fragment",
    [
        ("templates/none.jinja", "chat_template 'templates/none.jinja' is neither a file nor a Jinja template."),
        ("{% for m in messages %}{{ m }}", "The chat template does not parse (line 1: Unexpected end of template."),
    ],
)
def test_a_bad_chat_template_is_one_sentence(tiny_dir, given, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        load_tokenizer(tiny_dir, chat_template=given)


def test_demo_flags_equal_the_cli(tiny_dir, prompts_file, tmp_path):
    """Both sides use the compiled path; the oracle is the eager engine."""
    legacy = tmp_path / "demo.jsonl"
    demo.main(
        [
            "--model_path",
            tiny_dir,
            "--prompts_file",
            str(prompts_file),
            "--batch_size",
            "2",
            "--output_file",
            str(legacy),
            "--max_display",
            "1",
            "--use_chat_template",
            "--add_eos_length",
            "5",
            "--refine_iter",
            "3",
            "--max_new_tokens",
            "20",
            "--max_length",
            "60",
            "--backend",
            "cuda_graph",
        ]
    )
    native = tmp_path / "native.jsonl"
    run_cli(
        [
            "predict",
            f"--model.model_name_or_path={tiny_dir}",
            f"--data.prompts_file={prompts_file}",
            "--data.batch_size=2",
            f"--writer.output_file={native}",
            "--data.use_chat_template=true",
            "--model.add_eos_length=5",
            "--model.refine_iter=3",
            "--model.max_new_tokens=20",
            "--model.max_length=60",
            "--model.backend=cuda_graph",
        ]
    )
    rows = [json.loads(line) for line in legacy.read_text().splitlines()]
    legacy_only = [(row.pop("full_text"), row.pop("total_length")) for row in rows]  # the original's fields
    assert rows == [json.loads(line) for line in native.read_text().splitlines()]
    *_, response = expected_response(
        tiny_dir, PROMPTS[3], chat=True, add_eos_length=5, refine_iter=3, max_new_tokens=20, max_length=60
    )
    assert rows[3]["response"] == response
    for row, (full_text, total_length) in zip(rows, legacy_only):
        assert total_length == row["prompt_length"] + row["response_length"]
        assert full_text.startswith(row["prompt"]) and full_text.endswith(row["response"])


@pytest.mark.parametrize(
    "precision,dtype",
    [
        ("32-true", torch.float32),
        ("bf16-true", torch.bfloat16),
        ("16-true", torch.float16),
        ("bf16-mixed", torch.float32),
    ],
)
def test_precision_sets_the_weight_dtype(tiny_dir, precision, dtype):
    module = BlockRefineLM(model_name_or_path=tiny_dir, add_eos_length=3, max_new_tokens=8)
    data = DataModule(prompts=PROMPTS[:2], model_name_or_path=tiny_dir)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False)
    rows = trainer.predict(module, datamodule=data)
    assert {p.dtype for p in module.model.parameters()} == {dtype}
    assert sorted(r["index"] for batch in rows for r in batch.rows) == [0, 1]
    model = module.model
    module.configure_model()
    assert module.model is model, "configure_model must be idempotent"


@pytest.mark.slow
def test_two_cpu_processes_equal_one(tiny_dir, tmp_path, dllm_lit, dllm_lit_here):
    """The one-process run is this process; the two-process runs (predict, the legacy front end) are
    the commands."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS + ["one more", "and the seventh"]) + "\n")
    common = [
        "predict",
        f"--model.model_name_or_path={tiny_dir}",
        f"--data.prompts_file={prompts}",
        "--data.batch_size=2",
        "--trainer.accelerator=cpu",
        *GEN,
    ]
    one = dllm_lit_here([*common, f"--writer.output_file={tmp_path / 'one.jsonl'}"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = dllm_lit(
        [*common, "--trainer.devices=2", "--trainer.strategy=ddp", f"--writer.output_file={tmp_path / 'two.jsonl'}"],
        tmp_path,
    )
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 7
    assert two.stdout.count("Generated 7 responses") == 1
    legacy = ["--model_path", str(tiny_dir), "--prompts_file", str(prompts), "--batch_size", "2", "--device", "cpu"]
    legacy += ["--add_eos_length", "3", "--refine_iter", "2", "--max_new_tokens", "24", "--devices", "2"]
    demo_two = dllm_lit([*legacy, "--output_file", str(tmp_path / "demo.jsonl")], tmp_path, module="dllm_lit.demo")
    assert demo_two.returncode == 0, demo_two.stderr  # each other process re-reads the legacy flags
    responses = [
        [json.loads(line)["response"] for line in (tmp_path / name).read_text().splitlines()]
        for name in ("one.jsonl", "demo.jsonl")
    ]
    assert responses[1] == responses[0]


def test_predict_ends_responses_before_a_stop_string(tiny_dir, tmp_path):
    plain, stopped = tmp_path / "plain.jsonl", tmp_path / "stopped.jsonl"
    common = ["predict", f"--model.model_name_or_path={tiny_dir}", f"--data.prompts={json.dumps(PROMPTS)}", *GEN]
    run_cli([*common, f"--writer.output_file={plain}", "--model.ignore_eos=true"])
    texts = [json.loads(line)["response"] for line in plain.read_text().splitlines()]
    stop = texts[0][5:8]
    run_cli(
        [
            *common,
            f"--writer.output_file={stopped}",
            "--model.ignore_eos=true",
            f"--model.stop_strings={json.dumps([stop])}",
        ]
    )
    rows = [json.loads(line) for line in stopped.read_text().splitlines()]
    for text, row in zip(texts, rows):
        expected = (text[: text.index(stop)], "stop_string") if stop in text else (text, "max_new_tokens")
        assert (row["response"], row["stop_reason"]) == expected
    assert rows[0]["stop_reason"] == "stop_string"


@pytest.mark.parametrize(("given", "expected"), [("Question:", ("Question:",)), ('["a b", "\\n\\n"]', ("a b", "\n\n"))])
def test_stop_strings_take_one_string_or_a_list(given, expected, tiny_dir, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["dllm_lit", "--model.model_name_or_path", tiny_dir, "--model.stop_strings", given]
    )
    assert cli.DllmCLI(run=False).model.decoding.stop_strings == expected


def test_json_suffix_in_capitals_writes_an_array(tiny_dir, tmp_path):
    output = tmp_path / "results.JSON"
    run_cli(
        [
            "predict",
            f"--model.model_name_or_path={tiny_dir}",
            "--data.prompts=[a, b]",
            f"--writer.output_file={output}",
            *GEN,
        ]
    )
    assert [row["prompt"] for row in json.loads(output.read_text())] == ["a", "b"]


def test_text_with_a_byte_order_mark_and_csv_rows_read_as_written(tiny_dir, tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufefffirst prompt\nsecond\n".encode())
    table = tmp_path / "rows.csv"
    table.write_text('prompt,id\n"Hello, world",007\nplain,8\n')
    for source, prompts, extra in ((bom, ["first prompt", "second"], None), (table, ["Hello, world", "plain"], "id")):
        out = tmp_path / f"{source.stem}.jsonl"
        run_cli(
            [
                "predict",
                f"--model.model_name_or_path={tiny_dir}",
                f"--data.prompts_file={source}",
                f"--writer.output_file={out}",
                *GEN,
            ]
        )
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["prompt"] for row in rows] == prompts
        if extra:
            assert [row[extra] for row in rows] == ["007", "8"]  # text stays text
    first = json.loads((tmp_path / "bom.jsonl").read_text().splitlines()[0])
    no_bom = expected_response(tiny_dir, "first prompt", add_eos_length=3, refine_iter=2, max_new_tokens=24)
    assert (first["prompt_length"], first["response_length"], first["response"]) == no_bom


def test_tokens_per_forward_in_the_summary_is_per_row(tiny_dir, tmp_path, capsys):
    """Width 1 gives every row exactly one token per forward: 1.00 whatever the batch size."""
    for batch_size in (1, 4):
        run_cli(
            [
                "predict",
                f"--model.model_name_or_path={tiny_dir}",
                f"--data.prompts={PROMPTS[:4]}",
                f"--data.batch_size={batch_size}",
                "--model.add_eos_length=0",
                "--model.max_new_tokens=9",
            ]
        )
        assert "per row: 1.00 tokens/forward" in capsys.readouterr().err


def test_the_summary_counts_the_rows_by_stop_reason(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    settings = ["--model.add_eos_length=3", "--model.max_new_tokens=12", f"--writer.output_file={out}"]
    run_cli(["predict", f"--model.model_name_or_path={tiny_dir}", f"--data.prompts={PROMPTS}", *settings])
    reasons = collections.Counter(json.loads(line)["stop_reason"] for line in out.read_text().splitlines())
    stopped = re.search(r"\| stopped: ([^|]+) \|", capsys.readouterr().err).group(1)
    assert dict((reason, int(count)) for count, reason in (part.split() for part in stopped.split(", "))) == reasons
    assert sum(reasons.values()) == len(PROMPTS)


def test_the_summary_counts_inductors_compiles_apart(tiny_dir, capsys, fresh_compiles):
    """Compiling is not decoding: the line gives its seconds apart, and a run that compiles nothing
    (the same shapes again, in this process) has no such part."""
    args = ["predict", f"--model.model_name_or_path={tiny_dir}", f"--data.prompts={PROMPTS[:4]}"]
    args += ["--data.batch_size=4", "--model.add_eos_length=3", "--model.max_new_tokens=9", "--model.backend=inductor"]
    run_cli(args)
    line = capsys.readouterr().err.splitlines()[-1]
    assert float(re.search(r"\| inductor compiles ([\d.]+)s \| \d+ tokens in", line)[1]) > 0
    run_cli(args)
    assert "compiles" not in capsys.readouterr().err.splitlines()[-1]


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tiny_dir, tmp_path, capsys, monkeypatch):
    import errno

    from dllm_lit import writer

    output = tmp_path / "out.jsonl"
    output.write_text("earlier\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device", str(output))

    monkeypatch.setattr(writer.os, "fsync", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            [
                "predict",
                f"--model.model_name_or_path={tiny_dir}",
                "--data.prompt=hi",
                *GEN,
                f"--writer.output_file={output}",
                "--writer.overwrite=true",
            ]
        )
    assert exit_info.value.code == 2
    assert f"No space left on the device while writing {output}" in capsys.readouterr().err
    assert output.read_text() == "earlier\n"


def test_legacy_flags_keep_prompts_as_written_and_take_device(tiny_dir, tmp_path, capsys):
    out = tmp_path / "legacy.jsonl"
    for prompt in ("null", "~"):
        demo.main(
            [
                "--model_path",
                tiny_dir,
                "--prompt",
                prompt,
                "--device",
                "cpu",
                "--output_file",
                str(out),
                "--add_eos_length",
                "3",
                "--max_new_tokens",
                "8",
                *(["--trust_remote_code"] if prompt == "~" else []),
            ]
        )
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert row["prompt"] == prompt and row["total_length"] == row["prompt_length"] + row["response_length"]
        out.unlink()
    with pytest.raises(SystemExit):
        demo.main(["--model_path", tiny_dir, "--prompt", "x", "--dev", "2"])  # no abbreviations
    assert "unrecognized arguments: --dev" in capsys.readouterr().err
    for device, message in [("tpu", "must be cpu, cuda or cuda:N, got 'tpu'"), ("cuda:7", "No cuda:7 device here")]:
        if device == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        with pytest.raises(SystemExit) as stop:
            demo.main(["--model_path", tiny_dir, "--prompt", "x", "--device", device])
        assert stop.value.code == 2 and f"argument --device: {message}" in capsys.readouterr().err


@pytest.mark.slow
def test_the_legacy_front_end_keeps_stdout_for_results(tiny_dir, tmp_path, dllm_lit):
    done = dllm_lit(
        ["--model_path", tiny_dir, "--prompt", "hi", "--add_eos_length", "3", "--max_new_tokens", "8"],
        tmp_path,
        module="dllm_lit.demo",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(RULE) and "Predicting" not in done.stdout
    assert all(line.startswith(("Predicting", "[dllm_lit]")) for line in done.stderr.splitlines()), done.stderr
    trusted = dllm_lit(
        ["--model_path", tiny_dir, "--prompt", "hi", "--max_new_tokens", "4", "--trust_remote_code"],
        tmp_path,
        module="dllm_lit.demo",
    )
    assert trusted.returncode == 0 and trusted.stderr.count("trust_remote_code is on") == 1


@pytest.mark.parametrize(("given", "expected"), [("1", 1), ("3", 3), ("1.0", 1.0), ("0.25", 0.25)])
def test_an_integral_batch_limit_counts_batches(given, expected, tiny_dir, monkeypatch):
    """Lightning reads the float 1.0 as every batch and the int 1 as one batch: the command line's
    ``1`` must stay an int (it was parsed as 1.0, so a 'one batch' validation decoded the whole set)."""
    limits = ["--trainer.limit_val_batches", given, "--trainer.limit_train_batches", given]
    monkeypatch.setattr(sys, "argv", ["dllm_lit", "--model.model_name_or_path", str(tiny_dir), *limits])
    parsed = cli.DllmCLI(run=False)
    assert parsed.trainer.limit_val_batches == expected and type(parsed.trainer.limit_val_batches) is type(expected)
    assert type(parsed.trainer.limit_train_batches) is type(expected)


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--add_eos_length", "-1", "--add_eos_length must be at least 0"),
        ("--refine_iter", "0", "--refine_iter must be at least 1"),
        ("--max_length", "1", "--max_length must be at least 2"),
        ("--batch_size", "0", "--batch_size must be at least 1"),
        ("--max_display", "-1", "--max_display must be at least 0"),
    ],
)
def test_bad_legacy_values_are_named_by_their_legacy_flags(dllm_lit_here, tmp_path, flag, value, fragment):
    done = dllm_lit_here(["--prompt", "hi", flag, value], tmp_path, module="dllm_lit.demo")
    assert_one_line_error(done, fragment, prefix="python -m dllm_lit.demo: error:")
    assert "--model." not in done.stderr and "--data." not in done.stderr
