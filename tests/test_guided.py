"""Structured output (``guided_*``): only the tokens the grammar allows are picked.

Oracles: an autoregressive loop written here (one forward per token, llguidance's mask for the text so
far, then argmax or the keyed draw), which lossless mode, exact blocks and W = 1 must equal token for
token, batched, on every backend; and the answers themselves, which must parse as the grammar says.
"""

from __future__ import annotations

import json
import re

import llguidance
import llguidance.hf
import pytest
import torch
from test_sampling import keyed_pick

from conftest import EOS, assert_one_line_error, left_pad, write
from dllm_lit import generate_blocks
from dllm_lit.guided import grammar_of
from dllm_lit.settings import DecodeSettings
from dllm_lit.tiny import char_tokenizer, tiny_llama

TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
PROMPTS = [TOKENIZER.encode(text) for text in ("Answer:", "a longer question, then:", "?")]
MODES = {
    "lossless W8": dict(lossless=True, add_eos_length=7),
    "lossless W3, no alternatives": dict(lossless=True, add_eos_length=2, draft_alternatives=0),
    "exact blocks": dict(add_eos_length=3, refine_iter=4),
    "W1": dict(add_eos_length=0),
}
GUIDES = {
    "json": dict(
        guided_json=json.dumps(
            {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["ok", "n"],
                "additionalProperties": False,
                "x-guidance": {"whitespace_flexible": False},  # a random model would pick whitespace forever
            }
        )
    ),
    "regex": dict(guided_regex=r"[a-z]{2,4}-\d\d"),
    "choice": dict(guided_choice=("yes", "no", "not sure")),
    "grammar": dict(guided_grammar='start: "(" item ("," item)* ")"\nitem: /[0-9]/'),
    "gbnf": dict(guided_grammar='root ::= "[" item ("," item)* "]"\nitem ::= [a-c]'),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, intermediate_size=128, kv_heads=2, max_positions=512, initializer_range=0.3, seed=3)


@torch.no_grad()
def constrained(model, prompt: list[int], guide: dict, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """One token per forward, masked by a matcher of its own (llguidance's byte-per-token mask)."""
    grammar = grammar_of(DecodeSettings(lossless=True, **guide))
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(TOKENIZER, n_vocab=VOCAB, eos_token=[EOS]), grammar)
    ids = list(prompt)
    for step in range(40):
        allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[:VOCAB] > 0
        logits = model(torch.tensor([ids])).logits[0, -1].masked_fill(~allowed, float("-inf"))
        if temperature:
            token = keyed_pick(torch.softmax(logits / temperature, -1), seed, step)
        else:
            token = int(logits.argmax())
        ids.append(token)
        assert matcher.consume_token(token)
        if token == EOS:
            break
    return ids[len(prompt) :]


def decode(model, prompts=PROMPTS, **settings) -> list[list[int]]:
    ids, mask = left_pad(prompts)
    result = generate_blocks(
        model, ids, attention_mask=mask, eos_token_id=EOS, tokenizer=TOKENIZER, max_new_tokens=40, **settings
    )
    return [row.ids_with_stop for row in result.rows]


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("guide", sorted(GUIDES))
def test_every_exact_mode_equals_constrained_autoregressive_decoding(model, guide, mode, backend):
    expected = [constrained(model, prompt, GUIDES[guide]) for prompt in PROMPTS]
    assert decode(model, **MODES[mode], **GUIDES[guide], backend=backend) == expected


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sampled_answers_equal_a_constrained_sampler_with_the_same_numbers(model, mode):
    guide = GUIDES["json"]
    expected = [constrained(model, prompt, guide, 1.5, seed) for prompt, seed in zip(PROMPTS, (5, 6, 7))]
    assert decode(model, **MODES[mode], **guide, temperature=1.5, seed=5) == expected
    assert expected != [constrained(model, prompt, guide) for prompt in PROMPTS]


FORCED = dict(guided_regex=r"the answer is (yes|no), as the grammar says")


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
def test_text_the_grammar_forces_is_drafted_and_accepted_in_one_pass(model, backend):
    ids, mask = left_pad(PROMPTS)
    settings = dict(MODES["lossless W8"], **FORCED, backend=backend, max_new_tokens=40)
    result = generate_blocks(model, ids, attention_mask=mask, eos_token_id=EOS, tokenizer=TOKENIZER, **settings)
    expected = [constrained(model, prompt, FORCED) for prompt in PROMPTS]
    assert [row.token_ids + [row.stop_token_id] for row in result.rows] == expected
    # 37 or 38 characters and EOS: every pass accepts 7 forced tokens and the pick after them
    assert [row.forwards for row in result.rows] == [5, 5, 5]


def text(tokens: list[int]) -> str:
    assert tokens[-1] == EOS, "a complete grammar ends the answer"
    return TOKENIZER.decode(tokens[:-1])


def test_answers_follow_their_grammar(model):
    settings = MODES["lossless W8"]
    for answer in decode(model, **settings, **GUIDES["json"]):
        assert set(json.loads(text(answer))) == {"ok", "n"}
    assert all(re.fullmatch(r"[a-z]{2,4}-\d\d", text(a)) for a in decode(model, **settings, **GUIDES["regex"]))
    assert {text(a) for a in decode(model, **settings, **GUIDES["choice"])} <= {"yes", "no", "not sure"}
    assert all(re.fullmatch(r"\[[a-c](,[a-c])*\]", text(a)) for a in decode(model, **settings, **GUIDES["gbnf"]))
    free = decode(model, **settings)
    assert not any(re.fullmatch(r"[a-z]{2,4}-\d\d", TOKENIZER.decode(a)) for a in free), "the grammar did the work"


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(guided_regex="a", guided_choice=("a",)), "Set at most one of"),
        (dict(guided_regex="a(", lossless=True), "guided_regex does not compile: .*unclosed group"),
        (dict(guided_json='{"type": ', lossless=True), "guided_json is not a JSON schema"),
        (dict(guided_json='{"type": "objec"}', lossless=True), "guided_json does not compile: Invalid type"),
        (dict(guided_choice=("a", ""), lossless=True), "guided_choice must be non-empty texts"),
        (dict(guided_grammar='root ::= "yes', lossless=True), "guided_grammar is neither Lark nor GBNF"),
        (dict(guided_regex="a", add_eos_length=3, refine_iter=2), "needs lossless=True or exact blocks"),
        (dict(guided_regex="a", lossless=True, min_new_tokens=2), "cannot be combined with min_new_tokens"),
        (dict(guided_regex="a", lossless=True, ignore_eos=True), "cannot be combined with ignore_eos"),
    ],
)
def test_unusable_guides_are_one_sentence(settings, message):
    with pytest.raises(ValueError, match=message):
        DecodeSettings(**settings)


@pytest.mark.parametrize("backend", ["eager", "cuda_graph"])
@pytest.mark.parametrize("mode", ["lossless W8", "exact blocks"])
def test_rows_with_other_grammars_share_a_batch_each_constrained_as_alone(model, mode, backend):
    guides = [GUIDES["json"], GUIDES["regex"], {}]  # the last row is unconstrained
    settings = dict(MODES[mode], backend=backend)
    together = decode(model, **settings, **GUIDES["choice"], row_guides=guides)
    expected = [constrained(model, prompt, guide) for prompt, guide in zip(PROMPTS[:2], guides)]
    assert together == expected + decode(model, PROMPTS[2:], **settings)
    assert together[:2] != decode(model, PROMPTS[:2], **settings)  # the grammars did the work
    alike = decode(model, **settings, **GUIDES["choice"], row_guides=[None, GUIDES["regex"], None])
    assert alike[::2] == [constrained(model, prompt, GUIDES["choice"]) for prompt in PROMPTS[::2]]


ROW_GUIDES = [
    {"guided_regex": r"[a-z]{2,4}-\d\d"},
    {"guided_choice": ["yes", "no", "not sure"]},
    {"guided_json": json.loads(GUIDES["json"]["guided_json"])},  # a schema object, as JSON lines hold it
    {},
]


def test_predict_follows_each_prompt_s_own_grammar(tiny_dir, tmp_path, dllm_lit_here):
    from dllm_lit.guided import guide_fields
    from dllm_lit.models import load_model, load_tokenizer

    rows = [
        {"prompt": text, "id": n} | guide for n, (text, guide) in enumerate(zip(["a", "bb", "ccc", "d"], ROW_GUIDES))
    ]
    prompts, out = write(tmp_path / "p.jsonl", "".join(json.dumps(row) + "\n" for row in rows)), tmp_path / "o.jsonl"
    common = ["predict", f"--model.model_name_or_path={tiny_dir}", "--model.lossless=true", "--model.max_new_tokens=40"]
    done = dllm_lit_here([*common, f"--data.prompts_file={prompts}", f"--writer.output_file={out}"], tmp_path)
    assert done.returncode == 0, done.stderr
    written = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda row: row["id"])
    tokenizer, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    for row, guide in zip(written, ROW_GUIDES):
        ids = torch.tensor([tokenizer(row["prompt"]).input_ids])
        alone = generate_blocks(
            model,
            ids,
            eos_token_id=tokenizer.eos_token_id,
            tokenizer=tokenizer,
            lossless=True,
            max_new_tokens=40,
            **(guide_fields(guide) or {}),
        ).rows[0]
        assert row["response"] == tokenizer.decode(alone.token_ids, skip_special_tokens=True)
    assert re.fullmatch(r"[a-z]{2,4}-\d\d", written[0]["response"]) and written[1]["response"] in (
        "yes",
        "no",
        "not sure",
    )
    assert set(json.loads(written[2]["response"])) == {"ok", "n"}

    bad = write(
        tmp_path / "bad.jsonl",
        json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "guided_regex": "a("}) + "\n",
    )
    done = dllm_lit_here(
        [*common, f"--data.prompts_file={bad}", f"--writer.output_file={tmp_path / 'x.jsonl'}"], tmp_path
    )
    assert_one_line_error(done, "Prompt 1: guided_regex does not compile")
    blocks = [*common[:2], "--model.add_eos_length=3", "--model.refine_iter=2", f"--data.prompts_file={prompts}"]
    done = dllm_lit_here([*blocks, f"--writer.output_file={tmp_path / 'y.jsonl'}"], tmp_path)
    assert_one_line_error(done, "Prompt 2: guided_json needs lossless=True or exact blocks")  # the longest first


@pytest.mark.parametrize(
    "guides, message",
    [
        ([{"guided_regex": "a"}], "row_guides has 1 entries for 3 prompts"),
        ([{"temperature": 1.0}, None, None], "row_guides may only name guided_json, "),
        ([{"guided_regex": "a("}, None, None], "guided_regex does not compile"),
        ([{"guided_regex": "a", "guided_choice": ("a",)}, None, None], "Set at most one of"),
    ],
)
def test_unusable_row_guides_are_one_sentence(model, guides, message):
    with pytest.raises(ValueError, match=message):
        decode(model, lossless=True, row_guides=guides)
    with pytest.raises(ValueError, match="needs lossless=True or exact blocks"):
        decode(model, add_eos_length=3, refine_iter=2, row_guides=[{"guided_regex": "a"}, None, None])


def test_guided_decoding_needs_the_tokenizer(model):
    with pytest.raises(ValueError, match="needs the tokenizer"):
        generate_blocks(model, torch.tensor([PROMPTS[0]]), eos_token_id=EOS, lossless=True, guided_regex="a")


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(
    "body, guide",
    [
        ({"response_format": {"type": "json_object"}}, {"guided_json": '{"type": "object"}'}),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}, SCHEMA),
        ({"guided_json": SCHEMA}, SCHEMA),
        ({"structured_outputs": {"json": SCHEMA}}, SCHEMA),
        ({"structured_outputs": {"json_object": True}}, {"guided_json": '{"type": "object"}'}),
        (
            {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
            SCHEMA | {"x-guidance": {"whitespace_flexible": False}},
        ),
        ({"structured_outputs": {"choice": ["a", "b"]}}, {"guided_choice": ("a", "b")}),
        ({"guided_regex": "a+"}, {"guided_regex": "a+"}),
        ({"structured_outputs": {"grammar": "root ::= [a]"}}, {"guided_grammar": "root ::= [a]"}),
    ],
)
def test_requests_ask_for_a_grammar_as_openai_and_vllm_clients_do(body, guide):
    from dllm_lit.openai_api import ChatRequest, parse

    request = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})
    expected = guide if "type" not in guide else {"guided_json": json.dumps(guide)}
    assert (
        request.guide() == dict.fromkeys(("guided_json", "guided_regex", "guided_choice", "guided_grammar")) | expected
    )
    DecodeSettings(lossless=True, **request.guide())  # compiles


@pytest.mark.parametrize(
    "body, message",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "Give one of response_format"),
        ({"structured_outputs": {"regex": "a"}, "guided_regex": "a"}, "Give one of response_format"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag is not supported"),
        ({"response_format": {"type": "xml"}}, "response_format is text, json_object, or json_schema"),
    ],
)
def test_conflicting_or_unknown_grammar_requests_are_400s(body, message):
    from dllm_lit.openai_api import ChatRequest, OpenAIError, parse

    request = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})
    with pytest.raises(OpenAIError, match=message) as error:
        request.guide()
    assert error.value.status == 400
