"""OpenAI's Responses API (``POST /v1/responses``) for ``dllm_lit serve``, read as a chat completion.

:func:`chat_body` turns a request into the chat completion it amounts to: ``instructions`` and
``input`` become the messages (text, earlier ``function_call`` items and their
``function_call_output``; an ``item_reference`` stands for the stored item with its id),
``max_output_tokens`` the ``max_tokens``, ``text.format`` the ``response_format``, the flat function
``tools`` and ``tool_choice`` the chat's nested ones, and ``include:
["message.output_text.logprobs"]`` with ``top_logprobs`` the chat's logprobs; dllm_lit's and vLLM's
own fields pass through. Finished responses are kept in memory (:class:`ResponseStore`,
unless ``store`` is false), so that ``previous_response_id`` continues one: its input and output
come before the new input (its ``instructions`` do not, as OpenAI's), and ``GET``/``DELETE
/v1/responses/{id}`` read and remove one. A ``background`` response is kept from the start, as it
stands (``queued``, ``in_progress``, then how it ended), until ``POST /v1/responses/{id}/cancel`` stops
it or it ends; a streamed one keeps its events (:class:`EventLog`), so that ``GET ...?stream=true``
reads them again from any ``starting_after``. ``conversation`` is refused.

:class:`ResponseBuilder` turns the one answer's text, as it comes, into the Responses stream's events
and, at the end, the response object; a whole response is the same builder fed the whole text, so
streamed and non-streamed answers agree.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dllm_lit.openai_api import OpenAIError, validated
from dllm_lit.tools import CallStream

PASSED = (
    "temperature", "top_p", "seed", "stop", "top_k", "min_p", "add_eos_length", "refine_iter", "lossless",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
    "stop_token_ids", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "parallel_tool_calls", "chat_template_kwargs", "stream",
)  # fmt: skip
"""Request fields a chat completion takes under the same name (dllm_lit's and vLLM's included)."""

STATEFUL = ("conversation", "prompt")
"""Fields that need state this server does not keep (conversations, stored prompts): refused."""
CONTINUABLE = ("completed", "incomplete")
"""The statuses of a response that ``previous_response_id`` may continue."""

LOGPROBS = "message.output_text.logprobs"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]

    def chat(self) -> dict[str, Any]:
        parts = [self.content] if isinstance(self.content, str) else [part.text for part in self.content]
        return {"role": self.role, "content": "\n".join(parts)}


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str


ITEMS = {"message": InputMessage, "function_call": FunctionCall, "function_call_output": FunctionCallOutput}


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def chat(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class ResponsesRequest(BaseModel):
    """The Responses fields that are not a chat completion's under the same name."""

    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    text: dict[str, Any] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    include: list[str] | None = None
    parallel_tool_calls: bool = True
    top_logprobs: int | None = Field(None, ge=0, le=20)
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False

    def items(self) -> list[dict[str, Any]]:
        """The input as a list of items (a text is one user message)."""
        return [{"role": "user", "content": self.input}] if isinstance(self.input, str) else list(self.input)

    def messages(self, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat messages: ``instructions`` as the system message, then each item of ``earlier``
        (a previous response's conversation) and of the input."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        for number, raw in enumerate([*earlier, *self.items()]):
            item = read_item(raw, number)
            if isinstance(item, FunctionCall):  # calls join the assistant message before them, if any
                if not messages or messages[-1]["role"] != "assistant":
                    messages.append({"role": "assistant", "content": None})
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                messages[-1].setdefault("tool_calls", []).append(call)
            elif isinstance(item, FunctionCallOutput):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                messages.append(item.chat())
        return messages

    def tool_choice_for_chat(self) -> str | dict[str, Any] | None:
        if isinstance(self.tool_choice, dict) and self.tool_choice.get("type") == "function":
            return {"type": "function", "function": {"name": self.tool_choice.get("name")}}
        return self.tool_choice

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as a chat ``response_format`` (``json_schema`` keeps its schema at the top)."""
        given = (self.text or {}).get("format")
        if not isinstance(given, dict) or given.get("type") != "json_schema":
            return given
        return {"type": "json_schema", "json_schema": {key: value for key, value in given.items() if key != "type"}}


def read_item(raw: Any, number: int) -> BaseModel:
    """One ``input`` item (a message when it names no ``type``), or a 400 naming it."""
    kind = raw.get("type", "message") if isinstance(raw, dict) else None
    if kind not in ITEMS:
        message = f"input.{number} is a message, function_call, function_call_output or item_reference."
        raise OpenAIError(400, message, "input")
    return validated(ITEMS[kind], raw, f"input.{number}.")


def chat_body(body: Any, store: ResponseStore) -> tuple[dict[str, Any], ResponsesRequest, list[dict[str, Any]]]:
    """The chat completion body a Responses request amounts to, the request, and its conversation
    (the previous response's, then this input); or a 4xx."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    for name in STATEFUL:
        if body.get(name):
            message = (
                f"{name} is not supported: continue a response with previous_response_id, or send it all as input."
            )
            raise OpenAIError(400, message, name)
    request = validated(ResponsesRequest, body)
    if request.background and not request.store:
        message = "A background response is kept and read with GET /v1/responses/{id}: it needs store true."
        raise OpenAIError(400, message, "background")
    if isinstance(request.input, list):  # an ``item_reference`` stands for a stored item
        request.input = [store.referenced(raw, number) for number, raw in enumerate(request.input)]
    earlier = store.conversation(request.previous_response_id) if request.previous_response_id else []
    unknown = [name for name in request.include or [] if name != LOGPROBS]
    if unknown:
        raise OpenAIError(400, f"include: {unknown[0]!r} is not supported by this server.", "include")
    chat = {name: body[name] for name in PASSED if name in body}
    chat |= {"model": request.model, "messages": request.messages(earlier), "max_tokens": request.max_output_tokens}
    chat |= {"response_format": request.response_format(), "tool_choice": request.tool_choice_for_chat()}
    if request.tools:
        chat["tools"] = [tool.chat() for tool in request.tools]
    if LOGPROBS in (request.include or []):
        chat |= {"logprobs": True, "top_logprobs": request.top_logprobs or 0}
    return {name: value for name, value in chat.items() if value is not None}, request, [*earlier, *request.items()]


def starting_after(value: str) -> int:
    """``GET ...?starting_after=N``: the sequence number after which a stream starts again."""
    try:
        number = int(value)
    except ValueError:
        number = -2
    if number < -1:
        raise OpenAIError(
            400, f"starting_after must be a sequence number (0 or more), got {value!r}.", "starting_after"
        )
    return number


class EventLog:
    """A streamed background response's events, ``(type, data)`` in ``sequence_number`` order, kept
    for every reader: the request that started it and later ``GET ...?stream=true`` ones."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.ended = False
        self._more = asyncio.Event()

    def add(self, events: list[tuple[str, dict]]) -> None:
        self.events += events
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    async def read(self, after: int = -1) -> AsyncIterator[tuple[str, dict]]:
        """The events after sequence number ``after``, then each as it comes, until the last."""
        at = after + 1
        while True:
            while at < len(self.events):
                yield self.events[at]
                at += 1
            if self.ended:
                return
            await self._more.wait()


class ResponseStore:
    """The responses a later request may continue (``previous_response_id``), read or cancel, the
    ``capacity`` most recent in memory (a restart forgets them, as vLLM's store does): finished ones,
    and background ones from their start."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self.kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()
        self.stops: dict[str, Callable[[], None]] = {}  # running background responses: what cancels each
        self.logs: dict[str, EventLog] = {}  # streamed background responses: their events

    def keep(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep a finished response and the conversation (input items) it answered."""
        self.stops.pop(response["id"], None)
        self._add(copy.deepcopy(response), conversation)

    def begin(
        self, response: dict[str, Any], conversation: list, stop: Callable[[], None], log: EventLog | None = None
    ) -> None:
        """Keep a background response while it runs: the object itself, read as it stands; ``stop``
        cancels it; ``log``: a streamed one's events. It is kept as it ends with :meth:`end`."""
        self.stops[response["id"]] = stop
        if log is not None:
            self.logs[response["id"]] = log
        self._add(response, conversation)

    def _add(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        for item in conversation:  # ids for ``input_items`` and ``item_reference``, given once
            if isinstance(item, dict) and "id" not in item:
                item["id"] = item_id(ITEM_PREFIXES.get(item.get("type", "message"), "item"))
        self.kept[response["id"]] = (response, conversation)
        self.kept.move_to_end(response["id"])
        while len(self.kept) > self.capacity:
            oldest = self.kept.popitem(last=False)[0]
            self.stops.pop(oldest, None)
            self.logs.pop(oldest, None)

    def end(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep a background response as it ended (unless it was deleted meanwhile)."""
        if response["id"] in self.kept:
            self.keep(response, conversation)

    def cancel(self, response_id: str) -> dict[str, Any]:
        """Stop a background response that is still running (its status: ``cancelled``); one that ended
        stays as it is."""
        response = self.response(response_id)
        if not response.get("background"):
            raise OpenAIError(400, "Only a background response can be cancelled.", "response_id")
        stop = self.stops.pop(response_id, None)
        if stop is not None:
            stop()
            response["status"] = "cancelled"
        return response

    def referenced(self, raw: Any, number: int) -> Any:
        """An input item, or for an ``item_reference`` (``{"type": "item_reference", "id": ...}``) the
        stored input or output item with that id, the most recent response's first; or a 400."""
        if not isinstance(raw, dict) or raw.get("type") != "item_reference":
            return raw
        for response, conversation in reversed(self.kept.values()):
            for item in [*response["output"], *conversation]:
                if isinstance(item, dict) and item.get("id") == raw.get("id"):
                    return item
        message = f"input.{number}: no stored item has the id {raw.get('id')!r} (a restart forgets them)."
        raise OpenAIError(400, message, "input")

    def input_items(self, response_id: str, order: str = "desc", limit: int = 20, after: str | None = None) -> dict:
        """``GET /v1/responses/{id}/input_items``: a page of the items the response answered (its
        previous response's conversation too), as OpenAI lists them."""
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise OpenAIError(400, "input_items takes order asc or desc and a limit from 1 to 100.", "order")
        self.response(response_id)  # a 404 if unknown
        items = [listed(item) for item in self.kept[response_id][1]]
        items = items[::-1] if order == "desc" else items
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise OpenAIError(400, f"after: no input item of {response_id!r} has the id {after!r}.", "after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
        return {"object": "list", "data": page, "first_id": first, "last_id": last, "has_more": len(items) > limit}

    def log(self, response_id: str) -> EventLog:
        """A background response's events (a 400 for one that was not streamed)."""
        self.response(response_id)  # a 404 if unknown
        if response_id not in self.logs:
            raise OpenAIError(400, "Only a background response created with stream true can be streamed.", "stream")
        return self.logs[response_id]

    def response(self, response_id: str) -> dict[str, Any]:
        if response_id not in self.kept:
            raise OpenAIError(404, f"No response with id {response_id!r} is stored here.", "response_id")
        return self.kept[response_id][0]

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        """A response's whole conversation: the items it answered, then its output."""
        if response_id not in self.kept:
            message = (
                f"Previous response with id {response_id!r} not found (store: false keeps none; a restart forgets all)."
            )
            raise OpenAIError(404, message, "previous_response_id")
        response, conversation = self.kept[response_id]
        if response["status"] not in CONTINUABLE:
            message = (
                f"Previous response {response_id!r} is {response['status']}: only a finished answer can be continued."
            )
            raise OpenAIError(400, message, "previous_response_id")
        return [*conversation, *response["output"]]

    def delete(self, response_id: str) -> dict[str, Any]:
        """Forget a response (a running background one is cancelled)."""
        self.response(response_id)  # a 404 if unknown
        stop = self.stops.pop(response_id, None)
        if stop is not None:
            stop()
        del self.kept[response_id]
        self.logs.pop(response_id, None)
        return {"id": response_id, "object": "response", "deleted": True}


def response_usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """A chat ``usage`` in the Responses shape (dllm_lit's statistics and settings kept beside it)."""
    usage = dict(chat_usage)
    prompt, completion = usage.pop("prompt_tokens"), usage.pop("completion_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": usage.pop("prompt_tokens_details"),
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": usage.pop("completion_tokens_details")["reasoning_tokens"]},
        **usage,
    }


ITEM_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def listed(item: dict[str, Any]) -> dict[str, Any]:
    """A conversation item as OpenAI lists it: a message typed, its text content a list of text parts."""
    if item.get("type", "message") != "message":
        return item
    content = item.get("content")
    if isinstance(content, str):
        kind = "output_text" if item.get("role") == "assistant" else "input_text"
        content = [{"type": kind, "text": content} | ({"annotations": []} if kind == "output_text" else {})]
    return {"type": "message", "status": "completed", **item, "content": content}


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponseBuilder:
    """One answer as Responses events, ``(type, data)`` pairs, and the response object they build.

    Args:
        request: The request (echoed in the response).
        model: The served model's name.
        settings: The answer's decoding settings (``temperature`` and ``top_p`` are echoed).
        calls: A reader of tool calls (the request's tool mode), or None for text.
    """

    def __init__(self, request: ResponsesRequest, model: str, settings, calls: CallStream | None):
        self.calls, self.sequence, self.open = calls, 0, None  # ``open``: the output item being written
        self.response = {
            "id": item_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": model,
            "output": [],
            "parallel_tool_calls": request.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "store": request.store,
            "background": request.background,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "text": request.text or {"format": {"type": "text"}},
            "tool_choice": request.tool_choice or ("auto" if request.tools else "none"),
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "truncation": "disabled",
            "metadata": request.metadata or {},
            "usage": None,
        }

    def start(self) -> list[tuple[str, dict]]:
        """The first events: ``created`` (a background response: ``queued``), then ``in_progress``."""
        created = self._event("response.created", response=self.response)
        self.response["status"] = "in_progress"
        return [created, self._event("response.in_progress", response=self.response)]

    def add(
        self, text: str, reason: str | None, logprobs: list[dict], usage: dict | None = None
    ) -> list[tuple[str, dict]]:
        """The events of a chunk that adds ``text`` (``reason``, ``usage``: with the last chunk)."""
        delta = {"content": text} if text else {}
        if self.calls is not None:
            delta, reason = self.calls.delta(text, reason)
            logprobs = []  # a call's tokens are not output text
        events = self._text(delta.get("content", ""), logprobs) if delta.get("content") or logprobs else []
        for piece in delta.get("tool_calls", []):
            events += self._call(piece)
        if reason is not None:
            events += self._finish(reason, usage)
        return events

    def fail(self, message: str) -> list[tuple[str, dict]]:
        """The failure event; a response cancelled meanwhile stays ``cancelled`` (with the error)."""
        status = "cancelled" if self.response["status"] == "cancelled" else "failed"
        self.response |= {"status": status, "error": {"code": "server_error", "message": message}}
        return [self._event("response.failed", response=self.response)]

    def _event(self, kind: str, **data: Any) -> tuple[str, dict]:
        """An event as things stand now (a copy: the items it shows change later)."""
        self.sequence += 1
        return kind, copy.deepcopy({"type": kind, "sequence_number": self.sequence - 1, **data})

    def _place(self) -> dict[str, Any]:
        """Where the open item is: the last of the output."""
        return {"item_id": self.open["id"], "output_index": len(self.response["output"]) - 1}

    def _begin(self, item: dict[str, Any]) -> list[tuple[str, dict]]:
        events = self._close("completed")
        self.open = item
        self.response["output"].append(item)
        return [
            *events,
            self._event("response.output_item.added", output_index=len(self.response["output"]) - 1, item=item),
        ]

    def _text(self, text: str, logprobs: list[dict]) -> list[tuple[str, dict]]:
        events = []
        if self.open is None or self.open["type"] != "message":
            message = {
                "type": "message",
                "id": item_id("msg"),
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            events += self._begin(message)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            message["content"].append(part)
            events.append(self._event("response.content_part.added", **self._place(), content_index=0, part=part))
        part = self.open["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        if text or logprobs:  # an empty answer's message has no delta
            kind = "response.output_text.delta"
            events.append(self._event(kind, **self._place(), content_index=0, delta=text, logprobs=logprobs))
        return events

    def _call(self, piece: dict[str, Any]) -> list[tuple[str, dict]]:
        events, function = [], piece.get("function", {})
        if "id" in piece:  # a new call
            item = {"type": "function_call", "id": item_id("fc"), "call_id": piece["id"], "name": function["name"]}
            events += self._begin(item | {"arguments": "", "status": "in_progress"})
        if function.get("arguments"):
            self.open["arguments"] += function["arguments"]
            events.append(
                self._event("response.function_call_arguments.delta", **self._place(), delta=function["arguments"])
            )
        return events

    def _close(self, status: str) -> list[tuple[str, dict]]:
        """The events that end the open item (none if none is open)."""
        item = self.open
        if item is None:
            return []
        item["status"], place, events = status, self._place(), []
        if item["type"] == "message":
            part = item["content"][0]
            text = {"text": part["text"], "logprobs": part["logprobs"]}
            events += [
                self._event("response.output_text.done", **place, content_index=0, **text),
                self._event("response.content_part.done", **place, content_index=0, part=part),
            ]
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done", **place, name=item["name"], arguments=item["arguments"]
                )
            )
        self.open = None
        return [*events, self._event("response.output_item.done", output_index=place["output_index"], item=item)]

    def _finish(self, reason: str, usage: dict | None) -> list[tuple[str, dict]]:
        """The last events; a cancelled response stays ``cancelled`` and ends as an incomplete one."""
        cancelled, cut = self.response["status"] == "cancelled", reason == "length"
        events = [] if self.response["output"] else self._text("", [])  # an empty answer is an empty message
        events += self._close("incomplete" if cut or cancelled else "completed")
        self.response |= {
            "status": "cancelled" if cancelled else "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut and not cancelled else None,
            "usage": response_usage(usage) if usage else None,
        }
        kind = "response.incomplete" if cut or cancelled else "response.completed"
        return [*events, self._event(kind, response=self.response)]
