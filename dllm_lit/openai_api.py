"""The OpenAI HTTP schema that ``dllm_lit serve`` speaks: requests, checks, responses, errors.

Requests are read with pydantic; anything the engine cannot run is refused here, in the HTTP
process, with OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) and a 4xx
status, before it reaches the model worker. dllm_lit's own settings ride in the body next to
OpenAI's (the ``extra_body`` of the ``openai`` client): ``add_eos_length``, ``refine_iter`` and
``lossless``, echoed in ``usage`` with ``forwards`` and ``tokens_per_forward``, and ``ignore_eos``,
``top_k`` (-1 or 0: no limit), ``min_p``, ``repetition_penalty``, ``min_tokens`` and
``stop_token_ids``, as vLLM's server accepts them (``logit_bias``, ``presence_penalty`` and
``frequency_penalty`` are OpenAI's own). Structured output: OpenAI's ``response_format``
(``json_object``, ``json_schema``), vLLM's ``structured_outputs`` or its older ``guided_json``,
``guided_regex``, ``guided_choice`` and ``guided_grammar``; chat's ``tools`` with ``tool_choice``
``"required"`` or a named function (:mod:`dllm_lit.tools`). A message's content is a string or a list
of text parts.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from dllm_lit.guided import guide_fields
from dllm_lit.settings import GUIDED, DecodeSettings
from dllm_lit.tools import Tool, ToolChoice


class OpenAIError(Exception):
    """An error to send as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    """A text part of a message's content (``{"type": "text", "text": ...}``); no other kinds."""

    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content (an assistant's may give tool_calls instead)")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: a list of text parts joined by newlines (as vLLM does),
        no content as empty, and an assistant's calls with their arguments as objects."""
        parts = self.content if isinstance(self.content, list) else [TextPart(type="text", text=self.content or "")]
        message: dict[str, Any] = {"role": self.role, "content": "\n".join(part.text for part in parts)}
        if self.tool_calls:
            message["tool_calls"] = [template_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier tool call as chat templates read it: ``arguments`` as an object, not JSON text."""
    function = dict(call.get("function") or {})
    try:
        function["arguments"] = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError):
        pass  # an object already, or text a template may print as it is
    return {**call, "function": function}


class Prediction(BaseModel):
    """``{"type": "content", "content": text or text parts}``: what the answer is expected to repeat
    (OpenAI's Predicted Outputs). Drafted from in lossless mode (fewer forwards where the answer
    follows it); the answer is the model's own either way."""

    type: Literal["content"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    """``include_usage``: end a stream with a chunk of ``usage`` and no choices (OpenAI's rule)."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


MAX_TOP_LOGPROBS = 20
"""The most likely tokens a request may ask for at each position (vLLM's default limit)."""


class CommonRequest(BaseModel):
    """Fields shared by both endpoints; other fields (``user``...) are ignored, but those in
    :data:`UNSUPPORTED` only at their defaults."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    add_eos_length: int | None = Field(None, ge=0)
    refine_iter: int | None = Field(None, ge=1)
    lossless: bool | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prediction: Prediction | None = None

    def predicted_text(self) -> str | None:
        """OpenAI's Predicted Outputs: the text the answer is expected to repeat (None: none)."""
        if self.prediction is None:
            return None
        content = self.prediction.content
        return content if isinstance(content, str) else "".join(part.text for part in content)

    def logprob_count(self) -> int | None:
        """The most likely tokens to report beside each token's log-probability (None: no logprobs)."""
        return None

    def overrides(self) -> dict[str, Any]:
        """The request's decoding settings, on top of the server's (logprobs: the request's alone)."""
        chosen = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "top_k": max(self.top_k, 0) if self.top_k is not None else None,  # vLLM's -1: no limit, as 0
            "seed": self.seed,
            "add_eos_length": self.add_eos_length,
            "refine_iter": self.refine_iter,
            "lossless": self.lossless,
            "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias,
            "min_new_tokens": self.min_tokens,
            "stop_token_ids": self.stop_token_ids,
        }
        chosen = {name: value for name, value in chosen.items() if value is not None}
        return chosen | self.guide() | {"logprobs": self.logprob_count()}

    def guide(self) -> dict[str, Any]:
        """The request's structured output, from ``response_format``, ``structured_outputs`` or the
        ``guided_*`` fields (one of them), in place of the server's (empty: the server's)."""
        fields = dict(
            guided_json=self.guided_json,
            guided_regex=self.guided_regex,
            guided_choice=self.guided_choice,
            guided_grammar=self.guided_grammar,
        )
        asked = [
            guide
            for guide in (
                {name: value for name, value in fields.items() if value is not None},
                structured_guide(self.structured_outputs or {}),
                response_guide(self.response_format or {}),
            )
            if guide
        ]
        if len(asked) > 1:
            raise OpenAIError(400, "Give one of response_format, structured_outputs and the guided_* fields.")
        if not asked:
            return {}
        return dict.fromkeys(GUIDED) | guide_fields(asked[0])

    def usage_chunk(self) -> bool:
        """Whether a stream ends with a chunk of usage alone (else its last choice chunk carries it)."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed with stream: true.", "stream_options")
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise OpenAIError(400, "stop accepts at most 4 strings.", "stop")
        return stop


class TemplateFields(BaseModel):
    """vLLM's chat template fields: ``add_generation_prompt`` (start the assistant's turn),
    ``continue_final_message`` (go on with the last, assistant, message instead: set the other false)
    and ``chat_template_kwargs`` (the template's own variables, such as Qwen3's ``enable_thinking``)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def template_fields(self) -> dict[str, Any]:
        return self.model_dump(include={"add_generation_prompt", "continue_final_message", "chat_template_kwargs"})


class ChatRequest(CommonRequest, TemplateFields):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    _tool_call_parser: str | None = PrivateAttr(None)  # the server's, for tool_choice "auto"

    def tool_mode(self) -> ToolChoice | None:
        """How the answer becomes tool calls (None: it is text), or a 400."""
        try:
            return ToolChoice.read(self.tools, self.tool_choice, self.parallel_tool_calls, self._tool_call_parser)
        except ValueError as error:
            raise OpenAIError(400, str(error), "tool_choice") from None

    def guide(self) -> dict[str, Any]:
        """:meth:`CommonRequest.guide`, or in tool mode the calls' JSON schema."""
        asked, tools = super().guide(), self.tool_mode()
        if tools is None:
            return asked
        if asked:
            raise OpenAIError(400, "Give tools or a structured output (response_format...), not both.", "tools")
        schema = tools.schema()
        return {} if schema is None else dict.fromkeys(GUIDED) | {"guided_json": json.dumps(schema)}

    def template_row(self) -> dict[str, Any]:
        """The prompt as ``encode_prompt`` takes it: the messages, and the tools for the template."""
        row = {"messages": [message.for_template() for message in self.messages], **self.template_fields()}
        if self.tools:
            row["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
        return row

    def logprob_count(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true.", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(CommonRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt alone, as OpenAI's legacy API

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_only(self) -> bool:
        """``max_tokens: 0`` with ``echo``: the prompt (and its logprobs) is the answer, nothing decoded."""
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens 0 needs echo: true (the prompt alone, with its logprobs).", "max_tokens")
        return self.max_tokens == 0

    def overrides(self) -> dict[str, Any]:
        chosen = super().overrides()
        if self.max_tokens == 0:  # nothing is decoded; the settings still hold a valid limit
            chosen.pop("max_new_tokens", None)
        return chosen

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids (one list of ids is one prompt)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise OpenAIError(400, "prompt holds no prompt.", "prompt")
        return [self.prompt] if isinstance(self.prompt[0], int) else list(self.prompt)


class TokenizeRequest(TemplateFields):
    """vLLM's ``POST /tokenize`` body: one ``prompt`` or chat ``messages`` (with the template fields)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)

    def row(self) -> dict:
        """The prompt as ``encode_prompt`` takes it, or a 400 unless exactly one of the two is given."""
        if (self.prompt is None) == (self.messages is None):
            raise OpenAIError(400, "Give exactly one of prompt and messages.")
        if self.messages is None:
            return {"prompt": self.prompt}
        return {"messages": [message.for_template() for message in self.messages], **self.template_fields()}


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize`` body."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


UNSUPPORTED = ("functions", "echo")
"""OpenAI fields that would change what a client gets back: refused unless at their defaults (0,
false, null, empty), not silently ignored (``echo``: on chat requests; completions take it)."""


def response_guide(response_format: dict[str, Any]) -> dict[str, Any]:
    """The ``guided_json`` that OpenAI's ``response_format`` asks for (empty for ``text``)."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"guided_json": {"type": "object"}}
    schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        message = "response_format is text, json_object, or json_schema with json_schema.schema, a JSON schema object."
        raise OpenAIError(400, message, "response_format")
    return {"guided_json": schema}


STRUCTURED = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}
"""vLLM's ``structured_outputs`` fields, and the settings they set."""


def structured_guide(fields: dict[str, Any]) -> dict[str, Any]:
    """The ``guided_*`` settings of vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``,
    ``grammar``, ``json_object``, and ``disable_any_whitespace`` for JSON)."""
    fields = dict(fields)
    compact = fields.pop("disable_any_whitespace", False)
    if fields.pop("json_object", False):
        fields["json"] = {"type": "object"}
    unknown = [name for name, value in fields.items() if name not in STRUCTURED and value not in (None, False)]
    if unknown:
        raise OpenAIError(
            400, f"structured_outputs.{unknown[0]} is not supported by this server.", "structured_outputs"
        )
    guide = {STRUCTURED[name]: value for name, value in fields.items() if name in STRUCTURED and value is not None}
    if compact and isinstance(guide.get("guided_json"), dict):
        guide["guided_json"] = guide["guided_json"] | {"x-guidance": {"whitespace_flexible": False}}
    return guide


def parse(model: type[BaseModel], body: Any, tool_call_parser: str | None = None) -> Any:
    """The request, or a 400 naming the first bad or unsupported field (``tool_call_parser``: the
    server's, which a chat request's ``tool_choice: "auto"`` needs)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    for name in UNSUPPORTED:
        if body.get(name) and name not in model.model_fields:
            raise OpenAIError(400, f"{name} is not supported by this server.", name)
    if body.get("best_of") not in (None, 1):
        raise OpenAIError(400, "best_of above 1 is not supported by this server.", "best_of")
    parsed = validated(model, body)
    if isinstance(parsed, ChatRequest):
        parsed._tool_call_parser = tool_call_parser
    return parsed


def validated(model: type[BaseModel], body: Any, where: str = "") -> Any:
    """``body`` read as ``model``, or a 400 naming the first bad field (after ``where``, e.g. ``input.0.``)."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = where + ".".join(str(part) for part in first["loc"])
        raise OpenAIError(400, f"{param}: {first['msg']}.", param or None) from None


def settings_for(base: DecodeSettings, request: CommonRequest) -> DecodeSettings:
    """The server's settings with the request's overrides, or a 400 with the engine's sentence."""
    try:
        return base.replace(**request.overrides())
    except (ValueError, TypeError) as error:
        message = str(error)
        if isinstance(request, ChatRequest) and request.tools and message.startswith("guided_json "):
            message = f'tool_choice "required" or a named function {message.removeprefix("guided_json ")}'
        raise OpenAIError(400, message) from None


def usage(
    prompt_tokens: int,
    completion_tokens: int,
    forwards: int,
    settings: dict[str, Any],
    cached_tokens: int = 0,
    prediction_tokens: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """OpenAI's usage block plus the decoding statistics and the settings that produced them (with
    several choices: tokens and forwards summed over them, each prompt counted once; ``cached_tokens``:
    the prompt tokens read from the prompt cache; ``prediction_tokens``: the accepted and rejected
    tokens of a Predicted Output)."""
    accepted, rejected = prediction_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": rejected,
        },
        "forwards": forwards,
        "tokens_per_forward": round(completion_tokens / max(forwards, 1), 4),
        **settings,
    }


def finish_reason(stop_reason: str) -> str:
    """OpenAI's ``finish_reason`` for a row's stop reason (EOS and stop strings: ``stop``)."""
    return "length" if stop_reason in ("max_new_tokens", "max_length") else "stop"


def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def choice(
    chat: bool, text: str, reason: str | None, streaming: bool, index: int = 0, logprobs: dict | None = None
) -> dict[str, Any]:
    """One choice of a response or chunk (``logprobs``: from :func:`~dllm_lit.logprobs.openai_logprobs`)."""
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    if streaming:
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def envelope(chat: bool, rid: str, model: str, streaming: bool, **fields: Any) -> dict[str, Any]:
    """The object around choices: id, object type, creation time, model."""
    kind = ("chat.completion.chunk" if streaming else "chat.completion") if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, **fields}
