"""Tool calls for ``serve``'s chat endpoint (OpenAI's ``tools`` and ``tool_choice``), through structured output.

The tools reach the model through its chat template (``apply_chat_template(tools=...)``). Which calls
come back does not depend on a model-specific output format: as vLLM does without a tool-call parser,
the answer is constrained by a JSON schema (:mod:`dllm_lit.guided`) and read back as calls.

- ``tool_choice: {"type": "function", "function": {"name": ...}}``: the answer is that function's
  arguments, a JSON object following its ``parameters`` schema; one call, ``finish_reason`` ``stop``.
- ``tool_choice: "required"``: the answer is a JSON array of ``{"name", "parameters"}`` objects, one or
  more calls of the given tools (one with ``parallel_tool_calls: false``); ``finish_reason`` ``tool_calls``.
- ``"none"``: an ordinary answer. ``"auto"`` (the default with tools) would need a parser for the
  model's own tool-call format, so it is refused with a 400 that names the two choices above.
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
    'tool_choice "auto" needs a parser for this model\'s own tool-call format, which this server does not '
    'have: send tool_choice "required" or {"type": "function", "function": {"name": ...}}.'
)


class ToolChoice:
    """A request's tool mode: ``name`` (one named function) or ``required`` (one or more calls of any).

    Args:
        tools: The request's tools.
        name: The function ``tool_choice`` names (None: ``required``).
        parallel: Whether ``required`` may return several calls.
    """

    def __init__(self, tools: list[Tool], name: str | None, parallel: bool):
        self.tools, self.name, self.parallel = {tool.function.name: tool for tool in tools}, name, parallel

    @classmethod
    def read(cls, tools: list[Tool] | None, choice: Any, parallel: bool) -> ToolChoice | None:
        """The request's tool mode (None: answer as usual), or ValueError with the 400's sentence."""
        if choice is not None and not tools:
            raise ValueError("tool_choice needs tools.")
        if not tools or choice == "none":
            return None
        if choice in (None, "auto"):
            raise ValueError(AUTO_REFUSED)
        if choice == "required":
            return cls(tools, None, parallel)
        name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str):
            raise ValueError('tool_choice is "none", "required" or {"type": "function", "function": {"name": ...}}.')
        if name not in {tool.function.name for tool in tools}:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the tools.")
        return cls(tools, name, parallel)

    def schema(self) -> dict[str, Any]:
        """The JSON schema the answer follows, compact (no free whitespace: the calls are read by a
        program, and the text a grammar forces is drafted in lossless mode)."""
        compact = {"x-guidance": {"whitespace_flexible": False}}
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

    def finish_reason(self, reason: str) -> str:
        """OpenAI's: ``tool_calls`` when the model chose the calls, ``stop`` when the request named one
        (``length`` when a limit cut the answer)."""
        return "tool_calls" if reason == "stop" and self.name is None else reason

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str]:
        """A whole answer's ``message`` and ``finish_reason`` (what :class:`ToolStream` sends, merged)."""
        stream = ToolStream(self)
        delta, reason = stream.delta(text, reason)
        if "content" in delta:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": None, "tool_calls": stream.calls}, reason


def call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ToolStream:
    """One choice's tool-call deltas, as its text comes. A named function's call comes first, then
    its arguments as they are decoded (cut short when a limit cuts the answer, as OpenAI's are).
    ``required`` calls come one by one, each once its ``{"name", "parameters"}`` object is complete;
    an answer cut before its first call ends as text."""

    def __init__(self, choice: ToolChoice):
        self.choice, self.text, self.read = choice, "", 0  # ``read``: the text the calls so far cover
        self.calls: list[dict[str, Any]] = []
        self.decoder = json.JSONDecoder()

    def delta(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The ``delta`` and ``finish_reason`` of a chunk that adds ``text`` (``reason``: the last)."""
        self.text += text
        if reason is not None:
            reason = self.choice.finish_reason(reason)
        if self.choice.name is not None:
            if not self.calls:
                self.calls.append(call(self.choice.name, text))
                return {"tool_calls": [{"index": 0} | self.calls[0]]}, reason
            self.calls[0]["function"]["arguments"] += text
            return ({"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}), reason
        new = [{"index": len(self.calls) + n} | c for n, c in enumerate(self._complete())]
        self.calls += [{key: value for key, value in c.items() if key != "index"} for c in new]
        if reason is not None and not self.calls:
            return {"content": self.text}, reason
        return ({"tool_calls": new} if new else {}), reason

    def _complete(self) -> list[dict[str, Any]]:
        """The calls completed since the last read: each array element that now parses whole."""
        found = []
        while True:
            start = len(self.text) - len(self.text[self.read :].lstrip("[, \n\t\r"))
            try:
                item, end = self.decoder.raw_decode(self.text, start)
            except ValueError:
                return found
            if not isinstance(item, dict) or not {"name", "parameters"} <= item.keys():
                return found  # not a call: the grammar was left (a matcher error); the rest stays text
            found.append(call(item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
            self.read = end
