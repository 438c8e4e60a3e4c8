"""Decoding requests as streams of text events, block by block (for ``serve`` and ``chat``).

:func:`stream_jobs` decodes a list of :class:`Job` with the engine and yields, after each commit,
one event per job: ``{}`` (nothing new), ``{"text": delta}``, and a last event that adds
``finish_reason``, ``completion_tokens``, ``forwards``, ``cached_tokens`` (prompt tokens read from
the prompt cache), ``accepted_prediction_tokens`` and ``rejected_prediction_tokens`` (of a job with a
``prediction``: :func:`prediction_tokens`) and, for a job with an ``arrival``, ``queued`` (seconds
until its batch began), or ``{"error": message}`` if decoding failed. With ``settings.logprobs`` an
event also carries ``"logprobs"``: one :class:`~dllm_lit.logprobs.TokenLogprob` per token committed
since the last event (through the stop string at most; they may run ahead of the text, which holds
back partial characters), and an ``echo`` job's first event ``"prompt_logprobs"``, its prompt's
(:func:`~dllm_lit.logprobs.prompt_logprobs`). Jobs whose settings differ at most in ``seed``,
``max_new_tokens`` and their ``guided_*`` grammar decode as one batch, each row with its own (a row's
answer does not depend on its batch, sampled ones included); groups with other differences (or
another LoRA adapter) run one after the other. The engine runs in a helper thread and reports each
commit through ``generate_blocks(on_commit=...)``; a job whose text reached a stop string, or whose
client went away (``is_cancelled``), is stopped there and leaves the batch.
"""

from __future__ import annotations

import difflib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from dllm_lit.data import encode_prompt, left_pad
from dllm_lit.decoding import generate_blocks
from dllm_lit.ledger import RowResult
from dllm_lit.logprobs import TokenLogprob, prompt_logprobs
from dllm_lit.openai_api import finish_reason
from dllm_lit.settings import GUIDED, DecodeSettings
from dllm_lit.textstream import TextStream


@dataclass
class Job:
    """One prompt to decode: its token ids, settings and stop strings; ``uid`` names it for cancelling;
    ``echo`` (with ``settings.logprobs``): a first event with the prompt's logprobs;
    ``special_tokens``: keep them in the text (a tool-call parser reads its tags); ``adapter``: the LoRA
    adapter to decode with (``serve --lora_modules``; None: the model itself); ``arrival``: when the
    request came (``time.time()``), for the last event's ``queued`` seconds (serve's metrics);
    ``prompt_only``: decode nothing (an ``echo`` with ``max_tokens`` 0: the prompt's logprobs alone);
    ``prediction``: the answer's expected tokens (Predicted Outputs: drafted from in lossless mode)."""

    uid: str
    ids: list[int]
    settings: DecodeSettings
    stop: list[str] = field(default_factory=list)
    echo: bool = False
    special_tokens: bool = False
    adapter: str | None = None
    arrival: float | None = None
    prompt_only: bool = False
    prediction: list[int] | None = None


def stream_jobs(
    model: torch.nn.Module,
    tokenizer,
    jobs: list[Job],
    is_cancelled: Callable[[str], bool] = lambda uid: False,
    use_adapter: Callable[[str | None], None] | None = None,
) -> Iterator[list[dict]]:
    """Per step, one event per job (see the module docstring); ``use_adapter`` switches the model to a
    group's LoRA adapter (:class:`~dllm_lit.adapters.AdapterSwitch`) before it decodes."""
    groups: dict[tuple[DecodeSettings, str | None, bool], list[int]] = {}
    for index, job in enumerate(jobs):
        shared = job.settings.replace(seed=None, max_new_tokens=1, **dict.fromkeys(GUIDED))
        groups.setdefault((shared, job.adapter, job.prompt_only), []).append(index)
    for (settings, adapter, _), members in groups.items():
        if use_adapter is not None:
            use_adapter(adapter)
        for events in _stream_group(model, tokenizer, [jobs[i] for i in members], settings, is_cancelled):
            merged = [{} for _ in jobs]
            for position, event in events.items():
                merged[members[position]] = event
            yield merged


def warm_up(model: torch.nn.Module, tokenizer, settings: DecodeSettings, rows: int) -> None:
    """On a compiled backend, decode a short prompt, then one 70 tokens longer (beside the short one if
    ``rows`` is 2), with ``settings``: it compiles (inductor: tens of seconds each, for one row, a longer
    cache and more rows) or captures its passes now, not in the first request or message. Eager: nothing."""
    if settings.backend == "eager":
        return
    hello = [{"role": "user", "content": "Hello"}]
    short = encode_prompt(tokenizer, {"messages": hello} if tokenizer.chat_template else {"prompt": "Hello"}, False)
    longer = (short * 71)[: len(short) + 70]
    for prompts in ([short], [longer, short][:rows]):
        for _ in stream_jobs(model, tokenizer, [Job(f"warm-up-{n}", ids, settings) for n, ids in enumerate(prompts)]):
            pass


def _stream_group(model, tokenizer, jobs: list[Job], settings: DecodeSettings, is_cancelled) -> Iterator[dict]:
    """Events ``{position in jobs: event}`` for one batch of jobs with the same ``settings`` (their
    seeds, ``max_new_tokens`` and grammars aside)."""
    texts = [TextStream(tokenizer, [*job.stop, *settings.stop_strings], not job.special_tokens) for job in jobs]
    commits: queue.Queue = queue.Queue()
    scored: list[list[TokenLogprob]] = [[] for _ in jobs]  # each row's logprobs of its next commit

    abandoned = threading.Event()  # the consumer left (Ctrl-C, closed generator): stop every row

    def on_logprobs(row: int, new: list[TokenLogprob]) -> None:
        scored[row] = new

    def on_commit(row: int, new_ids: list[int], result: RowResult | None) -> bool:
        new, scored[row] = scored[row], []
        commits.put((row, texts[row].add(new_ids), result, new))
        return texts[row].stopped or abandoned.is_set() or is_cancelled(jobs[row].uid)

    started = time.time()  # the jobs leave the queue
    if settings.logprobs is not None and any(job.echo for job in jobs):
        yield {
            row: {"text": "", "prompt_logprobs": prompt_logprobs(model, job.ids, settings.logprobs)}
            for row, job in enumerate(jobs)
            if job.echo
        }
    if jobs[0].prompt_only:  # nothing to decode: each job ends at once
        yield {row: {"text": "", **ending(job, started, "length", [], 0, 0)} for row, job in enumerate(jobs)}
        return
    failure: list[BaseException] = []
    listeners = (on_commit, on_logprobs)
    worker = threading.Thread(target=_decode, args=(model, tokenizer, jobs, settings, listeners, failure, commits))
    worker.start()
    try:
        yield from _events(jobs, texts, commits, failure, started)
    finally:
        abandoned.set()
        worker.join()


def _events(jobs: list[Job], texts: list[TextStream], commits: queue.Queue, failure: list, started: float):
    """Merge the queued commits into one event per row, until every row has finished (``started``:
    when decoding began, for each job's ``queued`` seconds)."""
    open_rows = set(range(len(jobs)))
    sent = [0] * len(jobs)  # logprobs sent per row
    while open_rows:
        item = commits.get()
        if item is None:  # the decoding thread ended before every row finished
            yield {
                row: {"error": f"Decoding failed: {failure[0] if failure else 'unknown error'}"} for row in open_rows
            }
            break
        events = {}
        while item is not None:
            row, delta, result, logprobs = item
            event = events.setdefault(row, {"text": ""})
            event["text"] += delta
            if logprobs:
                if texts[row].stopped:  # none past the stop string
                    logprobs = logprobs[: max(0, texts[row].tokens_through_stop() - sent[row])]
                event.setdefault("logprobs", []).extend(logprobs)
                sent[row] += len(logprobs)
            if result is not None:
                event["text"] += texts[row].finish()
                reason = "stop" if texts[row].stopped else finish_reason(result.stop_reason)
                tokens = texts[row].tokens_through_stop() if texts[row].stopped else result.num_generated
                answer = result.ids_with_stop[:tokens]
                event.update(ending(jobs[row], started, reason, answer, result.forwards, result.cached_tokens))
                open_rows.discard(row)
            item = _next_nowait(commits)
        yield events


def _next_nowait(commits: queue.Queue):
    """The next queued commit, or ``None`` when none is waiting (put back the end marker)."""
    try:
        item = commits.get_nowait()
    except queue.Empty:
        return None
    if item is None:
        commits.put(None)
    return item


def _decode(model, tokenizer, jobs, settings, listeners, failure: list, commits: queue.Queue) -> None:
    """Run the engine on the group's left-padded prompts; always end with the ``None`` marker."""
    try:
        ids, mask = left_pad([job.ids for job in jobs], tokenizer.pad_token_id)  # load_tokenizer sets a pad id
        # The rows' own TextStreams (on_commit) watch the settings' stop strings with the jobs': the
        # engine need not decode every commit a second time for them.
        limits = [job.settings.max_new_tokens for job in jobs]
        engine = settings.replace(stop_strings=(), max_new_tokens=max(limits))
        on_commit, on_logprobs = listeners
        generate_blocks(
            model,
            ids,
            engine,
            attention_mask=mask,
            eos_token_id=tokenizer.eos_token_id,
            on_commit=on_commit,
            on_logprobs=on_logprobs,
            tokenizer=tokenizer,  # a guided_* grammar reads it
            row_seeds=[job.settings.seed for job in jobs],
            row_max_new_tokens=limits,
            row_guides=[own_guide(job.settings) for job in jobs],
            row_predictions=[job.prediction for job in jobs],
        )
    except Exception as error:  # reported to the jobs' clients as a 500, the server keeps serving
        failure.append(error)
    finally:
        commits.put(None)


def ending(job: Job, started: float, reason: str, answer: list[int], forwards: int, cached: int) -> dict:
    """What a job's last event adds (``answer``: its completion's ids; ``started``: when its batch
    began, for ``queued``)."""
    accepted, rejected = prediction_tokens(job.prediction, answer)
    end = {"finish_reason": reason, "completion_tokens": len(answer), "forwards": forwards, "cached_tokens": cached}
    end |= {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": rejected}
    return end | ({"queued": max(0.0, started - job.arrival)} if job.arrival is not None else {})


EXACT_DIFF = 1 << 20  # past this many (prediction x answer) token pairs the diff skips popular tokens


def prediction_tokens(prediction: list[int] | None, answer: list[int]) -> tuple[int, int]:
    """OpenAI's accepted and rejected prediction tokens: the predicted tokens that the answer repeats
    (in order, as a diff matches them) and the rest; ``(0, 0)`` without a prediction. The common
    beginning and end count at once; a long middle is diffed with difflib's ``autojunk`` (fast; it
    may count fewer), the count being an estimate there as OpenAI's is."""
    if not prediction:
        return 0, 0
    head = len(os.path.commonprefix([prediction, answer]))
    rest = min(len(prediction), len(answer)) - head
    tail = len(os.path.commonprefix([prediction[::-1][:rest], answer[::-1][:rest]]))
    middle = prediction[head : len(prediction) - tail], answer[head : len(answer) - tail]
    matcher = difflib.SequenceMatcher(None, *middle, autojunk=len(middle[0]) * len(middle[1]) > EXACT_DIFF)
    accepted = head + tail + sum(block.size for block in matcher.get_matching_blocks())
    return accepted, len(prediction) - accepted


def own_guide(settings: DecodeSettings) -> dict:
    """The ``guided_*`` setting of a job (``{}``: none), as ``generate_blocks(row_guides=)`` takes it."""
    return {name: getattr(settings, name) for name in GUIDED if getattr(settings, name) is not None}
