"""``dllm_lit serve``: an OpenAI-compatible HTTP server on LitServe, streaming block by block.

LitServe runs the HTTP process and a model worker process.
:class:`~dllm_lit.openai_spec.OpenAIBlockSpec` (a LitServe spec) owns the HTTP side: OpenAI's
endpoints, vLLM's ``/tokenize`` and ``/detokenize``, and ``GET /metrics`` (LitServe adds ``GET /health``);
it checks each request (:mod:`dllm_lit.openai_api`), tokenizes it and queues one
:class:`~dllm_lit.streaming.Job` per choice. :class:`BlockDecodingAPI` (a LitServe API) is the
worker: LitServe batches queued jobs (``max_batch_size``, ``batch_timeout``) and the worker streams
their events (:func:`~dllm_lit.streaming.stream_jobs`), one per committed block. A client that
disconnects mid-stream is marked in a dict shared through a ``multiprocessing.Manager``; the worker
stops its row at the next commit.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any, Literal

import litserve as ls
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from dllm_lit.adapters import AdapterSwitch, adapter_base, is_adapter, is_drafter
from dllm_lit.data import template_options
from dllm_lit.model_args import ANSWERING_DEFAULTS, add_function_flags, function_flags, model_parser, model_settings
from dllm_lit.models import load_model, load_tokenizer, resolve, resolve_device, resolve_dtype
from dllm_lit.openai_api import OpenAIError
from dllm_lit.openai_spec import OpenAIBlockSpec
from dllm_lit.settings import DecodeSettings
from dllm_lit.streaming import Job, stream_jobs, warm_up


class BlockDecodingAPI(ls.LitAPI):
    """The model worker: loads the model in ``setup`` and streams the events of each batch of jobs."""

    def __init__(self, spec: OpenAIBlockSpec, dtype: str, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec, stream=True)
        self.dtype = dtype

    def setup(self, device: str) -> None:
        from dllm_lit.cli import quiet_libraries  # this is a fresh worker process

        # Ctrl-C reaches every process of the terminal's group: the HTTP process shuts the server
        # down and terminates this worker; a KeyboardInterrupt here would only print a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        quiet_libraries()
        try:
            self._load(device)
        except Exception as error:  # one sentence, not LitServe's traceback; the server then stops
            logging.getLogger("litserve.loops.loops").disabled = True
            reason = " ".join(str(error).split())
            print(f"dllm_lit serve: the model worker could not start: {reason}", file=sys.stderr, flush=True)
            raise

    def _load(self, device: str) -> None:
        spec = self._spec
        dtype = resolve_dtype(self.dtype, device)
        self.tokenizer = spec.tokenizer
        model = load_model(spec.model_name_or_path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
        self.adapters = AdapterSwitch(model, spec.lora_modules) if spec.lora_modules else None
        self.model = (self.adapters.model if self.adapters else model).to(device)
        self.cancelled = spec.cancelled
        warm_up(self.model, self.tokenizer, spec.settings, rows=2)  # before /health says ready

    def decode_request(self, request: Job) -> Job:  # LitServe reads the parameter's name
        return request

    def batch(self, jobs: list[Job]) -> list[Job]:
        return list(jobs)

    def predict(self, jobs: Job | list[Job]) -> Iterator:
        single = not isinstance(jobs, list)  # LitServe's unbatched loop passes one job
        switch = self.adapters.use if self.adapters else None
        for events in stream_jobs(self.model, self.tokenizer, [jobs] if single else jobs, self._is_cancelled, switch):
            yield events[0] if single else events

    def _is_cancelled(self, uid: str) -> bool:
        if not self.cancelled.pop(uid, False):
            return False
        print(f"dllm_lit serve: request {uid} cancelled: the client went away", file=sys.stderr, flush=True)
        return True

    def unbatch(self, output: Iterator) -> Iterator:
        return output

    def encode_response(self, output: Iterator) -> Iterator:
        yield from output


def build_server(
    model_name_or_path: str,
    trust_remote_code: bool,
    settings: DecodeSettings,
    *,
    served_model_name: str,
    api_key: str | None,
    max_batch_size: int,
    batch_timeout: float,
    device: str,
    dtype: str,
    timeout: float,
    tool_call_parser: str | None = None,
    chat_template: str | None = None,
    lora_modules: dict[str, str] | None = None,
    chat_template_kwargs: dict | None = None,
    allowed_origins: list[str] | None = None,
) -> ls.LitServer:
    """The LitServer (not started): one model worker on ``device``; CORS for ``allowed_origins``."""
    cancelled = multiprocessing.Manager().dict()
    spec = OpenAIBlockSpec(
        model_name_or_path,
        trust_remote_code,
        settings,
        served_model_name,
        api_key,
        cancelled,
        tool_call_parser,
        chat_template,
        lora_modules,
        chat_template_kwargs,
    )
    api = BlockDecodingAPI(spec, dtype, max_batch_size, batch_timeout)
    cors = {"allow_origins": allowed_origins, "allow_methods": ["*"], "allow_headers": ["*"]}
    middlewares = [(CORSMiddleware, cors)] if allowed_origins else []
    server = ls.LitServer(api, **litserve_devices(device), timeout=timeout, middlewares=middlewares)
    server.app.add_exception_handler(HTTPException, openai_http_error)
    return server


def litserve_devices(device: str) -> dict:
    """LitServe's ``accelerator`` and ``devices`` for one ``--device``: ``cuda:1`` is ``cuda`` on ``[1]``."""
    if device == "auto":
        return {"accelerator": "auto", "devices": 1}
    kind = torch.device(device)
    return {"accelerator": kind.type, "devices": 1 if kind.index is None else [kind.index]}


async def openai_http_error(request: Request, error: HTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown path, wrong method) in OpenAI's error body."""
    message = str(error.detail)
    if error.status_code in (404, 405):
        message = (
            f"No endpoint {request.method} {request.url.path}: this server has POST /v1/chat/completions, "
            "POST /v1/completions, POST /v1/responses, GET and DELETE /v1/responses/{id}, GET /v1/models, "
            "POST /tokenize, POST /detokenize, GET /health "
            "and GET /metrics."
        )
    return JSONResponse(OpenAIError(error.status_code, message).body(), error.status_code, headers=error.headers)


def check_port(host: str, port: int) -> None:
    """Fail with one sentence when ``host:port`` cannot be listened on (taken, or not this machine's)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}.")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as error:
        raise ValueError(f"Cannot listen on {host}:{port}: {error.strerror}; pick another --port or --host.") from None


def serve(
    model_name_or_path: str,
    trust_remote_code: bool,
    settings: DecodeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    served_model_name: str | None = None,
    timeout: float = 600.0,
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    lora_modules: list[str] | str | None = None,
    allowed_origins: list[str] | None = None,
) -> None:
    """Serve the model over the OpenAI HTTP API until Ctrl-C.

    Args:
        host: Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port.
        api_key: If set, requests need the header ``Authorization: Bearer <api_key>`` (else 401).
            Default: the environment variable ``DLLM_LIT_API_KEY`` (which keeps the key out of ``ps``).
        max_batch_size: Requests decoded together as one batch (LitServe batching).
        batch_timeout: Seconds to wait for more requests to fill a batch.
        device: ``auto`` (a GPU if there is one), ``cpu``, ``cuda`` or ``mps``.
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), ``float32``, ``bfloat16`` or ``float16``.
        served_model_name: The ``model`` name clients send (default: ``--model.model_name_or_path``).
        timeout: Seconds a request may wait in the queue before a 504 (0: no limit).
        tool_call_parser: How to read the calls a model writes itself, for chat requests with
            ``tool_choice: "auto"`` (OpenAI's default with tools): ``hermes`` (``<tool_call>`` blocks:
            Hermes, Qwen2.5, Qwen3), ``llama3_json`` (JSON calls from the answer's start: Llama 3.1 to
            3.3) or ``mistral`` (``[TOOL_CALLS]`` and a JSON array). Without it, such requests get a
            400 ("required" and a named function work with any model).
        chat_template: A chat template in place of the tokenizer's: a Jinja file, or the template
            itself (vLLM's ``--chat-template``).
        chat_template_kwargs: The template's own variables for every chat request, e.g.
            ``{"enable_thinking": false}`` (vLLM's ``--default-chat-template-kwargs``); a request's own
            ``chat_template_kwargs`` win, name by name.
        lora_modules: LoRA adapters served beside the model, ``NAME=DIR`` or a list ``[NAME=DIR, ...]``
            (vLLM's ``--lora-modules``): a request whose ``model`` is NAME decodes with that adapter, kept
            unmerged and switched per batch (eager backend; the model itself no draft adapter).
        allowed_origins: The web pages (origins) whose scripts may call the server from a browser
            (CORS), e.g. ``[http://localhost:3000]``; ``["*"]``: any page. Default: none, so a page
            the user happens to visit cannot use a server on this machine (vLLM allows any).
    """
    if settings.logprobs is not None:  # a flag that silently did nothing
        raise ValueError("--model.logprobs does nothing in serve: each request asks for its own (logprobs).")
    if timeout < 0 or (timeout and batch_timeout >= timeout):
        raise ValueError(f"--timeout must be 0 (no limit) or longer than --batch_timeout, got {timeout}.")
    resolve_dtype(dtype, "cpu")  # a bad dtype or device fails here, before any process starts
    resolve_device(device)
    check_port(host, port)
    # A bad model or template fails here, before any process starts; the processes get the template's text.
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code, chat_template=chat_template)
    chat_template = tokenizer.chat_template if chat_template is not None else None
    name = served_model_name or model_name_or_path
    adapters = read_lora_modules(lora_modules, name, model_name_or_path, settings)
    template_options({"chat_template_kwargs": chat_template_kwargs})  # a bad variable fails here
    api_key = api_key or os.environ.get("DLLM_LIT_API_KEY") or None
    server = build_server(
        model_name_or_path,
        trust_remote_code,
        settings,
        served_model_name=name,
        api_key=api_key,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
        device=device,
        dtype=dtype,
        timeout=timeout,
        tool_call_parser=tool_call_parser,
        chat_template=chat_template,
        lora_modules=adapters,
        chat_template_kwargs=chat_template_kwargs,
        allowed_origins=allowed_origins,
    )
    print(f"dllm_lit serve: http://{host}:{port}/v1 serves '{name}' (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        # uvicorn closes a connection idle for 5 s by default; a client's pool that reuses one just then
        # gets "Server disconnected". 75 s outlasts the idle times of common pools and proxies (nginx's).
        server.run(host=host, port=port, generate_client_file=False, log_level="warning", timeout_keep_alive=75)
    except (EOFError, ConnectionError):  # LitServe shut down when its worker died, and its manager with it
        print(f"dllm_lit serve: {worker_death(server)}", file=sys.stderr, flush=True)
        sys.exit(1)
    except RuntimeError as error:
        if "failed to start" not in str(error):
            raise
        sys.exit(1)  # the worker has said why


def read_lora_modules(
    given: list[str] | str | None, served: str, model_name_or_path: str, settings: DecodeSettings
) -> dict[str, str]:
    """``--lora_modules`` (``NAME=DIR`` or a list of them) as ``{name: directory}``, each checked, or a
    ValueError sentence."""
    adapters: dict[str, str] = {}
    for entry in [given] if isinstance(given, str) else given or []:
        name, _, path = entry.partition("=")
        if not name or not path:
            raise ValueError(f"--lora_modules takes NAME=DIR entries, got {entry!r}.")
        if name in adapters or name == served:
            raise ValueError(f"--lora_modules: the name {name!r} is taken (by the model or another adapter).")
        if not is_adapter(path) or is_drafter(path):
            raise ValueError(f"--lora_modules: {path} is not a LoRA adapter directory (adapter_config.json).")
        adapter_base(path)  # safetensors weights, a readable config
        adapters[name] = path
    if adapters and settings.backend != "eager":
        raise ValueError("--lora_modules needs --model.backend eager: a compiled pass holds one set of weights.")
    if adapters and is_drafter(resolve(model_name_or_path)):
        raise ValueError("--lora_modules needs a model without a draft adapter: serve its base (e.g. smollm2).")
    return adapters


def worker_death(server: ls.LitServer) -> str:
    """One sentence on how the model worker ended (a supervisor may restart the server)."""
    code = next((worker.exitcode for worker in server.inference_workers if worker.exitcode), None)
    if code is not None and code < 0:
        how = f"killed by {signal.Signals(-code).name}" + (", often the out-of-memory killer" if code == -9 else "")
    else:
        how = f"exit status {code}"
    return f"the model worker process died ({how}); the server stopped, and requests in flight got no answer."


def serve_parser():
    """``dllm_lit serve [--config FILE] [--model.* ...] [--host ...] [--port ...]``."""
    parser = model_parser(
        "dllm_lit serve", "An OpenAI-compatible server (LitServe), streaming block by block.", ANSWERING_DEFAULTS
    )
    add_function_flags(parser, serve)
    return parser


def main(args: list[str]) -> None:
    config = serve_parser().parse_args(args)
    serve(*model_settings(config.model), **function_flags(config, serve))
