"""``dllm_lit chat``: talk to the model in the terminal, the answer streaming block by block.

Multi-turn: each turn sends the whole history through the chat template; each answer ends with a
line of statistics on stderr (tokens, tok/s, forwards, tokens per forward). ``/reset`` clears the
history, ``/save FILE`` writes it as JSON (``{"messages": [...]}``: a ``predict`` prompt row, or OpenAI's
messages) and ``/load FILE`` reads such a file back in its place, ``/exit`` (``/quit``, Ctrl-D) leaves,
``/help`` lists these, Ctrl-C stops the current answer
(at the next commit) and keeps what was said so far; at the prompt, Ctrl-C clears the line. When
the history no longer fits under ``max_length`` with room for an answer, its oldest exchanges are
dropped (the system message stays).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

from dllm_lit.data import PromptError, encode_prompt, template_options
from dllm_lit.model_args import ANSWERING_DEFAULTS, add_function_flags, function_flags, model_parser, model_settings
from dllm_lit.models import load_model, load_tokenizer, resolve_device, resolve_dtype
from dllm_lit.settings import DecodeSettings
from dllm_lit.streaming import Job, stream_jobs, warm_up

HELP = (
    "Type a message. /reset clears the history, /save FILE and /load FILE write and read it, /exit (or Ctrl-D)"
    " leaves, /help shows this, Ctrl-C stops an answer."
)
ROLES = ("system", "user", "assistant")


def chat(
    model_name_or_path: str,
    trust_remote_code: bool,
    settings: DecodeSettings,
    *,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    system: str | None = None,
    multiline: bool = False,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> None:
    """Chat with the model until /exit or Ctrl-D.

    Args:
        device: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda``.
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), ``float32``, ``bfloat16`` or ``float16``.
        system: A system message put first in the history (kept across /reset).
        multiline: A message runs until an empty line (for pasted text and code); else each line is one.
        chat_template: A chat template in place of the tokenizer's: a Jinja file, or the template itself.
        chat_template_kwargs: The template's own variables, e.g. ``{"enable_thinking": false}`` (Qwen3).
    """
    if settings.logprobs is not None:
        raise ValueError("--model.logprobs does nothing in chat, which prints answers only (use predict or serve).")
    template_options({"chat_template_kwargs": chat_template_kwargs})  # a bad variable fails now, not at a message
    device = resolve_device(device)
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code, chat_template=chat_template)
    if not tokenizer.chat_template:
        raise PromptError("This model's tokenizer has no chat template: give one with --chat_template FILE.")
    model = load_model(model_name_or_path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
    model = model.to(device)
    warm_up(model, tokenizer, settings, rows=1)  # a compiled backend compiles now, not in the first answer
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    usage = HELP + (" A message ends with an empty line." if multiline else "")
    print(usage, file=sys.stderr)
    while True:
        try:
            line = read_message(multiline)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        if line in ("/exit", "/quit"):
            return
        if re.fullmatch(r"/\w+( .*)?", line):
            history = run_command(line, history, start, usage)
        elif line:
            system = int(bool(history) and history[0]["role"] == "system")  # never dropped to fit
            history = take_turn(model, tokenizer, settings, history, line, system, chat_template_kwargs)


def read_message(multiline: bool) -> str:
    """One message: a line, or (``multiline``) the lines up to an empty one or Ctrl-D; a /command is
    always one line."""
    lines = [input(">> ")]
    while multiline and lines[-1].strip() and not lines[0].startswith("/"):
        try:
            lines.append(input(".. "))
        except EOFError:
            break
    return "\n".join(lines).strip()


def run_command(command: str, history: list[dict], start: list[dict], usage: str) -> list[dict]:
    """``/reset`` (the history back to ``start``), ``/save FILE``, ``/load FILE``, ``/help``, or a
    one-line note on an unknown command (or a file that cannot be written or read)."""
    name, _, path = command.partition(" ")
    path = path.strip()
    if name in ("/save", "/load") and not path:
        print(f"[{name} needs a file name: {name} FILE]", file=sys.stderr)
    elif name == "/save":
        save_history(history, path)
    elif name == "/load":
        return load_history(path, history)
    elif command == "/reset":
        print("(history cleared)", file=sys.stderr)
        return list(start)
    else:
        print(usage if command == "/help" else f"Unknown command {command}. {usage}", file=sys.stderr)
    return history


def save_history(history: list[dict], path: str) -> None:
    """Write the conversation to ``path`` as ``{"messages": [...]}`` (whole, or not at all)."""
    partial = Path(f"{path}.tmp-{os.getpid()}")
    try:
        partial.write_text(json.dumps({"messages": history}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        partial.replace(path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        print(f"[cannot write {path}: {error.strerror}]", file=sys.stderr)
        return
    print(f"(saved {len(history)} messages to {path})", file=sys.stderr)


def load_history(path: str, history: list[dict]) -> list[dict]:
    """The conversation ``/save`` wrote to ``path`` (or a list of messages), in place of ``history``;
    ``history`` itself when the file cannot be read or is not a conversation (the reason is printed)."""
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        print(f"[cannot read {path}: {getattr(error, 'strerror', None) or error}]", file=sys.stderr)
        return history
    messages = loaded.get("messages") if isinstance(loaded, dict) else loaded
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    ):
        print(f'[{path} is not a conversation: {{"messages": [{{"role", "content"}}, ...]}}]', file=sys.stderr)
        return history
    print(f"(loaded {len(messages)} messages from {path})", file=sys.stderr)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def take_turn(
    model, tokenizer, settings: DecodeSettings, history: list[dict], line: str, kept: int, variables: dict | None = None
) -> list[dict]:
    """Answer ``line`` after ``history`` (``variables``: the template's); return the history with both,
    or unchanged when the message does not fit or decoding failed (the reason is printed)."""
    try:
        turns = [*history, {"role": "user", "content": line}]
        ids, fitted = fitted_prompt(tokenizer, turns, kept, settings, variables)
    except PromptError as error:
        print(f"[{error}]", file=sys.stderr)
        return history
    reply = answer(model, tokenizer, Job("chat", ids, settings))
    return history if reply is None else [*fitted, {"role": "assistant", "content": reply}]


def fitted_prompt(
    tokenizer, history: list[dict], kept: int, settings: DecodeSettings, variables: dict | None = None
) -> tuple[list[int], list]:
    """The prompt ids and the history they encode: ``history`` less its oldest exchanges (never the
    first ``kept`` messages: the system one) until an answer has room under ``max_length``,
    ``min(max_new_tokens, max_length // 2)`` tokens. A last message that does not fit even alone is
    a :class:`PromptError`."""
    room = min(settings.max_new_tokens, settings.max_length // 2)
    fitted = list(history)

    def encoded() -> list[int]:
        return encode_prompt(tokenizer, {"messages": fitted, "chat_template_kwargs": variables}, use_chat_template=True)

    ids = encoded()
    while len(ids) + room > settings.max_length and len(fitted) > kept + 1:
        del fitted[kept : kept + 2]  # a user message and its answer
        ids = encoded()
    if len(ids) >= settings.max_length:
        raise PromptError(
            f"This message makes a prompt of {len(ids)} tokens, which leaves no room under "
            f"max_length={settings.max_length}: shorten it, or raise --model.max_length."
        )
    if len(fitted) < len(history):
        dropped = len(history) - len(fitted)
        print(f"(the {dropped} oldest messages no longer fit under max_length and were dropped)", file=sys.stderr)
    return ids, fitted


def answer(model, tokenizer, job: Job) -> str | None:
    """Print the answer as it is committed; Ctrl-C stops it at the next commit. Returns the text
    printed, or ``None`` when decoding failed (the error is printed).

    Ctrl-C only sets a flag that the engine reads at each commit (as a server's cancelled request):
    a ``KeyboardInterrupt`` raised at an arbitrary point of the queue and thread code that streams
    could leave a lock held and hang the answer."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    text, failed, final, started = "", False, {}, time.perf_counter()
    try:
        for (event,) in stream_jobs(model, tokenizer, [job], is_cancelled=lambda uid: bool(interrupted)):
            piece = event.get("text", "")
            print(piece, end="", flush=True)
            text += piece
            if "error" in event:
                failed = True
                print(f"\n[{event['error']}]", file=sys.stderr)
            final = event if "finish_reason" in event else final
    finally:
        signal.signal(signal.SIGINT, previous)
    print(" [stopped]" if interrupted else "")
    if final:
        print(statistics(final, time.perf_counter() - started, len(job.ids)), file=sys.stderr)
    return None if failed else text


def statistics(final: dict, seconds: float, prompt_tokens: int) -> str:
    """One line after each answer: tokens, speed, forwards, the prompt (and how much of it came from
    the prompt cache), and a cut at the length limit."""
    tokens, forwards, cached = final["completion_tokens"], final["forwards"], final["cached_tokens"]
    cut = ", cut at the length limit" if final["finish_reason"] == "length" else ""
    return (
        f"[{tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.1f} tok/s), {forwards} forwards "
        f"({tokens / max(forwards, 1):.2f} tokens/forward), prompt {prompt_tokens} tokens ({cached} cached){cut}]"
    )


def main(args: list[str]) -> None:
    """``dllm_lit chat [--config FILE] [--model.* ...] [--system TEXT]``."""
    parser = model_parser(
        "dllm_lit chat", "An interactive chat in the terminal, streaming block by block.", ANSWERING_DEFAULTS
    )
    add_function_flags(parser, chat)
    config = parser.parse_args(args)
    chat(*model_settings(config.model), **function_flags(config, chat))
