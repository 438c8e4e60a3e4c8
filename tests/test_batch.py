"""`dllm_lit batch`: OpenAI batch files answered by a local `dllm_lit serve`.

Oracles: `dllm_lit predict` on the same prompt and settings; the chat answer for a Responses request;
an uninterrupted run for a resumed one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, write

SETTINGS = ["--model.add_eos_length=3", "--model.max_new_tokens=24", "--model.lossless=false"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


def line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "gpt-4o-mini", **body}}


def requests_file(path: Path, lines: list) -> Path:
    return write(path, "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def batch_args(model: str, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "batch",
        f"--model.model_name_or_path={model}",
        *SETTINGS,
        f"--input_file={source}",
        f"--output_file={out}",
        *extra,
    ]


def predicted(model: str, tmp_path: Path, rows: list[dict], *extra: str) -> list[str]:
    """`dllm_lit predict`'s responses to these rows, with the batch's settings and ``extra``."""
    from dllm_lit import cli

    prompts = write(tmp_path / "p.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "predicted.jsonl"
    args = [f"--model.model_name_or_path={model}", *SETTINGS, *extra, f"--data.prompts_file={prompts}"]
    cli.main(["predict", *args, f"--writer.output_file={out}", "--writer.overwrite=true"])
    return [json.loads(text)["response"] for text in out.read_text().splitlines()]


GOOD = line("ok", "/v1/completions", {"prompt": "1+1="})


@pytest.mark.parametrize(
    "lines,fragment",
    [
        (["{not json"], "line 1: not valid JSON"),
        ([{"url": "/v1/completions", "body": {}}], "line 1: each line is an object with a 'custom_id' string."),
        ([GOOD, GOOD], "line 2: custom_id 'ok' is used twice."),
        ([GOOD | {"url": "/v1/embeddings"}], "line 1: 'method' is POST and 'url' one of /v1/chat/completions"),
        ([GOOD | {"body": "hi"}], "line 1: 'body' is the request's JSON object."),
        (
            [line("r", "/v1/responses", {"input": "hi", "background": True})],
            "line 1: 'background' has no place in a batch, whose answers are each written whole.",
        ),
        ([""], "holds no requests."),
    ],
)
def test_a_bad_batch_file_is_one_sentence_before_any_model_loads(dllm_lit_here, tiny_dir, tmp_path, lines, fragment):
    source = requests_file(tmp_path / "in.jsonl", lines)
    assert_one_line_error(dllm_lit_here(batch_args(tiny_dir, source, tmp_path / "out.jsonl"), tmp_path), fragment)


def test_an_existing_output_is_kept_unless_overwritten(dllm_lit_here, tiny_dir, tmp_path):
    source, out = requests_file(tmp_path / "in.jsonl", [GOOD]), write(tmp_path / "out.jsonl", "earlier\n")
    done = dllm_lit_here(batch_args(tiny_dir, source, out), tmp_path)
    assert_one_line_error(done, "Output file", "exists: pass --resume true to finish that run, or --overwrite true")
    assert out.read_text() == "earlier\n"


@pytest.mark.slow
def test_each_request_is_answered_as_predict_answers_it_in_input_order(dllm_lit_here, tiny_dir, tmp_path):
    lines = [
        line("chat", "/v1/chat/completions", {"messages": CHAT}),
        line("two-prompts", "/v1/completions", {"prompt": ["1+1=", "22+22="], "n": 2, "stream": True}),
        line("response", "/v1/responses", {"input": "What is 2+2?"}),
        line("bad", "/v1/chat/completions", {"messages": []}),
    ]
    source, out = requests_file(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    done = dllm_lit_here(batch_args(tiny_dir, source, out, "--concurrency=3"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 requests -> " in done.stderr and "(1 failed)" in done.stderr
    rows = [json.loads(text) for text in out.read_text().splitlines()]
    assert [row["custom_id"] for row in rows] == ["chat", "two-prompts", "response", "bad"]
    assert all(row["id"].startswith("batch_req_") and row["error"] is None for row in rows)
    chat, completions, response, bad = (row["response"] for row in rows)
    text = chat["body"]["choices"][0]["message"]["content"]
    assert chat["status_code"] == 200 and [text] == predicted(tiny_dir, tmp_path, [{"messages": CHAT}]) and text
    assert chat["body"]["model"] == tiny_dir, "a body naming another model is answered by the served one"
    texts = [choice["text"] for choice in completions["body"]["choices"]]
    prompts = [{"prompt": p} for p in ("1+1=", "1+1=", "22+22=", "22+22=")]
    assert texts == predicted(tiny_dir, tmp_path, prompts)
    assert response["body"]["output"][0]["content"][0]["text"] == text
    assert bad["status_code"] == 400 and "messages" in bad["body"]["error"]["message"]
    assert not (tmp_path / ".out.jsonl.parts").exists()


@pytest.mark.slow
def test_an_interrupted_batch_resumes_keeping_its_answers(dllm_lit_here, tiny_dir, tmp_path):
    slow = {"max_tokens": 1500, "ignore_eos": True, "add_eos_length": 0}  # about 1.5 s each on a CPU
    quick, counts = [f"{i}+{i}=" for i in range(3)], [f"Count {i}:" for i in range(3)]
    lines = [line(f"quick{i}", "/v1/completions", {"prompt": p}) for i, p in enumerate(quick)]
    lines += [line(f"slow{i}", "/v1/completions", slow | {"prompt": p}) for i, p in enumerate(counts)]
    source, out = requests_file(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    args = batch_args(tiny_dir, source, out, "--concurrency=1")
    parts = tmp_path / ".out.jsonl.parts" / "results.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.Popen([sys.executable, "-m", "dllm_lit.cli", *args], cwd=tmp_path, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    while not parts.is_file() or len(parts.read_text().splitlines()) < 1 + 3:  # the fingerprint, three answers
        assert run.poll() is None and time.time() < deadline, run.stderr.read()
        time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    code, said = run.wait(timeout=120), run.stderr.read()
    assert code == 130 and b"--resume true finishes the run" in said, said.decode()
    header, *kept = parts.read_text().splitlines()
    assert 3 <= len(kept) < 6 and not out.exists()
    failed = json.loads(kept[0]) | {"response": {"status_code": 500, "request_id": "r", "body": {"error": {}}}}
    kept[0] = json.dumps(failed)  # a server error (a decoding failure, say): resume asks again
    parts.write_text("\n".join([header, *kept]) + "\n")

    other = dllm_lit_here(batch_args(tiny_dir, source, out, "--resume=true", "--model.refine_iter=3"), tmp_path)
    assert_one_line_error(other, f"Cannot resume {out}: different decoding settings (refine_iter 2 -> 3)")
    assert dllm_lit_here(batch_args(tiny_dir, source, out, "--resume=true"), tmp_path).returncode == 0
    finished = out.read_text().splitlines()
    assert all(row in finished for row in kept[1:]), "the answers of the first run are kept as they were"
    assert kept[0] not in finished
    texts = [json.loads(row)["response"]["body"]["choices"][0]["text"] for row in finished]
    long = ["--model.max_new_tokens=1500", "--model.ignore_eos=true", "--model.add_eos_length=0"]
    expected = predicted(tiny_dir, tmp_path, [{"prompt": p} for p in quick])
    assert texts == expected + predicted(tiny_dir, tmp_path, [{"prompt": p} for p in counts], *long)
