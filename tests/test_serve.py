"""`dllm_lit serve` driven by the real `openai` client, and `dllm_lit chat` through a pseudo-terminal.

Oracles: `dllm_lit predict` on the same prompt and settings; the non-streamed answer; one-by-one
answers for concurrent clients.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch

from conftest import assert_one_line_error, save_lora, save_without_template, type_lines, write
from dllm_lit import cli, generate_blocks
from dllm_lit.batch import free_port
from dllm_lit.models import load_tokenizer
from dllm_lit.streaming import Job, prediction_tokens, stream_jobs

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SETTINGS = ["--model.add_eos_length=3", "--model.max_new_tokens=24", "--model.lossless=false"]  # block mode


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """``dllm_lit serve ARGS`` on a free localhost port in its own process group, once healthy:
    ``(process, base_url)``; its stderr goes to ``log``."""
    port = free_port()
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dllm_lit.cli", "serve", *args, f"--port={port}"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    base, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while not healthy(base):
        if process.poll() is not None or time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"the server never became healthy: {log.read_text()}")
        time.sleep(0.5)
    return process, base


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """A server on a free localhost port: ``(base_url, stderr log path)``."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    args = [f"--model.model_name_or_path={tiny_dir}", *SETTINGS, f"--api_key={KEY}", "--tool_call_parser=hermes"]
    process, base = start_server([*args, "--max_batch_size=8", "--batch_timeout=0.05"], log)
    try:
        yield base, log
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.slow
def test_ctrl_c_stops_the_server_and_its_worker_without_a_traceback(tiny_dir, tmp_path):
    log = tmp_path / "stderr.log"
    process, _ = start_server([f"--model.model_name_or_path={tiny_dir}"], log)
    try:
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: every process of the group
        assert process.wait(timeout=60) == 0
        group = ["ps", "-o", "stat=", "-g", str(process.pid)]
        time.sleep(2)
        assert all(s.startswith("Z") for s in subprocess.run(group, capture_output=True, text=True).stdout.split())
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_model_without_a_template_chats_through_the_one_given_as_predict_uses_it(tmp_path):
    plain = str(save_without_template(tmp_path / "plain"))
    template = write(tmp_path / "t.jinja", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>")
    process, base = start_server(
        [f"--model.model_name_or_path={plain}", *SETTINGS, f"--chat_template={template}"], tmp_path / "log"
    )
    try:
        messages = [{"role": "user", "content": "What is 2+2?"}]
        body = {"model": plain, "messages": messages}
        done = requests.post(f"{base}/v1/chat/completions", json=body).json()
        row = predicted(plain, tmp_path, {"messages": messages}, f"--data.chat_template={template}")
        assert done["choices"][0]["message"]["content"] == row["response"] and row["response"]
        assert (
            done["usage"]["prompt_tokens"] == row["prompt_length"] == len("[user] What is 2+2?\n>")
        )  # no BOS: the template writes none
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.slow
def test_lora_modules_answer_as_predict_does_with_each_adapter_alone_or_batched(tiny_dir, tmp_path):
    adapters = {name: str(save_lora(tiny_dir, tmp_path / name, seed)) for name, seed in (("a", 1), ("b", 2))}
    modules = "[" + ", ".join(f"{name}={path}" for name, path in adapters.items()) + "]"
    args = [f"--model.model_name_or_path={tiny_dir}", *SETTINGS, f"--lora_modules={modules}"]
    process, base = start_server(args, tmp_path / "log")
    try:
        listed = requests.get(f"{base}/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in listed] == [(tiny_dir, None), ("a", tiny_dir), ("b", tiny_dir)]
        messages = [{"role": "user", "content": "What is 2+2?"}]

        def answer(model: str) -> str:
            body = {"model": model, "messages": messages}
            return requests.post(f"{base}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

        names = [tiny_dir, "a", "b"]
        alone = {name: answer(name) for name in names}
        for name, path in [(tiny_dir, tiny_dir), *adapters.items()]:  # predict merges the adapter into the model
            assert alone[name] == predicted(path, tmp_path, {"messages": messages})["response"], name
        assert len(set(alone.values())) == 3, "each adapter changes the answer"
        with ThreadPoolExecutor(9) as pool:
            together = list(pool.map(answer, names * 3))
        assert together == [alone[name] for name in names * 3]
        assert (
            requests.post(f"{base}/v1/chat/completions", json={"model": "c", "messages": messages}).status_code == 404
        )
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_server_with_one_sentence(dllm_lit, tiny_dir, tmp_path):
    adapter = save_lora(tiny_dir, tmp_path / "a", 1)  # not an adapter of tiny-char, whose layers are wider
    args = ["serve", "--model.model_name_or_path=tiny-char", f"--lora_modules=a={adapter}", f"--port={free_port()}"]
    done = dllm_lit(args, tmp_path, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("dllm_lit serve: the model worker")]
    assert len(errors) == 1 and f"could not start: Could not apply the adapter {adapter}" in errors[0], done.stderr


@pytest.mark.slow
def test_a_worker_that_dies_stops_the_server_with_one_sentence(tiny_dir, tmp_path):
    log = tmp_path / "stderr.log"
    process, _ = start_server([f"--model.model_name_or_path={tiny_dir}"], log)
    try:
        group = subprocess.run(
            ["ps", "-ww", "-o", "pid=,args=", "-g", str(process.pid)], capture_output=True, text=True
        )
        worker = [int(line.split()[0]) for line in group.stdout.splitlines() if "spawn_main" in line]
        assert len(worker) == 1, group.stdout
        os.kill(worker[0], signal.SIGKILL)  # as the out-of-memory killer does
        assert process.wait(timeout=120) == 1
        text = log.read_text()
        assert "the model worker process died (killed by SIGKILL, often the out-of-memory killer)" in text, text
        assert "Traceback" not in text, text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def predicted(tiny_dir: str, tmp_path: Path, row: dict, *extra: str) -> dict:
    """`dllm_lit predict` on one row with the server's settings."""
    prompts, out = write(tmp_path / "p.jsonl", json.dumps(row) + "\n"), tmp_path / "out.jsonl"
    cli.main(
        [
            "predict",
            f"--model.model_name_or_path={tiny_dir}",
            *SETTINGS,
            f"--data.prompts_file={prompts}",
            f"--writer.output_file={out}",
            "--writer.overwrite=true",
            *extra,
        ]
    )
    return json.loads(out.read_text().splitlines()[0])


def chat_text(client, model: str, content: str, stream: bool = False, **kwargs) -> tuple[str, object]:
    messages = [{"role": "user", "content": content}]
    if not stream:
        done = client.chat.completions.create(model=model, messages=messages, **kwargs)
        return done.choices[0].message.content, done
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


@pytest.mark.slow
def test_models_and_health(server, client, tiny_dir):
    from dllm_lit.settings import DecodeSettings

    assert [(m.id, m.max_model_len) for m in client.models.list().data] == [(tiny_dir, DecodeSettings().max_length)]
    assert requests.get(f"{server[0]}/health").status_code == 200
    for path, status in (("/v1/nothing", 404), ("/v1/completions", 405)):  # FastAPI's errors, OpenAI-shaped
        reply = requests.get(f"{server[0]}{path}")
        assert reply.status_code == status and "this server has POST /v1/chat" in reply.json()["error"]["message"]


@pytest.mark.slow
def test_chat_streamed_equals_non_streamed_equals_predict(client, tiny_dir, tmp_path):
    text, done = chat_text(client, tiny_dir, "What is 2+2?")
    streamed, chunks = chat_text(client, tiny_dir, "What is 2+2?", stream=True)
    row = predicted(tiny_dir, tmp_path, {"messages": [{"role": "user", "content": "What is 2+2?"}]})
    assert text == streamed == row["response"] and text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2, "one chunk per block"
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    usage = done.usage.model_dump(exclude={"prompt_tokens_details"})
    assert usage["forwards"] == row["forwards"] and usage["add_eos_length"] == 3 and usage["refine_iter"] == 2
    assert usage["completion_tokens"] >= row["response_length"]
    assert chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == usage
    again = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert again == usage["prompt_tokens"] - 1, "the same prompt again: all but its last token from the prompt cache"
    counted, chunks = chat_text(client, tiny_dir, "What is 2+2?", stream=True, stream_options={"include_usage": True})
    assert counted == text and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == usage
    assert chunks[-2].choices[0].finish_reason == done.choices[0].finish_reason and chunks[-2].usage is None


@pytest.mark.slow
def test_completion_streamed_equals_non_streamed_equals_predict(client, tiny_dir, tmp_path):
    done = client.completions.create(model=tiny_dir, prompt="12+34=")
    chunks = list(client.completions.create(model=tiny_dir, prompt="12+34=", stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert done.choices[0].text == streamed == predicted(tiny_dir, tmp_path, {"prompt": "12+34="})["response"]


@pytest.mark.slow
def test_several_prompts_and_n_choices_each_equal_their_answers_one_by_one(client, tiny_dir):
    from dllm_lit.data import encode_prompt

    prompts = ["12+34=", "Once upon a time"]
    alone = [client.completions.create(model=tiny_dir, prompt=prompt).choices[0].text for prompt in prompts]
    ids = [encode_prompt(load_tokenizer(tiny_dir), {"prompt": prompt}, False) for prompt in prompts]
    assert client.completions.create(model=tiny_dir, prompt=ids[1]).choices[0].text == alone[1], "token ids"
    for prompt in (prompts, ids):
        both = client.completions.create(model=tiny_dir, prompt=prompt, n=2)
        assert [(c.index, c.text) for c in both.choices] == list(enumerate([alone[0], alone[0], alone[1], alone[1]]))
    chunks = list(client.completions.create(model=tiny_dir, prompt=prompts, n=2, stream=True))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(4)]
    assert streamed == [alone[0], alone[0], alone[1], alone[1]] and chunks[-1].usage == both.usage

    singles = [chat_text(client, tiny_dir, "Tell me a story.", temperature=1.5, seed=seed)[1] for seed in (7, 8)]
    messages = [{"role": "user", "content": "Tell me a story."}]
    sampled = client.chat.completions.create(model=tiny_dir, messages=messages, n=2, temperature=1.5, seed=7)
    texts = [single.choices[0].message.content for single in singles]
    assert [c.message.content for c in sampled.choices] == texts and texts[0] != texts[1], "seed, seed + 1"
    assert sampled.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    assert sampled.usage.prompt_tokens == singles[0].usage.prompt_tokens, "one prompt, counted once"
    for body, param in (
        ({"prompt": []}, "prompt"),
        ({"prompt": [99999]}, "prompt"),
        ({"prompt": ["a"] * 9, "n": 15}, "n"),
    ):
        reply = requests.post(f"{client.base_url}completions", json={"model": tiny_dir, **body}, headers=AUTH)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


@pytest.mark.slow
def test_logprobs_streamed_equal_non_streamed_equal_the_engines(client, tiny_dir):
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    asked = dict(max_tokens=24, extra_body={"lossless": True})
    text, done = chat_text(client, tiny_dir, "What is 2+2?", logprobs=True, top_logprobs=2, **asked)
    _, chunks = chat_text(client, tiny_dir, "What is 2+2?", True, logprobs=True, top_logprobs=2, **asked)
    content = done.choices[0].logprobs.content
    streamed = [
        t.model_dump() for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    expected = [
        t.model_dump() for t in content
    ]  # to 1e-5: the second request reads the first's K/V from the prompt cache
    assert [tokens(t) for t in streamed] == [tokens(t) for t in expected]
    assert [values(t) for t in streamed] == [pytest.approx(values(t), abs=1e-5) for t in expected]
    ids = encode_prompt(tokenizer, {"messages": [{"role": "user", "content": "What is 2+2?"}]}, True)
    settings = dict(add_eos_length=3, max_new_tokens=24, lossless=True, logprobs=2)
    engine = generate_blocks(model, torch.tensor([ids]), eos_token_id=tokenizer.eos_token_id, **settings).rows[0]
    assert [t.token for t in content] == [tokenizer.decode([i], skip_special_tokens=True) for i in engine.token_ids]
    assert "".join(t.token for t in content) == text
    for token, entry in zip(content, engine.logprobs):
        assert token.logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert [t.token for t in token.top_logprobs] == [
            tokenizer.decode([i], skip_special_tokens=True) for i, _ in entry.top
        ]
        assert [t.logprob for t in token.top_logprobs] == pytest.approx([v for _, v in entry.top], abs=1e-5)
    plain = client.chat.completions.create(model=tiny_dir, messages=[{"role": "user", "content": "What is 2+2?"}])
    assert plain.choices[0].logprobs is None

    completion = client.completions.create(model=tiny_dir, prompt="12+34=", logprobs=1, max_tokens=24)
    legacy = completion.choices[0].logprobs
    assert "".join(legacy.tokens) == completion.choices[0].text
    assert legacy.text_offset == [len("".join(legacy.tokens[:n])) for n in range(len(legacy.tokens))]
    assert all(
        tops[token] == value for token, value, tops in zip(legacy.tokens, legacy.token_logprobs, legacy.top_logprobs)
    )
    streamed = list(client.completions.create(model=tiny_dir, prompt="12+34=", logprobs=1, max_tokens=24, stream=True))
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for part in parts for t in part.tokens] == legacy.tokens
    assert [o for part in parts for o in part.text_offset] == legacy.text_offset


@pytest.mark.slow
def test_lm_evals_loglikelihood_requests_read_the_models_own_logprobs_from_an_echo(client, tiny_dir):
    """lm-eval's ``local-completions`` payload for loglikelihood (token ids, echo, logprobs=1,
    max_tokens=1), parsed by lm-eval's own parser, equals a direct computation."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from test_evaluate import direct_logprob

    from dllm_lit.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    pairs = [("The cat sat on the", " mat"), ("12+34=", "46"), ("x", "y")]
    contexts = [tokenizer(context).input_ids for context, _ in pairs]
    continuations = [tokenizer(text, add_special_tokens=False).input_ids for _, text in pairs]
    payload = LocalCompletionsAPI._create_payload(
        SimpleNamespace(model=tiny_dir), [c + n for c, n in zip(contexts, continuations)], generate=False
    )
    reply = requests.post(f"{client.base_url}completions", json=payload, headers=AUTH)
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert [c["text"][: len(tokenizer.decode(c_ids))] for c, c_ids in zip(choices, contexts)] == [
        tokenizer.decode(c_ids) for c_ids in contexts
    ], "the prompt is echoed first"
    assert all(c["logprobs"]["token_logprobs"][0] is None for c in choices)
    scores = LocalCompletionsAPI.parse_logprobs(reply.json(), ctxlens=[len(c) for c in contexts])
    for (logprob, greedy), context, continuation in zip(scores, contexts, continuations):
        expected, expected_greedy = direct_logprob(model, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    streamed = list(client.completions.create(model=tiny_dir, prompt="12+34=", echo=True, max_tokens=4, stream=True))
    whole = client.completions.create(model=tiny_dir, prompt="12+34=", echo=True, max_tokens=4)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith("12+34=") and whole.choices[0].logprobs is None


@pytest.mark.slow
def test_an_echo_with_max_tokens_0_is_the_prompt_and_its_logprobs_alone(server, client, tiny_dir):
    asked = dict(model=tiny_dir, prompt="12+34=", echo=True, logprobs=1)
    alone, longer = (client.completions.create(**asked, max_tokens=limit) for limit in (0, 4))
    (choice,), (answered,), count = alone.choices, longer.choices, alone.usage.prompt_tokens
    assert choice.text == "12+34=" and choice.finish_reason == "length" and alone.usage.completion_tokens == 0
    assert choice.logprobs.tokens == answered.logprobs.tokens[:count] and len(choice.logprobs.tokens) == count
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(answered.logprobs.token_logprobs[1:count], abs=1e-5)
    chunks = list(client.completions.create(**asked, max_tokens=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "12+34="
    refused = requests.post(f"{server[0]}/v1/completions", json={**asked, "echo": False, "max_tokens": 0}, headers=AUTH)
    assert refused.status_code == 400 and "max_tokens 0 needs echo: true" in refused.json()["error"]["message"]


@pytest.mark.slow
def test_tokenize_gives_the_ids_a_request_decodes_and_detokenize_reads_them_back(server, client, tiny_dir):
    def post(path: str, body: dict, headers=AUTH) -> requests.Response:
        return requests.post(f"{server[0]}{path}", json=body, headers=headers)

    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat = post("/tokenize", {"model": tiny_dir, "messages": messages}).json()
    assert (
        chat["count"]
        == len(chat["tokens"])
        == client.chat.completions.create(model=tiny_dir, messages=messages).usage.prompt_tokens
    )
    tokens = post("/tokenize", {"prompt": "12+34="}).json()["tokens"]
    answers = [
        client.completions.create(model=tiny_dir, prompt=prompt).choices[0].text for prompt in ("12+34=", tokens)
    ]
    assert answers[0] == answers[1], "the ids a text prompt is decoded from"
    assert post("/detokenize", {"tokens": tokens}).json()["prompt"].endswith("12+34=")
    for path, body, status in (
        ("/tokenize", {"prompt": "a", "messages": messages}, 400),
        ("/tokenize", {"prompt": "a", "model": "other"}, 404),
        ("/detokenize", {"tokens": [99999]}, 400),
    ):
        assert post(path, body).status_code == status
    assert post("/tokenize", {"prompt": "a"}, headers={}).status_code == 401


@pytest.mark.slow
def test_a_chat_may_continue_the_assistant_s_message_as_predict_continues_it(server, client, tiny_dir, tmp_path):
    turns = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is"}]
    fields = {"continue_final_message": True, "add_generation_prompt": False}
    fields["chat_template_kwargs"] = {"enable_thinking": False}  # the tiny template's variable
    done = client.chat.completions.create(model=tiny_dir, messages=turns, extra_body=fields)
    row = predicted(tiny_dir, tmp_path, {"messages": turns, **fields})
    assert done.choices[0].message.content == row["response"] and row["response"]
    counted = requests.post(f"{server[0]}/tokenize", json={"messages": turns, **fields}, headers=AUTH).json()
    assert counted["count"] == done.usage.prompt_tokens == row["prompt_length"]
    plain = client.chat.completions.create(model=tiny_dir, messages=turns[:1])
    added = 1 + len("/no_think\nIt is")  # <|system|>, then one token a character
    assert plain.usage.prompt_tokens + added == done.usage.prompt_tokens


def test_the_server_s_template_variables_go_under_each_request_s_own(tiny_dir):
    from dllm_lit.data import encode_prompt
    from dllm_lit.openai_spec import OpenAIBlockSpec
    from dllm_lit.settings import DecodeSettings

    spec = OpenAIBlockSpec(
        tiny_dir, False, DecodeSettings(), "m", None, {}, chat_template_kwargs={"enable_thinking": False}
    )
    messages = [{"role": "user", "content": "hi"}]
    tokenizer = load_tokenizer(tiny_dir)
    for own, variables in ((None, {"enable_thinking": False}), ({"enable_thinking": True}, {"enable_thinking": True})):
        ids = spec._encode({"messages": messages, "chat_template_kwargs": own})
        assert ids == encode_prompt(tokenizer, {"messages": messages, "chat_template_kwargs": variables}, True)
    assert "/no_think" in tokenizer.decode(spec._encode({"messages": messages}))
    assert spec._encode({"prompt": "hi"}) == encode_prompt(tokenizer, {"prompt": "hi"}, False), (
        "completions: no template"
    )


@pytest.mark.slow
def test_extra_settings_are_used_and_echoed(client, tiny_dir, tmp_path):
    body = {"add_eos_length": 7, "refine_iter": 8}
    text, done = chat_text(client, tiny_dir, "Name a color.", extra_body=body)
    row = predicted(
        tiny_dir,
        tmp_path,
        {"messages": [{"role": "user", "content": "Name a color."}]},
        "--model.add_eos_length=7",
        "--model.refine_iter=8",
    )
    assert text == row["response"]
    assert (done.usage.model_dump()["add_eos_length"], done.usage.model_dump()["refine_iter"]) == (7, 8)
    lossless, _ = chat_text(client, tiny_dir, "Name a color.", extra_body={"lossless": True, "add_eos_length": 7})
    assert lossless == text, "the exact block setting and lossless mode both give the greedy answer"


@pytest.mark.slow
def test_penalties_and_logit_bias_are_used_as_predict_uses_them(client, tiny_dir, tmp_path):
    plain, _ = chat_text(client, tiny_dir, "Name a color.")
    banned = load_tokenizer(tiny_dir).encode(plain[0], add_special_tokens=False)
    assert len(banned) == 1
    asked = dict(presence_penalty=0.8, frequency_penalty=0.6, logit_bias={str(banned[0]): -100})
    asked["extra_body"] = {"repetition_penalty": 1.3, "min_tokens": 4}
    text, _ = chat_text(client, tiny_dir, "Name a color.", **asked)
    streamed, _ = chat_text(client, tiny_dir, "Name a color.", stream=True, **asked)
    flags = ["--model.presence_penalty=0.8", "--model.frequency_penalty=0.6", "--model.repetition_penalty=1.3"]
    flags.append("--model.min_new_tokens=4")
    flags.append(f"--model.logit_bias={{{banned[0]}: -100}}")
    row = predicted(tiny_dir, tmp_path, {"messages": [{"role": "user", "content": "Name a color."}]}, *flags)
    assert text == streamed == row["response"]
    assert plain[0] not in text and text != plain


@pytest.mark.slow
def test_structured_output_is_used_as_predict_uses_it(client, tiny_dir, tmp_path):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"]}
    schema["x-guidance"] = {"whitespace_flexible": False}  # a random model would pick whitespace forever
    response_format = {"type": "json_schema", "json_schema": {"name": "color", "schema": schema}}
    asked = dict(response_format=response_format, extra_body={"refine_iter": 4})  # exact blocks
    text, _ = chat_text(client, tiny_dir, "Name a color.", **asked)
    streamed, _ = chat_text(client, tiny_dir, "Name a color.", stream=True, **asked)
    flags = [f"--model.guided_json={json.dumps(schema)}", "--model.refine_iter=4"]
    row = predicted(tiny_dir, tmp_path, {"messages": [{"role": "user", "content": "Name a color."}]}, *flags)
    assert text == streamed == row["response"]
    assert json.loads(text)["color"] in ("red", "green")
    choice, _ = chat_text(
        client, tiny_dir, "Name a color.", extra_body={"guided_choice": ["blue", "teal"], "lossless": True}
    )
    assert choice in ("blue", "teal")


@pytest.mark.slow
def test_text_parts_read_as_their_joined_string_and_top_k_1_or_min_p_1_sample_the_greedy_answer(client, tiny_dir):
    joined, _ = chat_text(client, tiny_dir, "Name a color.\nAnd a fruit.")
    parts = [{"type": "text", "text": "Name a color."}, {"type": "text", "text": "And a fruit."}]
    done = client.chat.completions.create(model=tiny_dir, messages=[{"role": "user", "content": parts}])
    assert done.choices[0].message.content == joined
    greedy, _ = chat_text(client, tiny_dir, "Tell me a story.")
    limits = ({"top_k": 1}, {"top_k": 1}, {"min_p": 1.0}, {"top_k": -1}, {"top_k": -1})
    sampled = [
        chat_text(client, tiny_dir, "Tell me a story.", temperature=1.5, seed=seed, extra_body=limit)[0]
        for seed, limit in zip((1, 2, 2, 1, 2), limits)
    ]
    assert sampled[:3] == [greedy] * 3 and sampled[3] != sampled[4], "top_k=-1 is no limit: seeds differ"


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_exactly(client, tiny_dir, stream):
    full, _ = chat_text(client, tiny_dir, "Tell me a story.", max_tokens=24)
    stop = full[9:11]
    cut, _ = chat_text(client, tiny_dir, "Tell me a story.", stream=stream, max_tokens=24, stop=[stop, "\x00"])
    assert cut == full[: full.index(stop)]


@pytest.mark.slow
def test_32_concurrent_clients_get_their_one_by_one_answers(client, tiny_dir):
    questions = [f"Question {i}: {'why ' * (i % 5)}?" for i in range(32)]
    alone = [chat_text(client, tiny_dir, q, max_tokens=16)[0] for q in questions]
    start = time.time()
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda q: chat_text(client, tiny_dir, q, max_tokens=16)[0], questions))
    assert together == alone
    assert time.time() - start < 120


CLOSED = {"type": "object", "additionalProperties": False}  # a random model would invent properties
WEATHER = CLOSED | {"properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
TIME = CLOSED | {"properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["hour"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "set_alarm", "parameters": TIME}},
]


def tool_calls(client, model: str, stream: bool, **kwargs) -> tuple[list[dict], str]:
    """A chat answer's tool calls (``name``, ``arguments``; streamed deltas merged by index) and its
    finish reason."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = dict(model=model, messages=messages, tools=TOOLS, extra_body={"lossless": True}, **kwargs)
    if not stream:
        done = client.chat.completions.create(**asked).choices[0]
        assert done.message.content is None
        calls = [dict(name=c.function.name, arguments=c.function.arguments, id=c.id) for c in done.message.tool_calls]
        return calls, done.finish_reason
    calls: dict[int, dict] = {}
    reason = None
    for chunk in client.chat.completions.create(**asked, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, dict(name=None, arguments="", id=delta.id))
            call["name"] = call["name"] or delta.function.name
            call["arguments"] += delta.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return [calls[i] for i in sorted(calls)], reason


@pytest.mark.slow
def test_tool_calls_follow_their_schemas_streamed_as_whole_and_as_predict_decodes_them(client, tiny_dir, tmp_path):
    named = {"type": "function", "function": {"name": "get_weather"}}
    calls, reason = tool_calls(client, tiny_dir, False, tool_choice=named)
    streamed, streamed_reason = tool_calls(client, tiny_dir, True, tool_choice=named)
    assert [c["name"] for c in calls] == [c["name"] for c in streamed] == ["get_weather"]
    assert calls[0]["arguments"] == streamed[0]["arguments"] and reason == streamed_reason == "stop"
    assert json.loads(calls[0]["arguments"])["city"] in ("Paris", "Rome")
    assert calls[0]["id"].startswith("call_") and streamed[0]["id"].startswith("call_")
    row = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": TOOLS}
    schema = {"x-guidance": {"whitespace_flexible": False}} | WEATHER
    flags = [f"--model.guided_json={json.dumps(schema)}", "--model.lossless=true"]
    assert predicted(tiny_dir, tmp_path, row, *flags)["response"] == calls[0]["arguments"]

    for parallel, most in ((False, 1), (True, 24)):
        asked = dict(tool_choice="required", parallel_tool_calls=parallel, max_tokens=300)
        calls, reason = tool_calls(client, tiny_dir, False, **asked)
        streamed, streamed_reason = tool_calls(client, tiny_dir, True, **asked)
        strip = [(c["name"], c["arguments"]) for c in calls]
        assert strip == [(c["name"], c["arguments"]) for c in streamed] and reason == streamed_reason == "tool_calls"
        assert 1 <= len(calls) <= most
        for call in calls:
            arguments = json.loads(call["arguments"])
            assert (
                arguments["city"] in ("Paris", "Rome")
                if call["name"] == "get_weather"
                else 0 <= arguments["hour"] <= 23
            )


@pytest.mark.slow
def test_auto_tool_choice_reads_the_model_s_own_calls_and_else_answers_as_without_tools(client, tiny_dir):
    """The server reads <tool_call> blocks (--tool_call_parser hermes); the tiny model writes none, so
    its answer is the content it gives without tools (its template ignores them)."""
    plain, _ = chat_text(client, tiny_dir, "What is the weather in Paris?")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for stream in (False, True):
        asked = dict(model=tiny_dir, messages=messages, tools=TOOLS, stream=stream)
        if not stream:
            done = client.chat.completions.create(**asked).choices[0]
            assert (done.message.content, done.message.tool_calls, done.finish_reason) == (plain, None, "length")
        else:
            chunks = [c.choices[0] for c in client.chat.completions.create(**asked) if c.choices]
            assert "".join(c.delta.content or "" for c in chunks) == plain
            assert not any(c.delta.tool_calls for c in chunks) and chunks[-1].finish_reason == "length"


@pytest.mark.slow
def test_a_conversation_with_earlier_calls_and_their_results_is_answered(client, tiny_dir):
    earlier = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [earlier]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    done = client.chat.completions.create(model=tiny_dir, messages=messages, tools=TOOLS, tool_choice="none")
    assert done.choices[0].message.tool_calls is None and isinstance(done.choices[0].message.content, str)


def brief(client, model: str, **kwargs):
    """The chat completion a Responses request with instructions "Answer briefly." amounts to."""
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}]
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("limit", [None, 3])
def test_responses_streamed_equal_whole_equal_the_chat_completion(client, tiny_dir, limit):
    asked = dict(model=tiny_dir, input="What is 2+2?", instructions="Answer briefly.", max_output_tokens=limit)
    whole = client.responses.create(**asked)
    events = list(client.responses.create(**asked, stream=True))
    chat = brief(client, tiny_dir, max_tokens=limit)
    text, streamed = chat.choices[0].message.content, events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert whole.output_text == streamed.output_text == deltas == text and text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert events[2].item.status == "in_progress" and events[2].item.content == [], "the item as it was then"
    status = {"stop": "completed", "length": "incomplete"}[chat.choices[0].finish_reason]
    assert whole.status == streamed.status == status and events[-1].type == f"response.{status}"
    if status == "incomplete":
        assert whole.incomplete_details.reason == streamed.incomplete_details.reason == "max_output_tokens"
    usage = (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens)
    for response in (whole, streamed):
        assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == usage
        assert response.usage.model_dump()["forwards"] == chat.usage.model_dump()["forwards"]


RESPONSE_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]


@pytest.mark.slow
@pytest.mark.parametrize("named", [True, False])
def test_responses_calls_streamed_or_whole_equal_the_chat_completion_s(client, tiny_dir, named):
    choice = {"type": "function", "name": "get_weather"} if named else "required"
    chat_choice = {"type": "function", "function": {"name": "get_weather"}} if named else "required"
    asked = dict(model=tiny_dir, input="What is the weather in Paris?", tools=RESPONSE_TOOLS, max_output_tokens=300)
    asked |= dict(tool_choice=choice, extra_body={"lossless": True})
    whole = client.responses.create(**asked)
    events = list(client.responses.create(**asked, stream=True))
    expected, _ = tool_calls(client, tiny_dir, False, tool_choice=chat_choice, max_tokens=300)
    calls = [("function_call", c["name"], c["arguments"]) for c in expected]
    for response in (whole, events[-1].response):
        assert [(item.type, item.name, item.arguments) for item in response.output] == calls
        assert response.status == "completed" and all(item.call_id.startswith("call_") for item in response.output)
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == "".join(arguments for *_, arguments in calls)


@pytest.mark.slow
def test_responses_read_earlier_calls_and_their_outputs_as_chat_messages_and_report_logprobs(client, tiny_dir):
    earlier = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [earlier]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "What is the weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    ]
    chat = client.chat.completions.create(
        model=tiny_dir, messages=messages, tools=TOOLS, tool_choice="none", logprobs=True, top_logprobs=2
    )
    response = client.responses.create(
        model=tiny_dir,
        input=items,
        tools=RESPONSE_TOOLS,
        tool_choice="none",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    assert response.output_text == chat.choices[0].message.content
    entries = [entry.model_dump() for entry in response.output[0].content[0].logprobs]
    expected = [entry.model_dump() for entry in chat.choices[0].logprobs.content]
    # The tokens exactly, their logprobs to 1e-4: the second request reads the prompt's K/V from the prompt
    # cache, computed in a prefill of another length (logprobs then differ by about 1e-6).
    assert [tokens(entry) for entry in entries] == [tokens(entry) for entry in expected] and entries
    assert [values(entry) for entry in entries] == [pytest.approx(values(entry), abs=1e-4) for entry in expected]


def tokens(entry: dict) -> list[str]:
    """A logprob entry's token and its top tokens."""
    return [entry["token"], *(top["token"] for top in entry["top_logprobs"])]


def values(entry: dict) -> list[float]:
    """A logprob entry's logprob and its top tokens'."""
    return [entry["logprob"], *(top["logprob"] for top in entry["top_logprobs"])]


@pytest.mark.slow
def test_a_response_continues_a_stored_one_as_the_chat_of_the_whole_conversation_would(client, tiny_dir):
    from openai import NotFoundError

    first = client.responses.create(model=tiny_dir, input="What is 2+2?", instructions="Answer briefly.")
    assert first.store and client.responses.retrieve(first.id).output_text == first.output_text
    asked = dict(model=tiny_dir, input="And 3+3?", previous_response_id=first.id)
    events = list(client.responses.create(**asked, stream=True))
    second = events[-1].response
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": first.output_text}]
    messages.append({"role": "user", "content": "And 3+3?"})  # the instructions are not carried over, as OpenAI's
    chat = client.chat.completions.create(model=tiny_dir, messages=messages)
    assert second.output_text == chat.choices[0].message.content and second.previous_response_id == first.id
    listed = client.responses.input_items.list(second.id, order="asc")
    assert [(item.role, item.content[0].text) for item in listed.data] == [(m["role"], m["content"]) for m in messages]
    client.responses.delete(first.id)
    third = client.responses.create(model=tiny_dir, input="Thanks.", previous_response_id=second.id, store=False)
    messages += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Thanks."}]
    assert (
        third.output_text
        == client.chat.completions.create(model=tiny_dir, messages=messages).choices[0].message.content
    )
    for gone in (first.id, third.id):  # deleted; not stored
        with pytest.raises(NotFoundError, match="No response with id"):
            client.responses.retrieve(gone)
    with pytest.raises(NotFoundError, match="Previous response with id"):
        client.responses.create(model=tiny_dir, input="Hi", previous_response_id=first.id)


@pytest.mark.slow
def test_a_background_response_is_polled_to_the_plain_one_s_answer_and_a_running_one_is_cancelled(client, tiny_dir):
    from openai import BadRequestError

    asked = dict(model=tiny_dir, input="What is 2+2?")
    created = client.responses.create(**asked, background=True)
    assert created.status == "queued" and created.background and created.output == []
    polled = until_ended(client, created.id)
    plain = client.responses.create(**asked)
    assert (polled.status, polled.output_text, polled.usage.output_tokens) == (
        plain.status,
        plain.output_text,
        plain.usage.output_tokens,
    )
    later = dict(model=tiny_dir, input="And 3+3?")
    continued = client.responses.create(**later, previous_response_id=created.id)
    assert continued.output_text == client.responses.create(**later, previous_response_id=plain.id).output_text
    with pytest.raises(BadRequestError, match="Only a background response can be cancelled"):
        client.responses.cancel(plain.id)
    assert client.responses.cancel(created.id).status == polled.status, "an ended response stays as it ended"

    long = dict(model=tiny_dir, input="Count.", max_output_tokens=4000, extra_body={"ignore_eos": True})
    running = client.responses.create(**long, background=True)
    assert client.responses.cancel(running.id).status == "cancelled"
    stopped = until_ended(client, running.id, still=("queued", "in_progress", "cancelled"))
    assert stopped.status == "cancelled" and 0 < stopped.usage.output_tokens < 4000, "stopped at its next commit"
    with pytest.raises(BadRequestError, match=f"Previous response '{running.id}' is cancelled"):
        client.responses.create(model=tiny_dir, input="Go on.", previous_response_id=running.id)


@pytest.mark.slow
def test_a_streamed_background_response_is_read_again_from_any_event_and_cancelled_in_its_stream(
    client, server, tiny_dir
):
    from openai import BadRequestError

    asked = dict(model=tiny_dir, input="What is 2+2?")
    first, stream = [], client.responses.create(**asked, background=True, stream=True)
    for event in stream:
        first.append(event)
        if event.sequence_number == 3:
            break
    stream.close()  # the client went away: the answer goes on
    created = first[0].response
    assert (first[0].type, created.status, first[1].response.status) == ("response.created", "queued", "in_progress")
    rest = list(client.responses.retrieve(created.id, stream=True, starting_after=3))
    events = first + rest
    assert [event.sequence_number for event in events] == list(range(len(events)))
    plain = client.responses.create(**asked)
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert (events[-1].response.status, events[-1].response.output_text, text) == (
        plain.status,
        plain.output_text,
        plain.output_text,
    )
    again = list(client.responses.retrieve(created.id, stream=True))
    assert [event.model_dump() for event in again] == [event.model_dump() for event in events], "kept whole"
    assert client.responses.retrieve(created.id).output_text == plain.output_text

    polled = client.responses.create(**asked, background=True)
    with pytest.raises(BadRequestError, match="Only a background response created with stream true can be streamed"):
        list(client.responses.retrieve(polled.id, stream=True))
    url = f"{server[0]}/v1/responses/{created.id}?stream=true&starting_after=soon"
    answer = requests.get(url, headers=AUTH)
    assert answer.status_code == 400 and "starting_after must be a sequence number" in answer.text, answer.text

    long = dict(model=tiny_dir, input="Count.", max_output_tokens=4000, extra_body={"ignore_eos": True})
    running = client.responses.create(**long, background=True, stream=True)
    started = next(iter(running)).response
    assert client.responses.cancel(started.id).status == "cancelled"
    last = list(running)[-1]
    assert (last.type, last.response.status) == ("response.incomplete", "cancelled"), last
    assert 0 < last.response.usage.output_tokens < 4000, "stopped at its next commit"
    assert until_ended(client, started.id, still=()).status == "cancelled"


def until_ended(client, response_id: str, still=("queued", "in_progress"), timeout: float = 60):
    """A background response once it has ended (for ``cancelled``: once its usage is known)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status not in still or response.usage is not None:
            return response
        time.sleep(0.05)
    raise AssertionError(f"{response_id} is still {response.status} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize(
    "change,fragment",
    [
        ({"conversation": "conv_1"}, "conversation is not supported: continue a response with previous_response_id"),
        ({"include": ["file_search_call.results"]}, "include: 'file_search_call.results' is not supported"),
        (
            {"input": [{"type": "image", "url": "x"}]},
            "input.0 is a message, function_call, function_call_output or item_reference.",
        ),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role"),
        ({"tools": RESPONSE_TOOLS, "tool_choice": {"type": "function", "name": "g"}}, "'g', which is not one of"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        (
            {"background": True, "store": False},
            "A background response is kept and read with GET /v1/responses/{id}: it",
        ),
    ],
)
def test_bad_responses_requests_get_openai_errors(server, tiny_dir, change, fragment):
    body = {"model": tiny_dir, "input": "hi", **change}
    answer = requests.post(f"{server[0]}/v1/responses", json=body, headers=AUTH)
    assert answer.status_code == 400 and fragment in answer.json()["error"]["message"], answer.text


BAD_REQUESTS = [
    ("malformed json", b'{"model": "m", "messages": [', 400),
    ("messages not a list", {"messages": "hi"}, 400),
    ("no messages", {"messages": []}, 400),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("negative max_tokens", {"max_tokens": -1}, 400),
    ("temperature of wrong type", {"temperature": "hot"}, 400),
    ("n of zero", {"n": 0}, 400),
    ("bad add_eos_length", {"add_eos_length": -1}, 400),
    ("an image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400),
    ("top_k below -1", {"top_k": -2}, 400),
    ("min_p above 1", {"min_p": 1.5}, 400),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, 400),
    ("top_logprobs above 20", {"logprobs": True, "top_logprobs": 21}, 400),
    ("echo on chat", {"echo": True}, 400),
    (
        "tool_choice naming no tool",
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "g"}}},
        400,
    ),
    ("tool_choice without tools", {"tool_choice": "required"}, 400),
    (
        "tools and response_format",
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        400,
    ),
    ("a message without content", {"messages": [{"role": "user"}]}, 400),
    ("response_format of another kind", {"response_format": {"type": "xml"}}, 400),
    ("json_schema without a schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400),
    ("json mode in approximate blocks", {"response_format": {"type": "json_object"}, "refine_iter": 2}, 400),
    ("a regex that does not compile", {"guided_regex": "a(", "lossless": True}, 400),
    ("response_format and guided_choice", {"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, 400),
    ("an unknown structured_outputs field", {"structured_outputs": {"structural_tag": "x"}, "lossless": True}, 400),
    ("presence_penalty above 2", {"presence_penalty": 2.5}, 400),
    ("repetition_penalty of 0", {"repetition_penalty": 0}, 400),
    ("logit_bias of a word", {"logit_bias": {"red": 1}}, 400),
    ("logit_bias above 100", {"logit_bias": {"5": 101}}, 400),
    ("logit_bias outside the vocabulary", {"logit_bias": {"99999": 1}}, 400),
    ("stop_token_ids outside the vocabulary", {"stop_token_ids": [99999]}, 400),
    ("negative min_tokens", {"min_tokens": -1}, 400),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400),
    ("prompt over max_length", {"messages": [{"role": "user", "content": "x" * 9000}]}, 400),
    ("continue_final_message after a user", {"continue_final_message": True, "add_generation_prompt": False}, 400),
    (
        "continue_final_message with add_generation_prompt",
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
            "continue_final_message": True,
        },
        400,
    ),
    ("chat_template_kwargs naming an option", {"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, 400),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,change,status", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, tiny_dir, name, change, status):
    defaults = {"logprobs": False, "tools": [], "response_format": {"type": "text"}, "presence_penalty": 0}
    good = {"model": tiny_dir, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **defaults}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = change if isinstance(change, bytes) else json.dumps({**good, **change})
    answer = requests.post(f"{server[0]}/v1/chat/completions", data=body, headers=headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    assert requests.post(f"{server[0]}/v1/chat/completions", json=good, headers=headers).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_api_key_is_401(server, tiny_dir, headers):
    body = {"model": tiny_dir, "messages": [{"role": "user", "content": "hi"}]}
    for answer in (
        requests.post(f"{server[0]}/v1/chat/completions", json=body, headers=headers),
        requests.get(f"{server[0]}/v1/models", headers=headers),
    ):
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "authentication_error"


def metrics(base: str) -> dict[tuple, float]:
    """The server's ``/metrics`` samples: ``{(name, (label, value), ...): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = requests.get(f"{base}/metrics")  # no API key, as vLLM's
    assert answer.status_code == 200, answer.text
    families = text_string_to_metric_families(answer.text)
    return {(s.name, *sorted(s.labels.items())): s.value for family in families for s in family.samples}


def grown(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, *sorted(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.mark.slow
def test_metrics_count_the_choices_tokens_and_forwards_the_responses_report(server, client, tiny_dir):
    base, _ = server
    before = metrics(base)
    chat = client.chat.completions.create(
        model=tiny_dir, messages=[{"role": "user", "content": "Hi"}], prediction={"type": "content", "content": "Hi!"}
    )
    many = client.completions.create(model=tiny_dir, prompt=["1+1=", "22+22="], n=2, max_tokens=5, temperature=0.8)
    kwargs = {"stream": True, "stream_options": {"include_usage": True}}
    chunks = list(client.completions.create(model=tiny_dir, prompt="12+34=", max_tokens=3, **kwargs))
    refused = requests.post(f"{base}/v1/chat/completions", json={"model": tiny_dir, "messages": []}, headers=AUTH)
    after = metrics(base)

    assert refused.status_code == 400 and grown(before, after, "dllm_lit:request_refused_total", status="400") == 1
    usages = [chat.usage, many.usage, chunks[-1].usage]
    counted = {"prompt_tokens": "prompt_tokens", "completion_tokens": "generation_tokens", "forwards": "forwards"}
    for field, name in counted.items():
        assert grown(before, after, f"dllm_lit:{name}_total") == sum(getattr(u, field) for u in usages), name
    predicted = chat.usage.completion_tokens_details
    for kind in ("accepted", "rejected"):
        count = getattr(predicted, f"{kind}_prediction_tokens")
        assert grown(before, after, "dllm_lit:prediction_tokens_total", kind=kind) == count, kind
    assert predicted.accepted_prediction_tokens + predicted.rejected_prediction_tokens == 3, "'Hi!': three tokens"
    reasons = [c.finish_reason for c in chat.choices + many.choices] + [chunks[-2].choices[0].finish_reason]
    for reason in set(reasons):
        assert grown(before, after, "dllm_lit:request_success_total", finished_reason=reason) == reasons.count(reason)
    assert "length" in reasons
    for histogram in ("time_to_first_token_seconds", "request_queue_time_seconds", "e2e_request_latency_seconds"):
        assert grown(before, after, f"dllm_lit:{histogram}_count") == len(reasons) == 6
    names = ("request_queue_time_seconds", "e2e_request_latency_seconds")
    queued, whole = (grown(before, after, f"dllm_lit:{name}_sum") for name in names)
    assert 0 < queued < whole, "a choice waits for its batch (at least the batch timeout), then decodes"
    assert after[("dllm_lit:num_requests_in_flight",)] == 0


@pytest.mark.slow
def test_a_chat_s_next_turn_reuses_the_keys_and_values_of_its_earlier_prompt_and_answers_as_predict(
    server, client, tiny_dir, tmp_path
):
    first = [{"role": "user", "content": "Tell me about caches."}]
    done = client.chat.completions.create(model=tiny_dir, messages=first)
    later = [*first, {"role": "assistant", "content": done.choices[0].message.content}]
    later.append({"role": "user", "content": "And then?"})
    before = metrics(server[0])
    again = client.chat.completions.create(model=tiny_dir, messages=later)
    assert again.usage.prompt_tokens_details.cached_tokens == done.usage.prompt_tokens
    assert grown(before, metrics(server[0]), "dllm_lit:prefix_cache_hits_total") == done.usage.prompt_tokens
    assert again.choices[0].message.content == predicted(tiny_dir, tmp_path, {"messages": later})["response"]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(server, client, tiny_dir, stream):
    base, log = server
    body = {
        "model": tiny_dir,
        "prompt": "Count forever:",
        "max_tokens": 7000,
        "stream": stream,
        "ignore_eos": True,
        "add_eos_length": 0,
    }
    cancelled, before = log.read_text().count("cancelled: the client went away"), metrics(base)
    if stream:
        with requests.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=60, stream=True) as answer:
            lines = answer.iter_lines(decode_unicode=True)
            assert next(line for line in lines if line.startswith("data:"))
    else:
        with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up waiting
            requests.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=1)
    deadline = time.time() + 60
    while log.read_text().count("cancelled: the client went away") == cancelled:
        assert time.time() < deadline, log.read_text()
        time.sleep(0.2)
    after = metrics(base)
    assert grown(before, after, "dllm_lit:request_failure_total", reason="cancelled") == 1
    assert after[("dllm_lit:num_requests_in_flight",)] == 0
    assert chat_text(client, tiny_dir, "hi", max_tokens=4)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["serve", "--model.add_eos_length=-1"], "--model.add_eos_length must be at least 0"),
        (["serve", "--dtype=fp8"], "dtype"),
        (["serve", "--model.model_name_or_path=/nonexistent"], "does not exist"),
        (["chat", "--model.lossless=maybe"], "model.lossless"),
        (["serve", "--port=PORT_IN_USE"], "Address already in use"),
        (["serve", "--port=-3"], "--port must be between 0 and 65535"),
        (["serve", "--timeout=-5"], "--timeout must be 0 (no limit) or longer than --batch_timeout"),
        (["serve", "--device=tpu"], "Unknown device 'tpu'"),
        (["chat", "--device=cuda:99"], "No cuda:99 device here"),
        (["serve", "--model.logprobs=2"], "--model.logprobs does nothing in serve"),
        (["serve", "--tool_call_parser=xml"], "tool_call_parser"),
        (["chat", "--chat_template=none.jinja"], "chat_template 'none.jinja' is neither a file nor a Jinja template."),
        (["serve", "--chat_template={% if %}"], "The chat template does not parse"),
        (["serve", "--lora_modules=a"], "--lora_modules takes NAME=DIR entries, got 'a'."),
        (["serve", '--chat_template_kwargs={"tokenize": true}'], "chat_template_kwargs cannot set 'tokenize'"),
        (["serve", "--lora_modules=a=/nonexistent"], "/nonexistent is not a LoRA adapter directory"),
        (["chat", "--model.logprobs=2"], "--model.logprobs does nothing in chat"),
        (["serve", "--model.prompt_cache_mib=-1"], "--model.prompt_cache_mib must be 0 (off) or more, got -1.0."),
    ],
)
def test_bad_flags_are_one_line(dllm_lit, dllm_lit_here, tmp_path, args, fragment):
    """Run in this process (seconds sooner), except the port already taken: the real command meets it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = dllm_lit if "--port=PORT_IN_USE" in args else dllm_lit_here
        args = [a.replace("PORT_IN_USE", str(taken.getsockname()[1])) for a in args]
        assert_one_line_error(run(args, tmp_path), fragment)


class Broken(torch.nn.Module):
    """A model whose forward fails: decoding errors must reach the job's client, not kill the worker."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = None

    def forward(self, **kwargs):
        raise RuntimeError("boom")


def test_a_decoding_failure_becomes_an_error_event_for_its_jobs_only(tiny_dir):
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    tokenizer = load_tokenizer(tiny_dir)
    settings = DecodeSettings(add_eos_length=3, max_new_tokens=8)
    job = Job("a", tokenizer("hi").input_ids, settings)
    events = [e for (e,) in stream_jobs(Broken(), tokenizer, [job])]
    assert events == [{"error": "Decoding failed: boom"}]
    good = [e for (e,) in stream_jobs(load_model(tiny_dir), tokenizer, [job])]
    assert good[-1]["finish_reason"] == "length" and "".join(e["text"] for e in good)


def test_stop_strings_in_the_settings_end_a_stream_as_a_requests_stop_does(tiny_dir):
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    settings = DecodeSettings(add_eos_length=3, max_new_tokens=24, ignore_eos=True)
    ids = tokenizer("Tell me a story.").input_ids
    plain = generate_blocks(model, torch.tensor([ids]), settings, eos_token_id=tokenizer.eos_token_id).rows[0]
    prefixes = [tokenizer.decode(plain.token_ids[:n], skip_special_tokens=True) for n in range(25)]
    full = prefixes[-1]
    stops = (full[k : k + 2] for k in range(5, 20))
    first_holding = ((stop, next(n for n in range(25) if stop in prefixes[n])) for stop in stops)
    stop, fewest = next((s, n) for s, n in first_holding if n % 4)  # it ends inside a block: the rest is not counted
    jobs = [Job("b", ids, settings, [stop]), Job("c", ids, settings.replace(stop_strings=(stop,)))]
    finals = [[e for (e,) in stream_jobs(model, tokenizer, [job]) if "finish_reason" in e][0] for job in jobs]
    assert [texts(model, tokenizer, [job])[0] for job in jobs] == [full[: full.index(stop)]] * 2
    assert finals[0] == finals[1] and finals[0]["finish_reason"] == "stop"
    assert finals[0]["completion_tokens"] == fewest, "usage counts the tokens through the stop string"


def one_batch_as_alone(model, tokenizer, jobs: list[Job], monkeypatch) -> list[str]:
    """The jobs' answers from ``stream_jobs``, checked to decode as one batch and to equal each job alone."""
    from dllm_lit import streaming

    batches = []
    engine = streaming.generate_blocks
    monkeypatch.setattr(
        streaming, "generate_blocks", lambda m, ids, *a, **k: batches.append(len(ids)) or engine(m, ids, *a, **k)
    )
    together = texts(model, tokenizer, jobs)
    assert batches == [len(jobs)]
    assert together == [texts(model, tokenizer, [job])[0] for job in jobs]
    return together


def test_jobs_with_other_seeds_and_lengths_share_a_batch_and_get_their_answers_alone(tiny_dir, monkeypatch):
    """Requests that differ in seed and max_tokens decode as one batch (the server's n choices and
    concurrent clients), and each gets the answer it gets alone."""
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    sampled = DecodeSettings(add_eos_length=3, max_new_tokens=24, temperature=1.2, lossless=True)
    ids = [tokenizer(text).input_ids for text in ("Tell me a story.", "Name a color.")]
    jobs = [
        Job("a", ids[0], sampled.replace(seed=5)),
        Job("b", ids[0], sampled.replace(seed=6, max_new_tokens=9)),
        Job("c", ids[1], sampled.replace(seed=5, max_new_tokens=17)),
    ]
    together = one_batch_as_alone(model, tokenizer, jobs, monkeypatch)
    assert len(set(together)) == 3 and len(tokenizer(together[1]).input_ids) <= 10


def test_jobs_with_other_grammars_share_a_batch_and_get_their_answers_alone(tiny_dir, monkeypatch):
    """Structured-output requests with different grammars (and one without) decode as one batch, each
    row under its own grammar, each getting the answer it gets alone."""
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    sampled = DecodeSettings(add_eos_length=3, max_new_tokens=24, temperature=1.2, seed=5, lossless=True)
    ids = tokenizer("Name a color.").input_ids
    jobs = [
        Job("regex", ids, sampled.replace(guided_regex=r"[a-z]{3}-[0-9]")),
        Job("choice", ids, sampled.replace(guided_choice=("red", "light blue"))),
        Job("free", ids, sampled),
    ]
    together = one_batch_as_alone(model, tokenizer, jobs, monkeypatch)
    assert re.fullmatch(r"[a-z]{3}-[0-9]", together[0]) and together[1] in ("red", "light blue")
    assert not re.fullmatch(r"[a-z]{3}-[0-9]", together[2])


def test_streamed_logprobs_end_at_the_stop_string_as_the_engines_do(tiny_dir):
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    settings = DecodeSettings(add_eos_length=3, max_new_tokens=24, ignore_eos=True, logprobs=2)
    ids = tokenizer("Tell me a story.").input_ids
    eos = tokenizer.eos_token_id
    full = generate_blocks(model, torch.tensor([ids]), settings, eos_token_id=eos).rows[0]
    stop = tokenizer.decode(full.token_ids[9:11])  # ends inside the third block
    cut = generate_blocks(
        model, torch.tensor([ids]), settings, eos_token_id=eos, stop_strings=stop, tokenizer=tokenizer
    ).rows[0]
    for job in (Job("a", ids, settings), Job("b", ids, settings, [stop])):
        events = [event for (event,) in stream_jobs(model, tokenizer, [job])]
        streamed = [tuple(entry) for event in events for entry in event.get("logprobs", [])]
        assert streamed == (cut if job.stop else full).logprobs
        assert len([event for event in events if event.get("logprobs")]) >= 3, "block by block"


@pytest.mark.parametrize(("device", "workers"), [("cpu", ["cpu"]), ("cuda", [["cuda:0"]]), ("cuda:1", [["cuda:1"]])])
def test_the_server_puts_its_worker_on_the_device_asked_for(device, workers):
    from dllm_lit.server import build_server
    from dllm_lit.settings import DecodeSettings

    options = dict(api_key=None, max_batch_size=1, batch_timeout=0.0, dtype="auto", timeout=30.0)
    server = build_server("smollm2", False, DecodeSettings(), served_model_name="m", device=device, **options)
    assert server.devices == workers, "LitServe starts one worker per entry, on that device"


@pytest.mark.parametrize(
    ("flag", "env", "used"), [([], "from-env", "from-env"), (["--api_key=flag"], "env", "flag"), ([], "", None)]
)
def test_the_api_key_comes_from_the_flag_or_else_the_environment(tiny_dir, monkeypatch, flag, env, used):
    from dllm_lit import server

    built = {}

    class Started:
        def run(self, **kwargs):
            built["ran"] = True

    monkeypatch.setattr(server, "build_server", lambda *args, **kwargs: built.update(kwargs) or Started())
    monkeypatch.setenv("DLLM_LIT_API_KEY", env)
    cli.main(["serve", f"--model.model_name_or_path={tiny_dir}", f"--port={free_port()}", *flag])
    assert built["ran"] and built["api_key"] == used


def test_a_broken_event_stream_ends_its_choice_with_an_error_not_a_hang(tiny_dir):
    import asyncio

    from litserve.utils import LitAPIStatus

    from dllm_lit.openai_spec import OpenAIBlockSpec
    from dllm_lit.settings import DecodeSettings

    spec = OpenAIBlockSpec(tiny_dir, False, DecodeSettings(), "m", None, {})

    async def stream(*items):
        for item in items:
            yield item, LitAPIStatus.OK

    async def merged():
        return [item async for item in spec._merged([stream('{"text": "hi"}', "{}"), stream("not JSON")])]

    events = asyncio.run(asyncio.wait_for(merged(), timeout=10))
    assert sorted(index for index, _ in events) == [0, 1] and (0, {"text": "hi"}) in events
    assert [event for index, event in events if index == 1][0]["error"].startswith("Decoding failed: ")


def texts(model, tokenizer, jobs: list[Job]) -> list[str]:
    """Each job's whole answer from ``stream_jobs``."""
    events = list(stream_jobs(model, tokenizer, jobs))
    return ["".join(step[n].get("text", "") for step in events) for n in range(len(jobs))]


@pytest.mark.slow
def test_a_compiled_server_compiles_its_passes_before_it_is_ready(tiny_dir, capfd, fresh_compiles, monkeypatch):
    """The worker's setup compiles for one row, a longer cache and more rows: requests of other lengths
    and batch sizes then compile nothing, and get the eager engine's answers."""
    from dataclasses import replace

    from dllm_lit.server import BlockDecodingAPI, OpenAIBlockSpec
    from dllm_lit.settings import DecodeSettings

    settings = DecodeSettings(add_eos_length=3, max_new_tokens=24, backend="inductor")
    worker = BlockDecodingAPI(OpenAIBlockSpec(tiny_dir, False, settings, "tiny", None, {}), "float32", 8, 0.05)
    # setup ignores SIGINT (a worker process's): the test process, and the subprocesses of later tests,
    # keep theirs
    with monkeypatch.context() as patch:
        patch.setattr(signal, "signal", lambda *args: None)
        worker.setup("cpu")
    assert "inductor: compiled the" in capfd.readouterr().err
    prompts = [worker.tokenizer(text).input_ids for text in ("a cat", "the dog ran " * 9, "x" * 150)]
    eager = replace(settings, backend="eager")
    for batch in ([prompts[2]], prompts):
        answers = {
            each: texts(worker.model, worker.tokenizer, [Job("j", ids, each) for ids in batch])
            for each in (settings, eager)
        }
        assert answers[settings] == answers[eager]
    assert "compiled the" not in capfd.readouterr().err


@pytest.mark.slow
def test_chat_on_a_compiled_backend_compiles_before_the_first_message(tiny_dir, capfd, monkeypatch, fresh_compiles):
    from dllm_lit.chat import chat
    from dllm_lit.settings import DecodeSettings

    type_lines(monkeypatch, [])  # Ctrl-D at the first prompt
    chat(tiny_dir, False, DecodeSettings(add_eos_length=3, max_new_tokens=24, backend="inductor"), device="cpu")
    said = capfd.readouterr().err
    assert 0 <= said.find("inductor: compiled the") < said.find("Type a message")


def test_ctrl_c_during_an_answer_stops_it_at_a_commit_keeping_a_prefix_of_the_full_answer(tiny_dir, capsys):
    """The SIGINT comes from the decoding thread at its fifth forward, as a terminal's would at any moment."""
    from dllm_lit.chat import answer
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    settings = DecodeSettings(add_eos_length=0, max_new_tokens=60, ignore_eos=True)
    job = Job("t", tokenizer("go on")["input_ids"], settings)
    full = answer(model, tokenizer, job)
    forwards = []

    def interrupt_at_the_fifth_forward(module, args):
        forwards.append(1)
        if len(forwards) == 5:
            signal.raise_signal(signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    hook = model.register_forward_pre_hook(interrupt_at_the_fifth_forward)
    try:
        stopped = answer(model, tokenizer, job)
    finally:
        hook.remove()
    assert 0 < len(stopped) < len(full) / 2 and full.startswith(stopped)
    assert capsys.readouterr().out.endswith(stopped + " [stopped]\n")
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_each_chat_answer_ends_with_a_line_of_its_tokens_and_forwards(tiny_dir, capsys, ignore_eos):
    from dllm_lit.chat import answer
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    settings = DecodeSettings(add_eos_length=3, max_new_tokens=24, ignore_eos=ignore_eos)
    ids = tokenizer("hello")["input_ids"]
    row = generate_blocks(model, torch.tensor([ids]), settings, eos_token_id=tokenizer.eos_token_id).rows[0]
    answer(model, tokenizer, Job("t", ids, settings))
    tokens, forwards = row.num_generated, row.forwards
    cut = ", cut at the length limit" if row.stop_reason == "max_new_tokens" else ""
    speed = r"[\d.]+ s \([\d.]+ tok/s\)"
    pattern = rf"\[{tokens} tokens in {speed}, {forwards} forwards \({tokens / forwards:.2f} tokens/forward\)"
    pattern += rf", prompt {len(ids)} tokens \(0 cached\)"
    assert re.fullmatch(pattern + re.escape(cut) + r"\]", capsys.readouterr().err.splitlines()[-1])
    assert (row.stop_reason == "max_new_tokens") == ignore_eos


def test_chat_drops_the_oldest_exchanges_that_no_longer_fit_and_refuses_a_message_too_long_alone(
    tiny_dir, capsys, monkeypatch
):
    from dllm_lit import chat
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_tokenizer
    from dllm_lit.settings import DecodeSettings

    lines = ["/help", "first question", "/nosuch", "second question", "x" * 300, "third question", "fourth"]
    type_lines(monkeypatch, [*lines, "/reset", "fifth", "/exit", "never read"])
    prompts = []

    def answered(model, tokenizer, job):
        prompts.append(job.ids)
        return f"answer {len(prompts)}"

    monkeypatch.setattr(chat, "answer", answered)
    chat.chat(tiny_dir, False, DecodeSettings(max_length=100, max_new_tokens=30), device="cpu", system="Be brief.")
    tokenizer, system = load_tokenizer(tiny_dir), {"role": "system", "content": "Be brief."}

    def prompt(*turns):
        roles = ["user", "assistant"] * len(turns)
        messages = [system] + [{"role": role, "content": text} for role, text in zip(roles, turns)]
        return encode_prompt(tokenizer, {"messages": messages}, use_chat_template=True)

    assert prompts == [
        prompt("first question"),
        prompt("first question", "answer 1", "second question"),  # 56 tokens: room for 30 more under 100
        prompt("second question", "answer 2", "third question"),  # the first exchange dropped, not the system
        prompt("third question", "answer 3", "fourth"),  # the message too long alone left no trace
        prompt("fifth"),  # /reset keeps the system message only
    ]
    said = capsys.readouterr().err
    assert "Unknown command /nosuch. Type a message." in said and said.count("/help shows this") == 3
    assert "makes a prompt of 3" in said and "leaves no room under max_length=100" in said
    assert said.count("2 oldest messages no longer fit under max_length and were dropped") == 2


def test_multiline_chat_messages_run_to_an_empty_line(tiny_dir, capsys, monkeypatch):
    from dllm_lit import chat
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_tokenizer
    from dllm_lit.settings import DecodeSettings

    type_lines(monkeypatch, ["Fix this:", "def f():", "    return 1", "", "/help", "last one"])
    prompts = []
    monkeypatch.setattr(chat, "answer", lambda model, tokenizer, job: prompts.append(job.ids) or "ok")
    chat.chat(tiny_dir, False, DecodeSettings(max_new_tokens=8), device="cpu", multiline=True)
    tokenizer, first = load_tokenizer(tiny_dir), "Fix this:\ndef f():\n    return 1"
    turns = [{"role": "user", "content": first}, {"role": "assistant", "content": "ok"}]
    assert prompts == [
        encode_prompt(tokenizer, {"messages": turns[:1]}, use_chat_template=True),
        encode_prompt(
            tokenizer, {"messages": [*turns, {"role": "user", "content": "last one"}]}, use_chat_template=True
        ),
    ], "the last message ends at Ctrl-D"
    assert capsys.readouterr().err.count("A message ends with an empty line.") == 2


def test_chat_passes_its_template_variables_to_every_prompt(tiny_dir, monkeypatch):
    from dllm_lit import chat
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_tokenizer
    from dllm_lit.settings import DecodeSettings

    type_lines(monkeypatch, ["hi", "again"])
    prompts = []
    monkeypatch.setattr(chat, "answer", lambda model, tokenizer, job: prompts.append(job.ids) or "ok")
    variables = {"enable_thinking": False}  # the tiny template's, as Qwen3's
    chat.chat(tiny_dir, False, DecodeSettings(max_new_tokens=8), device="cpu", chat_template_kwargs=variables)
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    tokenizer = load_tokenizer(tiny_dir)
    expected = [
        encode_prompt(tokenizer, {"messages": turns[:n], "chat_template_kwargs": variables}, True) for n in (1, 3)
    ]
    assert prompts == expected and "/no_think" in tokenizer.decode(prompts[0])
    with pytest.raises(ValueError, match="chat_template_kwargs cannot set 'tools'"):
        chat.chat(tiny_dir, False, DecodeSettings(), device="cpu", chat_template_kwargs={"tools": []})


def test_a_chat_turn_computes_only_what_follows_the_last_prompt_and_answers_as_without_a_cache(
    tiny_dir, capsys, monkeypatch
):
    from dllm_lit import chat
    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_tokenizer
    from dllm_lit.settings import DecodeSettings

    said = {}
    for mib in (0, 1024):  # off, then chat's default
        type_lines(monkeypatch, ["hi", "tell me more", "/reset", "hi"])
        settings = DecodeSettings(lossless=True, add_eos_length=3, max_new_tokens=12, prompt_cache_mib=mib)
        chat.chat(tiny_dir, False, settings, device="cpu")
        out, err = capsys.readouterr()
        said[mib] = out, [tuple(map(int, pair)) for pair in re.findall(r"prompt (\d+) tokens \((\d+) cached\)", err)]
    n = len(encode_prompt(load_tokenizer(tiny_dir), {"messages": [{"role": "user", "content": "hi"}]}, True))
    (plain, counts), (cached, reused) = said[0], said[1024]
    second = counts[1][0]
    assert cached == plain and counts == [(n, 0), (second, 0), (n, 0)]
    (first, none), (again, earlier), (alone, cut) = reused  # each turn reads the earlier turns' K/V
    assert (first, none, again, alone, cut) == (n, 0, second, n, n - 1) and n <= earlier < second


def test_ctrl_c_while_chat_loads_exits_130_without_a_traceback(tiny_dir, capsys, monkeypatch):
    from dllm_lit import chat

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "load_model", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["chat", f"--model.model_name_or_path={tiny_dir}"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.endswith("\ndllm_lit: interrupted\n")


@pytest.mark.slow
def test_chat_keeps_the_history_and_ctrl_c_stops_an_answer(tiny_dir, tmp_path):
    import pexpect

    from dllm_lit.data import encode_prompt
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.settings import DecodeSettings

    args = ["-m", "dllm_lit.cli", "chat", f"--model.model_name_or_path={tiny_dir}", *SETTINGS]
    session = pexpect.spawn(
        sys.executable, args, env={**os.environ, "HF_HUB_OFFLINE": "1"}, encoding="utf-8", timeout=120
    )
    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    settings = DecodeSettings(add_eos_length=3, max_new_tokens=24)
    history = []
    for question in ("hello", "and then?"):
        session.expect_exact(">> ")
        session.sendline(question)
        history.append({"role": "user", "content": question})
        ids = encode_prompt(tokenizer, {"messages": history}, use_chat_template=True)
        expected = "".join(e.get("text", "") for (e,) in stream_jobs(model, tokenizer, [Job("t", ids, settings)]))
        session.expect_exact(question + "\r\n")  # the terminal's echo
        session.expect_exact(expected.replace("\n", "\r\n") + "\r\n")
        history.append({"role": "assistant", "content": expected})
    session.expect_exact(">> ")
    session.sendline("/exit")
    session.expect(pexpect.EOF)

    long_answers = [*args, "--model.ignore_eos=true", "--model.max_new_tokens=100000", "--model.add_eos_length=0"]
    session = pexpect.spawn(sys.executable, long_answers, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    session.expect_exact(b">> ")
    session.sendline(b"go on forever")
    session.expect_exact(b"go on forever\r\n")
    session.expect(rb"\S")  # the answer is streaming
    session.sendintr()
    session.expect_exact(b"[stopped]")
    session.expect_exact(b">> ")
    session.sendline(b"/exit")
    session.expect(pexpect.EOF)


@pytest.mark.parametrize(
    ("allowed", "origin", "status"), [(None, None, 405), (["http://app.test"], "http://app.test", 200)]
)
def test_browser_pages_call_the_server_only_from_the_allowed_origins(allowed, origin, status):
    from starlette.testclient import TestClient

    from dllm_lit.server import build_server
    from dllm_lit.settings import DecodeSettings

    options = dict(api_key=None, max_batch_size=1, batch_timeout=0.0, dtype="auto", timeout=30.0, device="cpu")
    server = build_server("smollm2", False, DecodeSettings(), served_model_name="m", allowed_origins=allowed, **options)
    client = TestClient(server.app)  # no lifespan: no worker starts
    for page in ("http://app.test", "http://evil.test"):
        asked = {
            "Origin": page,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        answer = client.options("/v1/chat/completions", headers=asked)
        allowed_here = page == origin
        assert answer.status_code == (status if allowed_here or allowed is None else 400), (page, answer.text)
        assert answer.headers.get("access-control-allow-origin") == (page if allowed_here else None)


def test_an_item_reference_stands_for_the_stored_item_with_its_id():
    from dllm_lit.openai_api import OpenAIError
    from dllm_lit.responses_api import ResponseStore, chat_body

    store = ResponseStore()
    asked = {"type": "message", "id": "msg_1", "role": "user", "content": "What is 1+2?"}
    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "add", "arguments": '{"a": 1}'}
    store.keep({"id": "resp_1", "status": "completed", "output": [call]}, [asked])
    answer = {"type": "function_call_output", "call_id": "call_1", "output": "3"}
    referenced = [{"type": "item_reference", "id": "msg_1"}, {"type": "item_reference", "id": "fc_1"}, answer]
    chat, _, conversation = chat_body({"model": "m", "input": referenced}, store)
    assert chat == chat_body({"model": "m", "input": [asked, call, answer]}, store)[0]
    assert conversation == [asked, call, answer], "kept as the items themselves"
    with pytest.raises(OpenAIError, match="input.1: no stored item has the id 'fc_2'"):
        chat_body({"model": "m", "input": [answer, {"type": "item_reference", "id": "fc_2"}]}, store)


def test_input_items_list_what_a_response_answered_a_page_at_a_time():
    from dllm_lit.openai_api import OpenAIError
    from dllm_lit.responses_api import ResponseStore

    store = ResponseStore()
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    conversation = [
        {"role": "user", "content": "hi"},
        call,
        {"type": "function_call_output", "call_id": "c", "output": "1"},
    ]
    store.keep({"id": "r", "status": "completed", "output": []}, conversation)
    whole = store.input_items("r", order="asc")
    assert [item["type"] for item in whole["data"]] == ["message", "function_call", "function_call_output"]
    assert whole["data"][0]["content"] == [{"type": "input_text", "text": "hi"}] and not whole["has_more"]
    ids = [item["id"] for item in whole["data"]]
    assert len(set(ids)) == 3 and store.input_items("r", order="asc") == whole, "each item's id given once"
    page = store.input_items("r", limit=2)  # the newest first, as OpenAI's default
    assert [item["id"] for item in page["data"]] == ids[:0:-1] and page["has_more"] and page["last_id"] == ids[1]
    rest = store.input_items("r", limit=2, after=page["last_id"])
    assert [item["id"] for item in rest["data"]] == ids[:1] and not rest["has_more"]
    for bad in ({"order": "up"}, {"limit": 0}, {"after": "msg_x"}):
        with pytest.raises(OpenAIError):
            store.input_items("r", **bad)


def test_a_job_s_response_buffer_is_released_when_its_stream_ends():
    import asyncio
    import queue

    from litserve import LitServer
    from litserve.utils import LitAPIStatus

    from dllm_lit.openai_spec import OpenAIBlockSpec
    from dllm_lit.settings import DecodeSettings

    spec = OpenAIBlockSpec.__new__(OpenAIBlockSpec)  # only what _submit reads
    spec.response_buffer, spec.request_queue, spec.response_queue_id = {}, queue.Queue(), 0
    spec.data_streamer = LitServer.data_streamer

    async def run(ending):
        stream = spec._submit(Job("u", [1, 2], DecodeSettings()))
        item = spec.response_buffer["u"]
        item.response_queue.extend([('{"text": "a"}', LitAPIStatus.OK), ending])
        item.event.set()
        return [event async for event in spec._merged([stream])]

    finished = asyncio.run(run(("", LitAPIStatus.FINISH_STREAMING)))
    assert finished == [(0, {"text": "a"})] and spec.response_buffer == {}
    failed = asyncio.run(run(("boom", LitAPIStatus.ERROR)))
    assert failed[-1] == (0, {"error": "Decoding failed: boom"}) and spec.response_buffer == {}


def test_a_cancelled_response_that_then_fails_stays_cancelled_with_the_error():
    from dllm_lit.responses_api import ResponseBuilder, ResponsesRequest
    from dllm_lit.settings import DecodeSettings

    for status, ended in (("in_progress", "failed"), ("cancelled", "cancelled")):
        builder = ResponseBuilder(ResponsesRequest(model="m", input="hi"), "m", DecodeSettings(), None)
        builder.response["status"] = status
        ((kind, data),) = builder.fail("boom")
        assert (kind, data["response"]["status"], data["response"]["error"]["message"]) == (
            "response.failed",
            ended,
            "boom",
        )


def test_an_event_log_gives_each_reader_the_events_after_its_own_and_then_the_new_ones():
    import asyncio

    from dllm_lit.responses_api import EventLog

    async def readers():
        log = EventLog()
        log.add([("a", {}), ("b", {})])
        early, late = asyncio.ensure_future(collect(log.read())), asyncio.ensure_future(collect(log.read(0)))
        await asyncio.sleep(0)
        log.add([("c", {})])
        await asyncio.sleep(0)
        log.add([("d", {})])
        log.end()
        return await early, await late, await collect(log.read(2))

    async def collect(events):
        return [kind async for kind, _ in events]

    assert asyncio.run(readers()) == (["a", "b", "c", "d"], ["b", "c", "d"], ["d"])


def test_the_response_store_keeps_a_background_response_live_until_it_ends_and_cancels_or_forgets_it():
    from dllm_lit.openai_api import OpenAIError
    from dllm_lit.responses_api import ResponseStore

    store, stopped = ResponseStore(capacity=2), []
    running = {"id": "a", "status": "in_progress", "background": True, "output": []}
    store.begin(running, [{"role": "user", "content": "hi"}], lambda: stopped.append("a"))
    running["output"].append("so far")
    assert store.response("a")["output"] == ["so far"], "read as it stands"
    with pytest.raises(OpenAIError, match="is in_progress: only a finished answer can be continued"):
        store.conversation("a")
    assert store.cancel("a")["status"] == "cancelled" and stopped == ["a"]
    assert store.cancel("a")["status"] == "cancelled" and stopped == ["a"], "stopped once"
    store.end(running, [])
    running["status"] = "changed later"
    assert store.response("a")["status"] == "cancelled", "kept as it ended: a copy"
    gone = {"id": "b", "status": "queued", "background": True, "output": []}
    store.begin(gone, [], lambda: stopped.append("b"))
    store.delete("b")
    store.end(gone, [])
    assert stopped == ["a", "b"] and "b" not in store.kept, "a deleted response stays deleted"
    finished = {"id": "c", "status": "completed", "background": False, "output": ["x"]}
    with pytest.raises(OpenAIError, match="Only a background response can be cancelled"):
        store.keep(finished, []) or store.cancel("c")
    store.keep(finished | {"id": "d"}, [])
    assert list(store.kept) == ["c", "d"], "the capacity: the least recent goes"


def test_a_saved_chat_loads_back_and_goes_on_as_if_it_never_left(tiny_dir, tmp_path, capsys, monkeypatch):
    from dllm_lit import chat
    from dllm_lit.settings import DecodeSettings

    saved, bad = tmp_path / "chat.json", write(tmp_path / "bad.json", '{"messages": [{"role": "robot"}]}')
    said = []
    for lines in (
        ["hi", f"/save {saved}", "/reset", "/save", f"/load {tmp_path / 'none.json'}", f"/load {bad}"],
        [f"/load {saved}", "tell me more"],
        ["hi", "tell me more"],
    ):
        type_lines(monkeypatch, lines)
        chat.chat(tiny_dir, False, DecodeSettings(max_new_tokens=8), device="cpu", system="Be brief.")
        said.append(capsys.readouterr())
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] and messages[1]["content"] == "hi"
    first = said[0].out.removesuffix("\n")  # the line Ctrl-D ends the first session with
    assert first + said[1].out == said[2].out, "the answers of one chat, saved and loaded between turns"
    for note in ("(saved 3 messages to", "[/save needs a file name", "[cannot read", "bad.json is not a conversation"):
        assert note in said[0].err
    assert "(loaded 3 messages from" in said[1].err


@pytest.mark.slow
def test_a_predicted_answer_comes_back_the_same_in_fewer_forwards(client, tiny_dir):
    asked = dict(model=tiny_dir, messages=[{"role": "user", "content": "Say it again."}], max_tokens=24)
    lossless = {"lossless": True, "ignore_eos": True}
    tokenizer = load_tokenizer(tiny_dir)

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    plain = client.chat.completions.create(**asked, extra_body=lossless)
    text = plain.choices[0].message.content
    for prediction in (text, [{"type": "text", "text": text[:5]}, {"type": "text", "text": text[5:]}]):
        predicted = client.chat.completions.create(
            **asked, prediction={"type": "content", "content": prediction}, extra_body=lossless
        )
        assert predicted.choices[0].message.content == text
        assert predicted.usage.forwards < plain.usage.forwards, (predicted.usage, plain.usage)
        details = predicted.usage.completion_tokens_details
        assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (tokens(text), 0)
    longer = client.chat.completions.create(
        **asked, prediction={"type": "content", "content": text + "!!"}, extra_body=lossless
    )
    details, added = longer.usage.completion_tokens_details, tokens(text + "!!") - tokens(text)
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (tokens(text), added)
    details = plain.usage.completion_tokens_details
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0)
    with pytest.raises(Exception, match="prediction"):
        client.chat.completions.create(**asked, prediction={"type": "image", "content": "x"})


@pytest.mark.parametrize(
    "prediction, answer, counts",
    [
        (None, [1, 2], (0, 0)),
        ([1, 2, 3], [1, 2, 3], (3, 0)),
        ([1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6], (4, 1)),  # one token replaced, one added
        ([7, 1, 2, 3], [1, 2], (2, 2)),  # the answer stopped early
        ([5, 6], [1, 2, 3], (0, 2)),
        ([1] * 3000 + [5] + [2] * 10, [1] * 3000 + [2] * 10, (3010, 1)),  # common ends count at once
    ],
)
def test_prediction_tokens_count_the_predicted_tokens_the_answer_repeats(prediction, answer, counts):
    assert prediction_tokens(prediction, answer) == counts
