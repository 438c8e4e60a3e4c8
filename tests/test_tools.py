"""Tool calls read from structured answers (``dllm_lit.tools``): modes, schemas, calls and stream deltas.

The server's end-to-end tests (``tests/test_serve.py``) check the calls against ``predict``; these
check the reading of answers the tests write, and that each mode's schema accepts exactly its calls.
"""

from __future__ import annotations

import json
import re

import llguidance
import llguidance.hf
import pytest

from dllm_lit.settings import DecodeSettings
from dllm_lit.tools import AUTO_REFUSED, Tool, ToolChoice

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    Tool.model_validate({"type": "function", "function": {"name": "weather", "parameters": PARAMETERS}}),
    Tool.model_validate({"type": "function", "function": {"name": "time"}}),
]
NAMED = {"type": "function", "function": {"name": "weather"}}


@pytest.mark.parametrize(
    "tools, choice, message",
    [
        (None, "required", "tool_choice needs tools"),
        (TOOLS, None, AUTO_REFUSED),
        (TOOLS, "auto", AUTO_REFUSED),
        (TOOLS, "any", 'tool_choice is "none", "auto", "required" or'),
        (TOOLS, {"type": "function", "function": {"name": "news"}}, "names 'news', which is not one of the tools"),
    ],
)
def test_tool_modes_that_cannot_be_answered_are_one_sentence(tools, choice, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ToolChoice.read(tools, choice, True)


def test_no_tools_or_none_answer_as_usual():
    assert ToolChoice.read(None, None, True) is None and ToolChoice.read(TOOLS, "none", True) is None


def accepts(schema: dict, text: str) -> bool:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    return llguidance.LLMatcher.validate_grammar(grammar) == "" and grammar_accepts(grammar, text)


def grammar_accepts(grammar: str, text: str) -> bool:
    from dllm_lit.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id])
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return matcher.consume_tokens(ids) and matcher.is_stopped() and not matcher.is_error()


def test_each_mode_s_schema_accepts_its_calls_compactly_and_nothing_else():
    required, single = ToolChoice.read(TOOLS, "required", True), ToolChoice.read(TOOLS, "required", False)
    two = '[{"name":"weather","parameters":{"city":"Oslo"}},{"name":"time","parameters":{}}]'
    assert accepts(required.schema(), two) and not accepts(single.schema(), two)
    assert accepts(single.schema(), two[: two.index("},{") + 1] + "]")
    assert not accepts(required.schema(), "[]") and not accepts(required.schema(), '[{"name":"news","parameters":{}}]')
    named = ToolChoice.read(TOOLS, NAMED, True)
    assert accepts(named.schema(), '{"city":"Oslo"}') and not accepts(named.schema(), '{ "city": "Oslo"}')
    DecodeSettings(lossless=True, guided_json=json.dumps(required.schema()))  # the server's check passes


def test_answers_become_openai_calls_and_an_answer_cut_before_its_first_call_stays_text():
    required = ToolChoice.read(TOOLS, "required", True)
    message, reason = required.message('[{"name":"time","parameters":{"zone":"UTC"}}]', "stop")
    assert reason == "tool_calls" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "time", "arguments": '{"zone": "UTC"}'}
    assert required.message('[{"name":"time","param', "length") == (
        {"role": "assistant", "content": '[{"name":"time","param'},
        "length",
    )
    named = ToolChoice.read(TOOLS, NAMED, True)
    message, reason = named.message('{"city":"Oslo"}', "stop")
    assert reason == "stop" and message["tool_calls"][0]["function"] == {
        "name": "weather",
        "arguments": '{"city":"Oslo"}',
    }


def test_a_named_call_streams_its_arguments_and_required_calls_each_once_complete():
    stream = ToolChoice.read(TOOLS, NAMED, True).stream()
    deltas = [stream.delta(text, reason) for text, reason in (('{"ci', None), ("", None), ('ty":"Oslo"}', "stop"))]
    (first,), _ = deltas[0][0]["tool_calls"], deltas[0][1]
    assert first["index"] == 0 and first["function"]["name"] == "weather" and first["id"].startswith("call_")
    assert deltas[1] == ({}, None) and deltas[2][1] == "stop"
    assert '{"ci' + deltas[2][0]["tool_calls"][0]["function"]["arguments"] == '{"city":"Oslo"}'
    assert stream.calls[0]["function"]["arguments"] == '{"city":"Oslo"}'
    stream = ToolChoice.read(TOOLS, "required", True).stream()
    text = '[{"name":"time","parameters":{}},{"name":"weather","parameters":{"city":"Rome"}}]'
    first_end = text.index("},{") + 1
    assert stream.delta(text[: first_end - 1], None) == ({}, None)
    delta, _ = stream.delta(text[first_end - 1 : first_end + 5], None)
    assert [(c["index"], c["function"]["name"]) for c in delta["tool_calls"]] == [(0, "time")]
    delta, reason = stream.delta(text[first_end + 5 :], "stop")
    assert reason == "tool_calls" and [(c["index"], c["function"]["name"]) for c in delta["tool_calls"]] == [
        (1, "weather")
    ]
    assert [c["function"]["arguments"] for c in stream.calls] == ["{}", '{"city": "Rome"}']


def test_a_cut_answer_keeps_its_complete_calls_as_openai_does():
    required = ToolChoice.read(TOOLS, "required", True)
    message, reason = required.message('[{"name":"time","parameters":{}},{"name":"wea', "length")
    assert reason == "length" and [c["function"]["name"] for c in message["tool_calls"]] == ["time"]
    message, reason = ToolChoice.read(TOOLS, NAMED, True).message('{"city":"Os', "length")
    assert reason == "length" and message["tool_calls"][0]["function"]["arguments"] == '{"city":"Os'


HERMES = ToolChoice.read(TOOLS, "auto", True, "hermes")
ANSWERS = {
    "hermes": {
        "a call after text": 'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}'
        "\n</tool_call>",
        "two calls": '<tool_call>{"name": "time", "arguments": {}}</tool_call>\n<tool_call>{"name": "weather", '
        '"arguments": {"city": "Rome"}}</tool_call>\n',
        "plain text with a tag-like word": "Use a <tool> or a <tool_ca and see.",
        "a block that is not a call": "<tool_call>not json</tool_call> then text",
        "a block cut off": 'I will call <tool_call>{"name": "wea',
    },
    "llama3_json": {
        "a tagged call": '<|python_tag|>{"name": "weather", "parameters": {"city": "Oslo"}}',
        "two calls": '{"name": "time", "parameters": {}}; {"name": "weather", "parameters": {"city": "Rome"}}',
        "text": "The weather is {unknown} today.",
        "an object that is not a call": '{"answer": 42}',
        "a call cut off": '{"name": "wea',
    },
    "mistral": {
        "a tagged call": '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo"}}]',
        "two calls": ' [{"name": "time", "arguments": {}}, {"name": "weather", "arguments": {"city": "Rome"}}]',
        "text": "Sure, [1] is a footnote.",
        "an array that is not of calls": "[1, 2]",
    },
}
CASES = [(parser, answer) for parser, answers in ANSWERS.items() for answer in answers]


def merged(choice: ToolChoice, chunks: list[str], reason: str) -> tuple[str, list[tuple[str, str]], str]:
    """``(content, [(name, arguments)], finish_reason)`` of the deltas of ``chunks``, merged."""
    stream, content, calls = choice.stream(), "", {}
    for n, chunk in enumerate(chunks):
        delta, finish = stream.delta(chunk, reason if n == len(chunks) - 1 else None)
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            calls[piece["index"]] = (piece["function"]["name"], piece["function"]["arguments"])
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("parser, answer", CASES, ids=[f"{p}-{a}" for p, a in CASES])
def test_auto_calls_streamed_in_any_chunks_equal_the_whole_answer_read_at_once(parser, answer):
    choice, text = ToolChoice.read(TOOLS, "auto", True, parser), ANSWERS[parser][answer]
    message, reason = choice.message(text, "stop")
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    whole = (message["content"] or "", calls, reason)
    for size in (1, 2, 5, 11, len(text)):
        assert merged(choice, [text[i : i + size] for i in range(0, len(text), size)], "stop") == whole


@pytest.mark.parametrize("parser", ["llama3_json", "mistral"])
def test_json_led_calls_are_read_from_the_answer_s_start_and_other_answers_are_text(parser):
    choice = ToolChoice.read(TOOLS, "auto", True, parser)
    message, reason = choice.message(ANSWERS[parser]["a tagged call"], "stop")
    assert reason == "tool_calls" and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "weather", "arguments": '{"city": "Oslo"}'}]
    message, _ = choice.message(ANSWERS[parser]["two calls"], "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["time", "weather"]
    for kind, text in ANSWERS[parser].items():
        if "call" not in kind:
            assert choice.message(text, "stop") == ({"role": "assistant", "content": text}, "stop")


@pytest.mark.parametrize("parser", ANSWERS)
def test_without_parallel_calls_only_the_model_s_first_call_is_kept_streamed_or_whole(parser):
    parallel, single = (ToolChoice.read(TOOLS, "auto", allowed, parser) for allowed in (True, False))
    text = ANSWERS[parser]["two calls"]
    both, _ = parallel.message(text, "stop")
    first, reason = single.message(text, "stop")
    assert len(both["tool_calls"]) == 2 and reason == "tool_calls"
    assert [c["function"] for c in first["tool_calls"]] == [both["tool_calls"][0]["function"]]
    assert merged(single, list(text), "stop") == (first["content"] or "", [("time", "{}")], reason)


def test_hermes_calls_are_read_from_their_tags_and_the_rest_is_content():
    answers = ANSWERS["hermes"]
    message, reason = HERMES.message(answers["a call after text"], "stop")
    assert reason == "tool_calls" and message["content"] == "Let me check.\n"
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "weather", "arguments": '{"city": "Oslo"}'}]
    message, reason = HERMES.message(answers["two calls"], "stop")
    assert message["content"] is None and [c["function"]["name"] for c in message["tool_calls"]] == ["time", "weather"]
    for kind in ("plain text with a tag-like word", "a block that is not a call", "a block cut off"):
        assert HERMES.message(answers[kind], "length") == ({"role": "assistant", "content": answers[kind]}, "length")
    assert HERMES.schema() is None, "auto leaves the answer free"


def test_tool_calls_on_approximate_blocks_are_a_400_that_names_the_tool_choice():
    from dllm_lit.openai_api import ChatRequest, OpenAIError, parse, settings_for

    tools = [tool.model_dump() for tool in TOOLS]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": "required"}
    with pytest.raises(OpenAIError, match='^tool_choice "required" or a named function needs lossless=True'):
        settings_for(DecodeSettings(add_eos_length=3, refine_iter=2), parse(ChatRequest, body))
    assert settings_for(DecodeSettings(add_eos_length=3, refine_iter=2), parse(ChatRequest, body | {"lossless": True}))


def test_a_parser_s_text_keeps_the_special_tokens_its_tags_may_be():
    from dllm_lit.textstream import TextStream
    from dllm_lit.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    ids = [tokenizer.bos_token_id, *tokenizer.encode("ab", add_special_tokens=False)]
    kept = TextStream(tokenizer, (), skip_special_tokens=False)  # what serve uses with --tool_call_parser
    assert kept.add(ids) + kept.finish() == "<s>ab" and TextStream(tokenizer).add(ids) == "ab"
