"""Serving under load: concurrent clients against `dllm_lit serve`, beside `dllm_lit predict`.

    python benchmarks/bench_serve.py smollm2 --clients 32 --max-tokens 32 --max-batch-size 8

Starts the server on a free localhost port, sends ``--clients`` chat requests at once (one thread
each, the real ``openai`` client), and prints p50/p95 latency, throughput (completion tokens per
second of wall time) and whether every answer equals the same prompt answered alone. Then decodes
the same prompts with ``dllm_lit predict`` (batch size = ``--max-batch-size``) and prints its
performance line (tok/s over decoding, model load excluded) and whether its answers match.

``--schemas K``: client ``i`` asks for JSON following schema ``i % K`` (``response_format``; one
property named for its schema, compact), as structured-output traffic does; requests with different
schemas share the server's batches. ``predict`` takes one schema per run, so it is skipped then.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from openai import OpenAI

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TOPICS = ["the sea", "bread", "a bicycle", "winter", "music", "a library", "rain", "the moon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, settings: list[str], max_batch_size: int) -> subprocess.Popen:
    args = ["serve", f"--model.model_name_or_path={model}", *settings, f"--port={port}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "dllm_lit.cli", *args, f"--max_batch_size={max_batch_size}", "--batch_timeout=0.05"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited while starting")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server never became healthy")


def schema(index: int) -> dict:
    """The ``response_format`` of schema ``index``: an object with one string property of its own."""
    field = f"{TOPICS[index % len(TOPICS)].split()[-1]}_{index}"
    closed = {"type": "object", "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    body = closed | {"properties": {field: {"type": "string", "maxLength": 60}}, "required": [field]}
    return {"type": "json_schema", "json_schema": {"name": field, "schema": body}}


def ask(client: OpenAI, model: str, question: str, max_tokens: int, **extra) -> tuple[float, str, int]:
    """``(seconds, answer, completion tokens)`` of one chat request."""
    start = time.perf_counter()
    done = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, **extra
    )
    return time.perf_counter() - start, done.choices[0].message.content, done.usage.completion_tokens


def run_predict(model: str, questions: list[str], settings: list[str], max_tokens: int, batch: int) -> tuple:
    """``(answers, performance line)`` of `dllm_lit predict` on the questions."""
    with tempfile.TemporaryDirectory() as work:
        prompts, out = Path(work) / "p.jsonl", Path(work) / "out.jsonl"
        rows = [{"messages": [{"role": "user", "content": q}]} for q in questions]
        prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
        done = subprocess.run(
            [sys.executable, "-m", "dllm_lit.cli", "predict", f"--model.model_name_or_path={model}", *settings]
            + [f"--model.max_new_tokens={max_tokens}", f"--data.prompts_file={prompts}", f"--data.batch_size={batch}"]
            + [f"--writer.output_file={out}"],
            env=ENV,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr)
        answers = [json.loads(line)["response"] for line in out.read_text().splitlines()]
        line = next((x for x in done.stderr.splitlines() if "tok/s" in x), "?")
        return answers, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--settings", nargs="*", default=["--model.add_eos_length=7", "--model.lossless=true"])
    parser.add_argument("--schemas", type=int, default=0, help="JSON answers, one of this many schemas each")
    args = parser.parse_args()
    questions = [f"Write one sentence about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(args.clients)]
    extras = [dict(response_format=schema(i % args.schemas)) if args.schemas else {} for i in range(args.clients)]
    port = free_port()
    server = start_server(args.model, port, args.settings, args.max_batch_size)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
        alone = [ask(client, args.model, q, args.max_tokens, **e)[1] for q, e in zip(questions, extras)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(lambda q, e: ask(client, args.model, q, args.max_tokens, **e), questions, extras))
        wall = time.perf_counter() - start
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    latencies = sorted(seconds for seconds, _, _ in results)
    tokens = sum(n for _, _, n in results)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    same = sum(answer == one for (_, answer, _), one in zip(results, alone))
    print(f"\n`python benchmarks/bench_serve.py {' '.join(sys.argv[1:])}`\n")
    print("| path | requests | p50 latency s | p95 latency s | completion tok/s | answers = one by one |")
    print("|---|---|---|---|---|---|")
    print(
        f"| serve, {args.clients} concurrent clients | {len(results)} | {statistics.median(latencies):.2f} | "
        f"{p95:.2f} | {tokens / wall:.1f} | {same}/{len(results)} |"
    )
    if args.schemas:
        return
    answers, predict_line = run_predict(args.model, questions, args.settings, args.max_tokens, args.max_batch_size)
    print(f"\npredict on the same prompts: {predict_line}")
    print(f"predict answers = serve answers: {sum(a == r[1] for a, r in zip(answers, results))}/{len(results)}")


if __name__ == "__main__":
    main()
