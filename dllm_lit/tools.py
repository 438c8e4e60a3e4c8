"""Tool calls for ``serve``'s chat endpoint (OpenAI's ``tools`` and ``tool_choice``).

The tools reach the model through its chat template (``apply_chat_template(tools=...)``). Two modes
do not depend on a model's own tool-call format: as vLLM does without a tool-call parser, the answer
is constrained by a JSON schema (:mod:`dllm_lit.guided`) and read back as calls.

- ``tool_choice: {"type": "function", "function": {"name": ...}}``: the answer is that function's
  arguments, a JSON object following its ``parameters`` schema; one call, ``finish_reason`` ``stop``.
- ``tool_choice: "required"``: the answer is a JSON array of ``{"name", "parameters"}`` objects, one or
  more calls of the given tools (one with ``parallel_tool_calls: false``); ``finish_reason`` ``tool_calls``.
- ``"auto"`` (the default with tools): the model decides, in its own format, so it needs the server's
  ``--tool_call_parser``: ``hermes`` reads ``<tool_call>{"name", "arguments"}</tool_call>`` blocks
  (Hermes, Qwen2.5 and Qwen3 templates), the text before them being the content; ``llama3_json`` and
  ``mistral`` read calls that start the answer (:class:`LeadingCalls`). The text keeps special tokens
  then (some models' tags are); with ``parallel_tool_calls: false`` only the first call is kept.
  Without a parser it is a 400 that names the modes above. ``"none"``: an ordinary answer.

Each mode's :class:`CallStream` turns the answer's text, as it comes, into OpenAI's deltas; a whole
answer's message is the same deltas merged, so streamed and non-streamed answers agree.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: Function


AUTO_REFUSED = (
    'tool_choice "auto" needs a parser for this model\'s own tool-call format (serve --tool_call_parser '
    'hermes, llama3_json or mistral): else send tool_choice "required" or {"type": "function", '
    '"function": {"name": ...}}.'
)


class ToolChoice:
    """A request's tool mode: one named function, ``required`` (one or more calls of any), or ``auto``
    (the model's own calls, read by ``parser``).

    Args:
        tools: The request's tools.
        name: The function ``tool_choice`` names (None: ``required`` or ``auto``).
        parallel: Whether ``required`` may return several calls.
        parser: ``auto``'s parser (None: not ``auto``).
    """

    def __init__(self, tools: list[Tool], name: str | None, parallel: bool, parser: str | None = None):
        self.tools, self.name = {tool.function.name: tool for tool in tools}, name
        self.parallel, self.parser = parallel, parser

    @classmethod
    def read(
        cls, tools: list[Tool] | None, choice: Any, parallel: bool, parser: str | None = None
    ) -> ToolChoice | None:
        """The request's tool mode (None: answer as usual), or ValueError with the 400's sentence;
        ``parser``: the server's ``--tool_call_parser``."""
        if choice is not None and not tools:
            raise ValueError("tool_choice needs tools.")
        if not tools or choice == "none":
            return None
        if choice in (None, "auto"):
            if parser is None:
                raise ValueError(AUTO_REFUSED)
            return cls(tools, None, parallel, parser)
        if choice == "required":
            return cls(tools, None, parallel)
        name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str):
            raise ValueError(
                'tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.'
            )
        if name not in {tool.function.name for tool in tools}:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the tools.")
        return cls(tools, name, parallel)

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer follows (None: ``auto``, free), compact (no free whitespace: the
        calls are read by a program, and the text a grammar forces is drafted in lossless mode)."""
        compact = {"x-guidance": {"whitespace_flexible": False}}
        if self.parser is not None:
            return None
        if self.name is not None:
            return compact | (self.tools[self.name].function.parameters or {"type": "object"})
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": tool.function.parameters or {"type": "object"},
                },
                "required": ["name", "parameters"],
            }
            for name, tool in self.tools.items()
        ]
        most = {} if self.parallel else {"maxItems": 1}
        return compact | {"type": "array", "items": {"anyOf": calls}, "minItems": 1} | most

    def stream(self) -> CallStream:
        """A fresh reader of one choice's answer."""
        if self.parser is not None:
            return HermesCalls(self) if self.parser == "hermes" else LeadingCalls(self)
        return NamedCall(self) if self.name is not None else CallArray(self)

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str]:
        """A whole answer's ``message`` and ``finish_reason``: what :meth:`stream` sends, merged."""
        stream = self.stream()
        delta, reason = stream.delta(text, reason)
        if not stream.calls:
            return {"role": "assistant", "content": delta.get("content", "")}, reason
        return {"role": "assistant", "content": delta.get("content") or None, "tool_calls": stream.calls}, reason


def call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class CallStream:
    """One choice's deltas as its text comes: :meth:`delta` per chunk; ``calls`` holds the calls so far."""

    def __init__(self, choice: ToolChoice):
        self.choice, self.text, self.read = choice, "", 0  # ``read``: how much of the text is spoken for
        self.calls: list[dict[str, Any]] = []

    def delta(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The ``delta`` and ``finish_reason`` of a chunk that adds ``text`` (``reason``: the last)."""
        self.text += text
        content, new = self._read(final=reason is not None)
        if not self.choice.parallel:  # the model's own calls (auto) past its first are dropped, as vLLM does
            new = [] if self.calls else new[:1]
        delta: dict[str, Any] = {"content": content} if content else {}
        if new:
            delta["tool_calls"] = [{"index": len(self.calls) + n} | c for n, c in enumerate(new)]
            self.calls += new
        if reason == "stop" and self.calls and self.choice.name is None:
            reason = "tool_calls"  # OpenAI's, when the model chose the calls
        return delta, reason

    def _read(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """``(content, new calls)`` in the text not read yet."""
        raise NotImplementedError


class NamedCall(CallStream):
    """A named function's call first, then its arguments as they are decoded (cut short when a limit
    cuts the answer, as OpenAI's are)."""

    def delta(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        self.text += text
        if not self.calls:
            self.calls.append(call(self.choice.name, text))
            return {"tool_calls": [{"index": 0} | self.calls[0]]}, reason
        self.calls[0]["function"]["arguments"] += text
        return ({"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}), reason


class CallArray(CallStream):
    """``required``: each ``{"name", "parameters"}`` object of the array as soon as it is complete; an
    answer cut before its first call ends as text."""

    def _read(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        found = self._objects("[, \n\t\r")
        return (self.text if final and not self.calls and not found else ""), found

    def _objects(self, between: str) -> list[dict[str, Any]]:
        """The calls in the complete JSON objects from ``read`` on, ``between`` characters apart; stops
        at an unfinished object or one that is not a call (the rest stays unread)."""
        found = []
        while True:
            start = len(self.text) - len(self.text[self.read :].lstrip(between))
            try:
                item, end = DECODER.raw_decode(self.text, start)
            except ValueError:
                return found
            made = call_of(item)
            if made is None:
                return found
            found.append(made)
            self.read = end


class LeadingCalls(CallArray):
    """``auto`` for models that answer with text, or with calls from the first character on:
    ``llama3_json`` (``<|python_tag|>``, then ``{"name", "parameters"}`` objects separated by ``;``:
    Llama 3.1 to 3.3) and ``mistral`` (``[TOOL_CALLS]``, then an array of ``{"name", "arguments"}``).
    Text is streamed as it comes once its start rules calls out; calls as each object completes."""

    FORMATS = {"llama3_json": ("<|python_tag|>", "{", "; \n\t\r"), "mistral": ("[TOOL_CALLS]", "[", "[, \n\t\r")}

    def __init__(self, choice: ToolChoice):
        super().__init__(choice)
        self.tag, self.opener, self.between = self.FORMATS[choice.parser]
        self.calling: bool | None = None  # unknown until the answer's start is seen

    def _read(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        if self.calling is None:
            head = self.text.lstrip()
            if not final and (not head or self.tag.startswith(head)):
                return "", []  # it may still become the tag
            self.calling = head.startswith((self.tag, self.opener))
            if head.startswith(self.tag):
                self.read = len(self.text) - len(head) + len(self.tag)
        if not self.calling:
            content, self.read = self.text[self.read :], len(self.text)
            return content, []
        found = self._objects(self.between)
        return (self.text if final and not self.calls and not found else ""), found


class HermesCalls(CallStream):
    """``auto`` with the ``hermes`` parser: the text before the first ``<tool_call>`` is the content
    (held back only while it could be the start of that tag), then each ``<tool_call>{"name",
    "arguments"}</tool_call>`` block is a call once it closes. A block that is not such JSON, or is cut
    off, stays text while no call came before it; after a call, text outside the blocks is dropped."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def _read(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content, found = "", []
        while True:
            start = self.text.find(self.OPEN, self.read)
            if start < 0:
                end = len(self.text) if final else len(self.text) - held_back(self.text[self.read :], self.OPEN)
                content += self.text[self.read : end] if not (self.calls or found) else ""
                self.read = end
                return content, found
            close = self.text.find(self.CLOSE, start)
            if close < 0:  # a block still open: wait for it (or, cut off, it is text)
                if not (self.calls or found):
                    content += self.text[self.read : len(self.text) if final else start]
                self.read = len(self.text) if final else start
                return content, found
            if not (self.calls or found):
                content += self.text[self.read : start]
            parsed = call_in(self.text[start + len(self.OPEN) : close])
            if parsed is not None:
                found.append(parsed)
            elif not (self.calls or found):
                content += self.text[start : close + len(self.CLOSE)]
            self.read = close + len(self.CLOSE)


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag`` (wait for more before sending)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)


DECODER = json.JSONDecoder()


def call_in(body: str) -> dict[str, Any] | None:
    """The call in a ``<tool_call>`` block's JSON, or None."""
    try:
        return call_of(json.loads(body))
    except ValueError:
        return None


def call_of(item: Any) -> dict[str, Any] | None:
    """A call from ``{"name", "arguments" or "parameters"}`` (anything else: None)."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    return call(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))
