"""``dllm_lit batch``: a file of OpenAI batch requests answered offline, as ``vllm run-batch`` does.

The input is OpenAI's Batch API format, one request a line: ``{"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions" | "/v1/responses", "body"}``, every line checked before a
model loads. The requests go to a ``dllm_lit serve`` with the same flags, started on a free local port
with a one-time key and stopped at the end, ``--concurrency`` at a time: each answer is exactly what
the server gives, and the server batches them. A body's ``model`` names a ``--lora_modules`` adapter or
is answered by the model (an OpenAI file names OpenAI's models).

Each result is appended to ``.<output>.parts`` as it comes (fsynced). At the end the output file is
written in input order, one line a request in OpenAI's batch output format, ``{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error": null}``, and the parts removed. An
interrupted run resumes with ``--resume true`` (the answered requests are kept, those the server
failed with a 5xx asked again), but only with the same requests, model and flags.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dllm_lit.model_args import model_settings
from dllm_lit.models import resolve
from dllm_lit.outputs import (
    OutputError,
    OutputLock,
    check_replaceable,
    check_writable,
    fingerprint_difference,
    model_identity,
    parts_dir,
    run_fingerprint,
)
from dllm_lit.progress import counter
from dllm_lit.server import read_lora_modules, serve_parser

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
BATCH_FLAGS = ("input_file", "output_file", "concurrency", "resume", "overwrite")
ANSWERING_FLAGS = ("device", "dtype", "served_model_name", "tool_call_parser", "chat_template", "lora_modules")
"""The server's flags besides ``--model.*`` that may change an answer: what resume compares (with the
requests and the model; not ports, batch sizes or timeouts)."""


def read_requests(path: str) -> list[dict[str, Any]]:
    """The requests of an OpenAI batch file, each line checked, or a ValueError naming the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--input_file {path} cannot be read: {getattr(error, 'strerror', None) or error}.") from None
    requests, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
        problem = request_problem(request, seen)
        if problem:
            raise ValueError(f"{path}, line {number}: {problem}")
        seen.add(request["custom_id"])
        requests.append(request)
    if not requests:
        raise ValueError(f"--input_file {path} holds no requests.")
    return requests


def request_problem(request: Any, seen: set[str]) -> str | None:
    """What is wrong with one line of a batch file (None: nothing)."""
    if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
        return "each line is an object with a 'custom_id' string."
    if request["custom_id"] in seen:
        return f"custom_id {request['custom_id']!r} is used twice."
    if request.get("method", "POST") != "POST" or request.get("url") not in URLS:
        return f"'method' is POST and 'url' one of {', '.join(URLS)}."
    if not isinstance(request.get("body"), dict):
        return "'body' is the request's JSON object."
    if request["body"].get("background"):
        return "'background' has no place in a batch, whose answers are each written whole."
    return None


class BatchStopped(RuntimeError):
    """The server stopped answering; the results so far are kept for ``--resume true``."""


def batch(config) -> None:
    """Answer every request of ``--input_file`` into ``--output_file`` (see the module docstring)."""
    requests, output = read_requests(config.input_file), Path(config.output_file)
    name, trust, settings = model_settings(config.model)  # a bad flag fails here, before any model loads
    if config.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {config.concurrency}.")
    names = served_names(config, settings)
    check_writable(output)
    check_replaceable(output, resume=config.resume, overwrite=config.overwrite, flags="--")
    lock = OutputLock(output, "--output_file")
    lock.acquire()
    try:
        flags = {name: config[name] for name in ANSWERING_FLAGS}
        identity = model_identity(name, resolve(name)) | {"trust_remote_code": trust}
        fingerprint = run_fingerprint(requests, data=flags, decoding=asdict(settings), model=identity)
        unfinished = config.resume and (parts_dir(output) / "results.jsonl").is_file()
        done = resumed(output, fingerprint) if unfinished else start_parts(output, fingerprint)
        todo = [request for request in requests if request["custom_id"] not in done]
        with LocalServer(config) as (base, key):
            done |= answer_all(todo, base, key, names, output, config.concurrency, len(done))
        write_output(output, requests, done)
    except (KeyboardInterrupt, BatchStopped):
        print("dllm_lit batch: the answers so far are kept; --resume true finishes the run.", file=sys.stderr)
        raise
    finally:
        lock.release()
    failed = sum(line["response"]["status_code"] != 200 for line in done.values())
    print(f"dllm_lit batch: {len(done)} requests -> {output} ({failed} failed)", file=sys.stderr)


def served_names(config, settings) -> tuple[str, set[str]]:
    """The served model's name and its adapters' (the names a body's ``model`` may keep); bad
    ``--lora_modules`` fail here, as ``serve`` would fail on them, before the server starts."""
    name = config.served_model_name or config.model.model_name_or_path
    return name, set(read_lora_modules(config.lora_modules, name, config.model.model_name_or_path, settings))


def start_parts(output: Path, fingerprint: dict) -> dict:
    """A fresh parts file that starts with the run's fingerprint; no results yet."""
    parts = parts_dir(output)
    parts.mkdir(exist_ok=True)
    (parts / "results.jsonl").write_text(json.dumps({"fingerprint": fingerprint}) + "\n", encoding="utf-8")
    return {}


def resumed(output: Path, fingerprint: dict) -> dict[str, dict]:
    """The results an interrupted run kept, by ``custom_id``, if that run was this one."""
    header, *lines = (parts_dir(output) / "results.jsonl").read_text(encoding="utf-8").splitlines()
    difference = fingerprint_difference(json.loads(header)["fingerprint"], fingerprint)
    if difference:
        raise OutputError(f"Cannot resume {output}: {difference}; pass --overwrite true to start again.")
    kept = {}
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # cut off by a kill: that request is asked again
            continue
        if row["response"]["status_code"] < 500:  # a server error is the server's, not the request's: asked again
            kept[row["custom_id"]] = row
    return kept


class LocalServer:
    """``with LocalServer(config) as (base_url, key)``: ``dllm_lit serve`` with these flags on a free
    local port and a one-time key, ready; stopped on leaving."""

    def __init__(self, config):
        self.config = config.clone()
        for name in BATCH_FLAGS:
            del self.config[name]

    def __enter__(self) -> tuple[str, str]:
        self.config.host, self.config.port = "127.0.0.1", free_port()
        self.config.api_key = None  # the one-time key, from the environment (not in the flags file)
        key, self.flags = secrets.token_urlsafe(24), tempfile.NamedTemporaryFile("w", suffix=".yaml")
        self.flags.write(serve_parser().dump(self.config))
        self.flags.flush()
        command = [sys.executable, "-m", "dllm_lit.cli", "serve", f"--config={self.flags.name}"]
        env = {**os.environ, "DLLM_LIT_API_KEY": key}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        base = f"http://127.0.0.1:{self.config.port}"
        try:
            while not healthy(base):
                if self.process.poll() is not None:
                    raise SystemExit(1)  # the server has said why on stderr
                time.sleep(0.5)
        except BaseException as error:  # Ctrl-C while it starts: stop it too
            self.__exit__(type(error))
            raise
        return base, key

    def __exit__(self, kind, *error) -> None:
        """Stop the server: at once when the batch stopped early (requests still out would hold a
        graceful shutdown for half a minute), else gracefully."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM if kind is None else signal.SIGKILL)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.flags.close()


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def answer_all(todo, base: str, key: str, served_names, output: Path, concurrency: int, earlier: int) -> dict:
    """Post every request, ``concurrency`` at a time; each result appended to the parts as it comes.
    On Ctrl-C (or a failure) nothing more is written and the requests still out are abandoned."""
    done, lock = {}, threading.Lock()
    parts = (parts_dir(output) / "results.jsonl").open("a", encoding="utf-8")
    bar = counter(earlier + len(todo), initial=earlier, desc="batch", unit="request")

    def one(request: dict) -> None:
        line = result(request, *post(base, key, request, served_names))
        with lock:
            if parts.closed:  # the run has stopped
                return
            parts.write(json.dumps(line, ensure_ascii=False) + "\n")
            parts.flush()
            os.fsync(parts.fileno())
            done[request["custom_id"]] = line
            bar.update()

    pool = ThreadPoolExecutor(concurrency)
    try:
        for future in [pool.submit(one, request) for request in todo]:
            future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            parts.close()
        bar.close()
    return done


def post(base: str, key: str, request: dict, served_names: tuple[str, set[str]]) -> tuple[int, dict]:
    """The server's status and JSON body for one request (streaming off; ``model``: see the module)."""
    model, adapters = served_names
    body = request["body"] | {"stream": False}
    body["model"] = body.get("model") if body.get("model") in adapters else model
    sent = urllib.request.Request(
        base + request["url"],
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(sent, timeout=None) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
    except OSError as error:  # the server went away
        raise BatchStopped(f"The server stopped answering ({error}).") from None


def result(request: dict, status: int, body: dict) -> dict:
    """One line of OpenAI's batch output."""
    response = {"status_code": status, "request_id": body.get("id", f"req_{uuid.uuid4().hex[:24]}"), "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": request["custom_id"],
        "response": response,
        "error": None,
    }


def write_output(output: Path, requests: list[dict], done: dict[str, dict]) -> None:
    """The results in input order, written next to the output file (a symlink keeps its link) and
    replacing it in one step; then the parts are removed."""
    path = output.resolve()
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with partial.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(done[request["custom_id"]], ensure_ascii=False) + "\n" for request in requests)
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
    parts = parts_dir(output)
    (parts / "results.jsonl").unlink()
    parts.rmdir()


def batch_parser():
    """``dllm_lit batch --input_file F --output_file F [serve's flags]``."""
    from dllm_lit.model_args import add_function_flags

    parser = serve_parser()
    parser.prog, parser.description = "dllm_lit batch", "OpenAI batch requests answered offline by dllm_lit serve."
    add_function_flags(parser, batch_flags)
    return parser


def batch_flags(
    *, input_file: str, output_file: str, concurrency: int = 16, resume: bool = False, overwrite: bool = False
) -> None:
    """The batch's own flags.

    Args:
        input_file: OpenAI batch requests, one JSON object a line (``custom_id``, ``url``, ``body``).
        output_file: The results, one line a request in input order (OpenAI's batch output format).
        concurrency: Requests sent at a time (the server batches up to ``--max_batch_size`` of them).
        resume: Finish an interrupted run (same requests, model and flags), keeping its results
            (a 5xx answer, the server's failure, is asked again).
        overwrite: Replace an existing output file (or an interrupted run's results).
    """


def main(args: list[str]) -> None:
    try:
        batch(batch_parser().parse_args(args))
    except BatchStopped as error:
        print(f"dllm_lit batch: {error}", file=sys.stderr)
        sys.exit(1)
