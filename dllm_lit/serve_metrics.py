"""Prometheus metrics of ``dllm_lit serve`` (``GET /metrics``), counted in the HTTP process.

Named as vLLM names its own, with the ``dllm_lit:`` prefix, and counted per choice (a request with
``n`` choices or a list of prompts is that many): choices in flight, finished by their decoding's
finish reason or failed (``error``, ``cancelled``: the client went away), prompt and generated tokens
(the sums of the responses' ``usage``), prompt tokens read from the prompt cache (vLLM's
``prefix_cache_hits``; each prompt once, as ``usage`` counts them), forward passes (tokens per forward is
``generation_tokens_total / forwards_total``), Predicted Outputs' accepted and rejected tokens, time
to the first token, time in the queue (from the request's arrival to its batch's start in the
worker) and end-to-end latency, and requests refused with an error status before decoding.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
"""Seconds; vLLM's time-to-first-token buckets run from 1 ms to 2,560 s, ours from 10 ms to 640 s."""


class ServeMetrics:
    """The server's counters, in a registry of their own (one per server, however many in a process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        disable_created_metrics()  # no *_created series beside each counter, as vLLM's
        self.registry = registry = CollectorRegistry()
        self.in_flight = Gauge("dllm_lit:num_requests_in_flight", "Choices queued or decoding.", registry=registry)
        self.success = Counter(
            "dllm_lit:request_success", "Choices finished, by finish reason.", ["finished_reason"], registry=registry
        )
        self.failure = Counter(
            "dllm_lit:request_failure",
            "Choices ended without an answer: error (decoding failed) or cancelled (the client went away).",
            ["reason"],
            registry=registry,
        )
        self.refused = Counter(
            "dllm_lit:request_refused",
            "Requests answered with an error status before decoding.",
            ["status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "dllm_lit:prompt_tokens", "Prompt tokens (as usage counts them).", registry=registry
        )
        self.cached_tokens = Counter(
            "dllm_lit:prefix_cache_hits",
            "Prompt tokens read from the prompt cache, not computed again (of prompt_tokens).",
            registry=registry,
        )
        self.generation_tokens = Counter("dllm_lit:generation_tokens", "Tokens generated.", registry=registry)
        self.forwards = Counter("dllm_lit:forwards", "Forward passes of the finished choices.", registry=registry)
        self.prediction_tokens = Counter(
            "dllm_lit:prediction_tokens",
            "Predicted Outputs' tokens, accepted (the answer repeats them) or rejected (as usage counts them).",
            ["kind"],
            registry=registry,
        )
        self.first_token = Histogram(
            "dllm_lit:time_to_first_token_seconds",
            "Seconds from a request's arrival to its choice's first committed text.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queued = Histogram(
            "dllm_lit:request_queue_time_seconds",
            "Seconds from a request's arrival to the start of its choice's batch in the model worker.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "dllm_lit:e2e_request_latency_seconds",
            "Seconds from a request's arrival to its choice's last token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def text(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


class RequestMeter:
    """One request's choices as they run: each ends once, as finished, failed or cancelled."""

    def __init__(self, metrics: ServeMetrics, choices: int, prompt_tokens: int, choices_per_prompt: int = 1):
        self.metrics, self.start, self.per_prompt = metrics, time.monotonic(), choices_per_prompt
        self.open, self.silent = set(range(choices)), set(range(choices))  # not ended; no text yet
        metrics.in_flight.inc(choices)
        metrics.prompt_tokens.inc(prompt_tokens)

    async def watch(self, events: AsyncIterator[tuple[int, dict]]) -> AsyncIterator[tuple[int, dict]]:
        """``events`` unchanged, counted as they pass."""
        async for index, event in events:
            self.saw(index, event)
            yield index, event

    def saw(self, index: int, event: dict) -> None:
        if index not in self.open:
            return
        seconds = time.monotonic() - self.start
        if index in self.silent and (event.get("text") or "finish_reason" in event):
            self.silent.discard(index)
            self.metrics.first_token.observe(seconds)
        if "error" in event:
            self._end(index).failure.labels("error").inc()
        elif "finish_reason" in event:
            metrics = self._end(index)
            metrics.success.labels(event["finish_reason"]).inc()
            metrics.generation_tokens.inc(event["completion_tokens"])
            metrics.cached_tokens.inc(event["cached_tokens"] / self.per_prompt)
            metrics.forwards.inc(event["forwards"])
            for kind in ("accepted", "rejected"):
                metrics.prediction_tokens.labels(kind).inc(event[f"{kind}_prediction_tokens"])
            metrics.latency.observe(seconds)
            if "queued" in event:
                metrics.queued.observe(event["queued"])

    def cancelled(self, indices: Iterable[int]) -> None:
        """These choices will not be answered (the client went away, or another choice failed)."""
        for index in set(indices) & self.open:
            self._end(index).failure.labels("cancelled").inc()

    def _end(self, index: int) -> ServeMetrics:
        self.open.discard(index)
        self.metrics.in_flight.dec()
        return self.metrics
