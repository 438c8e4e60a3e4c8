"""The HTTP side of ``dllm_lit serve``: a LitServe spec with OpenAI's endpoints.

``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses`` (read as a chat
completion: :mod:`dllm_lit.responses_api`), ``GET /v1/models``, vLLM's ``POST
/tokenize`` and ``POST /detokenize``, and Prometheus' ``GET /metrics`` (LitServe adds ``GET /health``).
Each request is checked (:mod:`dllm_lit.openai_api`), tokenized as ``predict`` tokenizes, and queued as one
:class:`~dllm_lit.streaming.Job` per choice: each prompt (a completion takes a list) times ``n``.
Their event streams are merged into one response, or into server-sent events that name each choice
by its ``index``. A client that goes away marks its unfinished jobs in the ``cancelled`` dict the
worker reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from dllm_lit.data import PromptError, encode_prompt, with_defaults
from dllm_lit.logprobs import openai_logprobs
from dllm_lit.models import load_tokenizer
from dllm_lit.openai_api import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
    choice,
    envelope,
    parse,
    response_id,
    settings_for,
    usage,
)
from dllm_lit.responses_api import CONTINUABLE, EventLog, ResponseBuilder, ResponseStore, chat_body, starting_after
from dllm_lit.serve_metrics import RequestMeter, ServeMetrics
from dllm_lit.settings import DecodeSettings
from dllm_lit.streaming import Job
from dllm_lit.tools import ToolChoice

_ECHOED = ("add_eos_length", "refine_iter", "lossless")
MAX_CHOICES = 128
"""Choices (prompts times ``n``) one request may ask for: more are refused, not queued."""


@dataclass
class Exchange:
    """One request's jobs (choice ``i`` is ``jobs[i]``; ``n`` per prompt) and how it is answered."""

    jobs: list[Job]
    n: int
    chat: bool
    stream: bool
    usage_chunk: bool
    rid: str
    echo: list[str] | None = None  # each choice's prompt text, for a completion with ``echo``
    tools: ToolChoice | None = None  # a chat request's tool mode: its answers are read as calls
    meter: RequestMeter | None = None  # counts its choices in the server's metrics

    def prompt_tokens(self) -> int:
        """The prompts' tokens, once per prompt (not per choice), as ``usage`` counts them."""
        return sum(len(job.ids) for job in self.jobs[:: self.n])


class OpenAIBlockSpec(LitSpec):
    """The OpenAI endpoints (HTTP process side)."""

    def __init__(
        self,
        model_name_or_path: str,
        trust_remote_code: bool,
        settings: DecodeSettings,
        served_model_name: str,
        api_key: str | None,
        cancelled,
        tool_call_parser: str | None = None,
        chat_template: str | None = None,
        lora_modules: dict[str, str] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.api_path = "/v1/chat/completions"
        self.model_name_or_path, self.trust_remote_code = model_name_or_path, trust_remote_code
        self.settings, self.model_id, self.api_key = settings, served_model_name, api_key
        self.cancelled, self.tool_call_parser, self.chat_template = cancelled, tool_call_parser, chat_template
        self.lora_modules = lora_modules or {}  # adapter name -> directory
        self.template_defaults = chat_template_kwargs or {}  # under each chat request's own
        self._tokenizer = self._metrics = None  # made in the HTTP process, at first use
        self.stored = ResponseStore()  # finished Responses (for previous_response_id) and background ones
        self.background: set[asyncio.Future] = set()  # the tasks that gather background responses
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/responses", self.responses, ["POST"])
        self.add_endpoint("/v1/responses/{response_id}", self.stored_response, ["GET", "DELETE"])
        self.add_endpoint("/v1/responses/{response_id}/cancel", self.cancel_response, ["POST"])
        self.add_endpoint("/v1/responses/{response_id}/input_items", self.input_items, ["GET"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/tokenize", self.tokenize, ["POST"])
        self.add_endpoint("/detokenize", self.detokenize, ["POST"])
        self.add_endpoint("/metrics", self.metrics_text, ["GET"])

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        yield from output

    async def models(self, request: Request):
        try:
            self._authorize(request)
        except OpenAIError as error:
            return JSONResponse(error.body(), error.status)
        model = {
            "id": self.model_id,
            "object": "model",
            "created": 0,
            "owned_by": "dllm_lit",
            "max_model_len": self.settings.max_length,  # as vLLM reports it
        }
        adapters = [
            model | {"id": name, "root": path, "parent": self.model_id} for name, path in self.lora_modules.items()
        ]
        return {"object": "list", "data": [model, *adapters]}

    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def tokenize(self, request: Request):
        """vLLM's ``/tokenize``: the ids a prompt or chat becomes, exactly as the completion endpoints
        make them, with their ``count`` and ``max_model_len`` (the server's ``max_length``)."""
        try:
            self._authorize(request)
            parsed = self._check_model(parse(TokenizeRequest, await self._body(request)))
            ids = self._encode(parsed.row())
        except OpenAIError as error:
            return JSONResponse(error.body(), error.status)
        return {"count": len(ids), "max_model_len": self.settings.max_length, "tokens": ids}

    async def detokenize(self, request: Request):
        """vLLM's ``/detokenize``: the text of token ids (special tokens included)."""
        try:
            self._authorize(request)
            parsed = self._check_model(parse(DetokenizeRequest, await self._body(request)))
            ids = self._in_vocabulary(parsed.tokens, "tokens")
        except OpenAIError as error:
            return JSONResponse(error.body(), error.status)
        return {"prompt": self.tokenizer.decode(ids)}

    async def metrics_text(self, request: Request):
        """Prometheus metrics (:mod:`dllm_lit.serve_metrics`); like vLLM's, without the API key."""
        return Response(self.metrics.text(), media_type=self.metrics.content_type)

    @property
    def metrics(self) -> ServeMetrics:
        if self._metrics is None:
            self._metrics = ServeMetrics()
        return self._metrics

    async def _complete(self, request: Request, chat: bool):
        try:
            self._authorize(request)
            exchange = self._exchange(await self._body(request), chat)
        except OpenAIError as error:
            return self._refused(error)
        events = self._start(exchange)
        if exchange.stream:
            return StreamingResponse(self._sse(events, exchange), media_type="text/event-stream")
        gathered = await self._gather(events, exchange, request)
        return gathered if isinstance(gathered, JSONResponse) else self._chat_response(exchange, *gathered)

    async def responses(self, request: Request):
        """OpenAI's Responses API (:mod:`dllm_lit.responses_api`): one answer, as a chat completion."""
        try:
            self._authorize(request)
            body, asked, conversation = chat_body(await self._body(request), self.stored)
            exchange = self._exchange(body, chat=True)
        except OpenAIError as error:
            return self._refused(error)
        calls = exchange.tools.stream() if exchange.tools is not None else None
        builder = ResponseBuilder(asked, self.model_id, exchange.jobs[0].settings, calls)
        conversation = conversation if asked.store else None  # what a finished response is kept with
        events = self._start(exchange)
        if asked.background:
            return self._background(events, exchange, builder, conversation)
        if exchange.stream:
            return self._event_stream(self._response_events(events, exchange, builder, conversation))
        gathered = await self._gather(events, exchange, request)
        if isinstance(gathered, JSONResponse):
            return gathered
        self._answer(builder, exchange, gathered)
        self._keep(builder, conversation)
        return builder.response

    def _answer(self, builder: ResponseBuilder, exchange: Exchange, gathered: tuple) -> None:
        """Give ``builder`` the whole answer (:meth:`_gather`'s)."""
        texts, finals, scored = gathered
        builder.add(
            texts[0], finals[0]["finish_reason"], self._entries(exchange, scored[0]), self._usage(exchange, finals)
        )

    def _background(self, events: AsyncIterator, exchange: Exchange, builder: ResponseBuilder, conversation):
        """A ``background`` response: returned at once (``queued``; streamed: its events as they come)
        and kept in the store as it stands while a task of this process gathers its answer (``GET``
        polls it or streams it again, ``POST .../cancel`` stops it); a client that goes away stops
        nothing."""
        builder.response["status"] = "queued"
        created, log = copy.deepcopy(builder.response), EventLog() if exchange.stream else None
        self.stored.begin(builder.response, conversation, lambda: self._cancel(exchange, [0]), log)
        if log is None:
            gathering = self._run_background(events, exchange, builder, conversation)
        else:
            gathering = self._log_background(events, exchange, builder, conversation, log)
        task = asyncio.ensure_future(gathering)
        self.background.add(task)  # held until it ends (the loop keeps weak references only)
        task.add_done_callback(self.background.discard)
        return created if log is None else self._event_stream(log.read())

    async def _log_background(self, events, exchange: Exchange, builder: ResponseBuilder, conversation, log):
        """Keep a streamed background response's events in ``log``, and the response as it ended."""
        try:
            async for event in self._response_events(events, exchange, builder, None):
                log.add([event])
        except Exception as error:  # kept as failed, never in progress for ever
            log.add(builder.fail(f"Decoding failed: {error}"))
        finally:
            log.end()
            self.stored.end(builder.response, conversation)

    async def _run_background(self, events: AsyncIterator, exchange: Exchange, builder: ResponseBuilder, conversation):
        """Gather a background response's answer and keep it as it ended (failed, or cancelled meanwhile)."""
        if builder.response["status"] == "queued":
            builder.response["status"] = "in_progress"
        try:
            gathered = await self._gather(events, exchange)
        except Exception as error:  # kept as failed, never in progress for ever
            gathered = JSONResponse(OpenAIError(500, f"Decoding failed: {error}").body(), 500)
        if isinstance(gathered, JSONResponse):  # the builder keeps a cancelled response cancelled
            builder.fail(json.loads(gathered.body)["error"]["message"])
        else:
            self._answer(builder, exchange, gathered)
        self.stored.end(builder.response, conversation)

    async def stored_response(self, request: Request, response_id: str):
        """``GET /v1/responses/{id}``: a stored response (``?stream=true&starting_after=N``: a streamed
        background one's events after the N-th, then as they come); ``DELETE``: forget it."""
        try:
            self._authorize(request)
            if request.method == "DELETE":
                return self.stored.delete(response_id)
            if request.query_params.get("stream", "false").lower() != "true":
                return self.stored.response(response_id)
            log = self.stored.log(response_id)
            return self._event_stream(log.read(starting_after(request.query_params.get("starting_after", "-1"))))
        except OpenAIError as error:
            return JSONResponse(error.body(), error.status)

    async def input_items(self, request: Request, response_id: str):
        """``GET /v1/responses/{id}/input_items`` (``order``, ``limit``, ``after``): the items it answered."""
        try:
            self._authorize(request)
            query = request.query_params
            limit = query.get("limit", "20")
            if not limit.isdigit():
                raise OpenAIError(400, f"limit must be a count from 1 to 100, got {limit!r}.", "limit")
            return self.stored.input_items(response_id, query.get("order", "desc"), int(limit), query.get("after"))
        except OpenAIError as error:
            return JSONResponse(error.body(), error.status)

    async def cancel_response(self, request: Request, response_id: str):
        """``POST /v1/responses/{id}/cancel``: stop a background response (it is kept as ``cancelled``)."""
        try:
            self._authorize(request)
            return self.stored.cancel(response_id)
        except OpenAIError as error:
            return JSONResponse(error.body(), error.status)

    def _keep(self, builder: ResponseBuilder, conversation: list | None) -> None:
        """Store a finished response with its ``conversation`` (None: the request said ``store:
        false``), for ``previous_response_id`` and ``GET``."""
        if conversation is not None and builder.response["status"] in CONTINUABLE:
            self.stored.keep(builder.response, conversation)

    def _refused(self, error: OpenAIError) -> JSONResponse:
        self.metrics.refused.labels(str(error.status)).inc()
        return JSONResponse(error.body(), error.status)

    def _start(self, exchange: Exchange) -> AsyncIterator[tuple[int, dict]]:
        """Queue the exchange's jobs; their merged events, counted, with a completion's echo."""
        exchange.meter = RequestMeter(self.metrics, len(exchange.jobs), exchange.prompt_tokens(), exchange.n)
        events = exchange.meter.watch(self._merged([self._submit(job) for job in exchange.jobs]))
        return echoed(events, exchange.echo)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise OpenAIError(
                401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    @staticmethod
    async def _body(request: Request):
        try:
            return await request.json()
        except ValueError:
            raise OpenAIError(400, "The request body is not valid JSON.") from None

    def _check_model(self, parsed):
        """``parsed``, or a 404 when it names another model (the tokenizer endpoints may name none)."""
        served = [self.model_id, *self.lora_modules]
        if parsed.model is not None and parsed.model not in served:
            names = " and ".join(f"'{name}'" for name in served)
            raise OpenAIError(
                404,
                f"The model '{parsed.model}' does not exist: this server serves {names}.",
                "model",
                "model_not_found",
            )
        return parsed

    def _exchange(self, body, chat: bool) -> Exchange:
        parsed = self._check_model(parse(ChatRequest if chat else CompletionRequest, body, self.tool_call_parser))
        settings, stop = settings_for(self.settings, parsed), parsed.stop_strings()
        self._in_vocabulary(list(settings.logit_bias or {}), "logit_bias")
        self._in_vocabulary(list(settings.stop_token_ids), "stop_token_ids")
        rows = [parsed.template_row()] if chat else parsed.prompts()
        if len(rows) * parsed.n > MAX_CHOICES:
            raise OpenAIError(400, f"A request gets at most {MAX_CHOICES} choices (prompts times n).", "n")
        field, echo = ("messages", False) if chat else ("prompt", parsed.echo)
        tools = parsed.tool_mode() if chat else None
        parsing = tools is not None and tools.parser is not None  # its tags may be special tokens
        prompt_only = not chat and parsed.prompt_only()
        predicted = parsed.predicted_text()
        prediction = self.tokenizer(predicted, add_special_tokens=False)["input_ids"] if predicted else None
        jobs = [
            Job(
                str(uuid.uuid4()),
                self._prompt_ids(row, field, settings.max_length),
                seeded(settings, sample),
                stop,
                echo,
                parsing,
                parsed.model if parsed.model in self.lora_modules else None,
                time.time(),
                prompt_only,
                prediction,
            )
            for row in rows
            for sample in range(parsed.n)
        ]
        exchange = Exchange(jobs, parsed.n, chat, parsed.stream, parsed.usage_chunk(), response_id(chat))
        exchange.tools = tools
        if echo:  # a prompt as given, or the text of its token ids
            texts = [row if isinstance(row, str) else self.tokenizer.decode(row) for row in rows]
            exchange.echo = [text for text in texts for _ in range(parsed.n)]
        return exchange

    def _prompt_ids(self, row: dict | str | list[int], field: str, max_length: int) -> list[int]:
        """One prompt's ids exactly as ``predict`` makes them (a chat row through the template, a text
        as the raw prompt); token ids as given, once checked against the vocabulary."""
        if isinstance(row, list):
            ids = self._in_vocabulary(row, field)
        else:
            ids = self._encode(row if isinstance(row, dict) else {"prompt": row})
        if not ids:
            raise OpenAIError(400, "The prompt is empty.", field)
        if len(ids) >= max_length:
            raise OpenAIError(
                400,
                f"The prompt has {len(ids)} tokens, which leaves no room under max_length={max_length}.",
                field,
                "context_length_exceeded",
            )
        return ids

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded at the first request (the HTTP process holds no model)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.model_name_or_path, trust_remote_code=self.trust_remote_code, chat_template=self.chat_template
            )
        return self._tokenizer

    def _in_vocabulary(self, ids: list[int], field: str) -> list[int]:
        size = len(self.tokenizer)
        if not all(0 <= i < size for i in ids):
            raise OpenAIError(400, f"{field} holds token ids outside the vocabulary (0..{size - 1}).", field)
        return ids

    def _encode(self, row: dict) -> list[int]:
        """A ``{"prompt"}`` or ``{"messages"}`` row's ids, as ``predict`` makes them."""
        if "messages" in row and not self.tokenizer.chat_template:
            raise OpenAIError(400, "This model's tokenizer has no chat template: use /v1/completions.")
        try:
            return encode_prompt(self.tokenizer, with_defaults(row, self.template_defaults), "messages" in row)
        except PromptError as error:
            raise OpenAIError(400, str(error), "messages") from None

    def _submit(self, job: Job) -> AsyncIterator:
        """Queue the job for the worker; return its stream of ``(data, status)``, which releases the
        job's response buffer when it ends (the worker's later events for it are dropped)."""
        queued, event = deque(), asyncio.Event()
        self.response_buffer[job.uid] = ResponseBufferItem(response_queue=queued, event=event)
        self.request_queue.put((self.response_queue_id, job.uid, time.monotonic(), job))
        return self._released(job.uid, self.data_streamer(queued, event, send_status=True))

    async def _released(self, uid: str, stream: AsyncIterator) -> AsyncIterator:
        try:
            async for item in stream:
                yield item
        finally:
            self.response_buffer.pop(uid, None)

    async def _merged(self, streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, dict]]:
        """``(choice index, event)`` from every job's stream as they come: the worker's non-empty
        events, a worker error as ``{"error": ...}``, until each stream has ended."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator) -> None:
            try:
                async with contextlib.aclosing(stream):  # its buffer released at once, even after an error
                    async for data, status in stream:
                        if status == LitAPIStatus.ERROR:
                            queue.put_nowait((index, {"error": f"Decoding failed: {data}"}))
                            break
                        if event := json.loads(data):
                            queue.put_nowait((index, event))
            except Exception as error:  # a broken stream ends its choice with an error, never a hang
                queue.put_nowait((index, {"error": f"Decoding failed: {error}"}))
            finally:
                queue.put_nowait((index, None))

        pumps = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
        try:
            running = len(pumps)
            while running:
                index, event = await queue.get()
                if event is None:
                    running -= 1
                else:
                    yield index, event
        finally:
            for task in pumps:
                task.cancel()

    def _usage(self, exchange: Exchange, finals: list[dict]) -> dict:
        echoed = {name: getattr(exchange.jobs[0].settings, name) for name in _ECHOED}
        completion = sum(final["completion_tokens"] for final in finals)
        forwards = sum(final["forwards"] for final in finals)
        cached = sum(final["cached_tokens"] for final in finals) // exchange.n  # each prompt once, as prompt_tokens
        predicted = [sum(final[f"{kind}_prediction_tokens"] for final in finals) for kind in ("accepted", "rejected")]
        return usage(exchange.prompt_tokens(), completion, forwards, echoed, cached, tuple(predicted))

    async def _gather(self, events: AsyncIterator, exchange: Exchange, request: Request | None = None):
        """Every choice's ``(texts, finals, scored)``, or the error response; a client that went away
        (checked at each event, where a ``request`` waits), or an error, cancels the unfinished jobs."""
        texts, finals = [""] * len(exchange.jobs), [None] * len(exchange.jobs)
        scored: list[list] = [[] for _ in exchange.jobs]
        try:
            async for index, event in events:
                if "error" in event:
                    finals[index] = event
                    return JSONResponse(OpenAIError(500, event["error"]).body(), 500)
                texts[index] += event["text"]
                scored[index] += event.get("logprobs", [])
                if "finish_reason" in event:
                    finals[index] = event
                elif request is not None and await request.is_disconnected():
                    return JSONResponse(OpenAIError(499, "The client went away.").body(), 499)
        finally:
            self._cancel(exchange, [index for index, final in enumerate(finals) if final is None])
        if None in finals:
            return JSONResponse(OpenAIError(500, "The worker ended the request without a result.").body(), 500)
        return texts, finals, scored

    def _chat_response(self, exchange: Exchange, texts: list[str], finals: list[dict], scored: list[list]) -> dict:
        """A (chat) completion with every choice."""
        chat, rid = exchange.chat, exchange.rid
        choices = [
            choice(chat, text, final["finish_reason"], False, i, self._logprobs(exchange, entries))
            for i, (text, final, entries) in enumerate(zip(texts, finals, scored))
        ]
        if exchange.tools is not None:  # the answers are calls
            for entry, text in zip(choices, texts):
                entry["message"], entry["finish_reason"] = exchange.tools.message(text, entry["finish_reason"])
        return {**envelope(chat, rid, self.model_id, False, choices=choices), "usage": self._usage(exchange, finals)}

    async def _sse(self, events: AsyncIterator, exchange: Exchange) -> AsyncIterator[str]:
        """Per choice, one ``data:`` chunk per committed block (the last with its ``finish_reason``);
        ``usage`` on the last chunk of all, or (``usage_chunk``) alone in a chunk with no choices;
        then ``data: [DONE]``. A client that goes away, or an error, cancels the unfinished jobs."""
        chat, rid, count = exchange.chat, exchange.rid, len(exchange.jobs)
        finals: dict[int, dict] = {}
        offsets = [0] * count  # each choice's text so far, in characters of its tokens (text_offset)
        calls = [exchange.tools.stream() for _ in range(count)] if exchange.tools is not None else None
        try:
            for index in range(count if chat else 0):
                first = choice(chat, "", None, True, index) | {"delta": {"role": "assistant", "content": ""}}
                yield f"data: {json.dumps(envelope(chat, rid, self.model_id, True, choices=[first]))}\n\n"
            async for index, event in events:
                if "error" in event:  # this job has ended; the request's others stop
                    finals[index] = event
                    yield f"data: {json.dumps(OpenAIError(500, event['error']).body())}\n\n"
                    return
                reason, entries = event.get("finish_reason"), event.get("logprobs", [])
                logprobs = self._logprobs(exchange, entries, offsets[index])
                offsets[index] += len("".join(logprobs["tokens"])) if logprobs and not chat else 0
                entry = choice(chat, event["text"], reason, True, index, logprobs)
                if calls is not None:  # the text becomes calls
                    entry["delta"], entry["finish_reason"] = calls[index].delta(event["text"], reason)
                chunk = envelope(chat, rid, self.model_id, True, choices=[entry])
                if reason is not None:
                    finals[index] = event
                    last = len(finals) == count and not exchange.usage_chunk
                    chunk["usage"] = self._usage(exchange, list(finals.values())) if last else None
                yield f"data: {json.dumps(chunk)}\n\n"
            if exchange.usage_chunk:
                alone = envelope(
                    chat, rid, self.model_id, True, choices=[], usage=self._usage(exchange, list(finals.values()))
                )
                yield f"data: {json.dumps(alone)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self._cancel(exchange, [index for index in range(count) if index not in finals])

    @staticmethod
    def _event_stream(events: AsyncIterator[tuple[str, dict]]) -> StreamingResponse:
        """The Responses stream: ``event:`` and ``data:`` per event, no ``[DONE]`` (OpenAI's shape)."""

        async def lines():
            async with contextlib.aclosing(events):  # a client that goes away closes them at once
                async for kind, data in events:
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    async def _response_events(self, events: AsyncIterator, exchange: Exchange, builder: ResponseBuilder, conversation):
        """The Responses stream's ``(type, data)`` events, the response stored (:meth:`_keep`) before its
        last event. A reader that goes away cancels the job; an error ends the stream with
        ``response.failed``."""
        ended = False
        try:
            stream = builder.start()
            for event in stream:
                yield event
            async for _, event in events:
                ended = "error" in event or "finish_reason" in event
                if "error" in event:
                    stream = builder.fail(event["error"])
                else:
                    usage = self._usage(exchange, [event]) if ended else None
                    entries = self._entries(exchange, event.get("logprobs", []))
                    stream = builder.add(event["text"], event.get("finish_reason"), entries, usage)
                    if ended:  # before the client reads the end, so that it may continue the response at once
                        self._keep(builder, conversation)
                for event in stream:
                    yield event
        finally:
            self._cancel(exchange, [] if ended else [0])

    def _entries(self, exchange: Exchange, entries: list) -> list[dict]:
        """Chat-shaped logprob entries of these tokens (none when the request asked for none)."""
        return (self._logprobs(exchange, entries) or {}).get("content") or []

    def _logprobs(self, exchange: Exchange, entries: list, offset: int = 0) -> dict | None:
        """A choice's ``logprobs`` for these entries, or None when the request asked for none."""
        if exchange.jobs[0].settings.logprobs is None:
            return None
        return openai_logprobs(self.tokenizer, exchange.chat, entries, offset)

    def _cancel(self, exchange: Exchange, indices: list[int]) -> None:
        """Ask the worker to stop these choices' jobs at their next commit."""
        for index in indices:
            self.cancelled[exchange.jobs[index].uid] = True
        exchange.meter.cancelled(indices)


async def echoed(events: AsyncIterator[tuple[int, dict]], prompts: list[str] | None) -> AsyncIterator[tuple[int, dict]]:
    """``events`` with each choice's prompt text (``prompts``, for ``echo``) and the prompt's logprobs
    (``prompt_logprobs`` from the worker) put before its first event's text and logprobs."""
    waiting = set(range(len(prompts or [])))
    async for index, event in events:
        if index in waiting and "error" not in event:
            waiting.discard(index)
            prompt_logprobs = event.pop("prompt_logprobs", [])
            event |= {"text": prompts[index] + event["text"], "logprobs": prompt_logprobs + event.get("logprobs", [])}
        yield index, event


def seeded(settings: DecodeSettings, sample: int) -> DecodeSettings:
    """The settings of a request's ``sample``-th choice: a seed set by the request moves by one per
    choice, so choice 0 is what ``n=1`` gives and the others differ."""
    return settings if settings.seed is None or sample == 0 else settings.replace(seed=settings.seed + sample)
