"""An lm-evaluation-harness model backed by the block engine, registered as ``dllm_lit``.

:class:`DllmLM` subclasses lm-eval's ``HFLM`` over an already loaded model: ``loglikelihood`` and
``loglikelihood_rolling`` are HFLM's (one forward per request batch, its tokenization of context and
continuation), and ``generate_until`` decodes with :func:`~dllm_lit.streaming.stream_jobs`: prompts
encoded as ``predict`` encodes them, the block engine with every ``--model.*`` setting, batches of
``batch_size`` longest first, each row stopped at the first of the task's stop sequences (cut there,
as lm-eval's own post-processing does). Decoding statistics are kept per task in :attr:`stats`.

Needs the ``eval`` extra: ``pip install dllm-lit[eval]``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from dllm_lit.answer_log import AnswerLog
from dllm_lit.data import encode_prompt
from dllm_lit.models import load_model, load_tokenizer, resolve_device, resolve_dtype
from dllm_lit.progress import counter
from dllm_lit.settings import DecodeSettings
from dllm_lit.streaming import Job, stream_jobs


@register_model("dllm_lit")
class DllmLM(HFLM):
    """lm-eval's view of a dllm_lit model.

    Args:
        pretrained: What ``--model.model_name_or_path`` takes (an HF directory, a GGUF file, ``smollm2``).
        trust_remote_code: Run the model directory's Python code (off by default).
        batch_size: Requests decoded (or scored) together.
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), ``float32``, ``bfloat16``, ``float16``.
        chat_template: A chat template in place of the tokenizer's (a Jinja file or the template).
        **decoding: :class:`~dllm_lit.settings.DecodeSettings` fields (``add_eos_length``, ``lossless``...).
    """

    def __init__(
        self,
        pretrained: str = "smollm2",
        trust_remote_code: bool = False,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        chat_template: str | None = None,
        **decoding: Any,
    ):
        self.settings = DecodeSettings(**decoding)
        device = resolve_device(device)
        tokenizer = load_tokenizer(pretrained, trust_remote_code=trust_remote_code, chat_template=chat_template)
        model = load_model(pretrained, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code)
        super().__init__(pretrained=model.to(device), tokenizer=tokenizer, batch_size=int(batch_size))
        self.log: AnswerLog | None = None  # an evaluation run's answers (keep_answers)
        if torch.distributed.is_initialized():  # torchrun: lm-eval gives each rank its share of the requests
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.stats: dict[str, dict[str, float]] = defaultdict(
            lambda: {
                "requests": 0,
                "prompt_tokens": 0,
                "cached_prompt_tokens": 0,
                "generated_tokens": 0,
                "forwards": 0,
                "seconds": 0.0,
            }
        )

    def keep_answers(self, log: AnswerLog) -> None:
        """Keep every answer in ``log`` as it comes, and take the answers it holds from there."""
        self.log = log
        self.set_cache_hook(log)

    def _answered(self, kind: str, requests: list, ask: Callable[[list], list]) -> list:
        # HFLM's rolling scores gather across ranks: every rank computes them all, none from the log
        if self.log is None or (kind == "loglikelihood_rolling" and self.world_size > 1):
            return ask(requests)
        return self.log.answered(kind, requests, ask)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor``, concatenated (a scalar's: stacked), as lm-eval asks."""
        if self.world_size <= 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """HFLM's (an answer the log holds is not computed again)."""
        return self._answered("loglikelihood", requests, lambda rest: HFLM.loglikelihood(self, rest, disable_tqdm))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """HFLM's (an answer the log holds is not computed again)."""
        return self._answered(
            "loglikelihood_rolling", requests, lambda rest: HFLM.loglikelihood_rolling(self, rest, disable_tqdm)
        )

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) block decoding until a stop sequence, per request (an
        answer the log holds is not decoded again)."""
        return self._answered("generate_until", requests, lambda rest: self._generate_until(rest, disable_tqdm))

    def _generate_until(self, requests: list, disable_tqdm: bool) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        answers: list[str] = [""] * len(requests)
        bar = counter(
            len(requests), desc="generate_until (dllm_lit)", unit="request", disable=disable_tqdm or self.rank != 0
        )
        for indices in groups.values():
            settings, until = self._settings_for(requests[indices[0]].args[1])
            ids = {i: encode_prompt(self.tokenizer, {"prompt": requests[i].args[0]}, False) for i in indices}
            ordered = sorted(indices, key=lambda i: -len(ids[i]))
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start : start + self.batch_size]
                jobs = [Job(str(i), ids[i], settings, until) for i in batch]
                for i, job, (text, final, seconds) in zip(batch, jobs, self._decode(jobs)):
                    answers[i] = postprocess_generated_text(text, until, None)
                    self._record(requests[i], len(job.ids), final, seconds)
                    self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
                bar.update(len(batch))
        bar.close()
        return answers

    def _settings_for(self, gen_kwargs: dict) -> tuple[DecodeSettings, list[str]]:
        """The engine settings and stop sequences of one set of task generation arguments."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode(self.eot_token_id))
        sampling = {"temperature": float(kwargs.get("temperature", 0.0))} if kwargs.get("do_sample") else {}
        for name, kind in (("top_p", float), ("top_k", int), ("min_p", float)):
            if kwargs.get(name) is not None and sampling:
                sampling[name] = kind(kwargs[name])
        if kwargs.get("repetition_penalty") is not None:  # as transformers' generate reads it, greedy too
            sampling["repetition_penalty"] = float(kwargs["repetition_penalty"])
        return self.settings.replace(max_new_tokens=int(kwargs["max_gen_toks"]), **sampling), until

    def _decode(self, jobs: list[Job]) -> list[tuple[str, dict, float]]:
        """``(text, final event, share of the batch's seconds)`` per job."""
        texts, finals = [""] * len(jobs), [{}] * len(jobs)
        start = time.perf_counter()
        for events in stream_jobs(self.model, self.tokenizer, jobs):
            for position, event in enumerate(events):
                if "error" in event:
                    raise RuntimeError(event["error"])
                texts[position] += event.get("text", "")
                if "finish_reason" in event:
                    finals[position] = event
        seconds = time.perf_counter() - start
        tokens = sum(final["completion_tokens"] for final in finals) or 1
        return [(t, f, seconds * f["completion_tokens"] / tokens) for t, f in zip(texts, finals)]

    def _record(self, request, prompt_tokens: int, final: dict, seconds: float) -> None:
        stats = self.stats[getattr(request, "task_name", None) or "all"]
        stats["requests"] += 1
        stats["prompt_tokens"] += prompt_tokens
        stats["cached_prompt_tokens"] += final["cached_tokens"]
        stats["generated_tokens"] += final["completion_tokens"]
        stats["forwards"] += final["forwards"]
        stats["seconds"] += seconds

    def decoding_statistics(self) -> dict[str, dict[str, float]] | None:
        """Per task: requests, prompt tokens (and those read from the prompt cache), generated tokens,
        forwards, tokens per forward, seconds, tok/s; of every rank (summed, the seconds of the
        slowest), on rank 0 (the others: None)."""
        ranks = self.gather_object(dict(self.stats))
        if ranks is None:
            return None
        merged: dict[str, dict[str, float]] = {}
        for task, stats in (item for rank in ranks for item in rank.items()):
            if task not in merged:
                merged[task] = dict(stats)
                continue
            for name, value in stats.items():
                merged[task][name] = max(merged[task][name], value) if name == "seconds" else merged[task][name] + value
        table = {}
        for task, stats in sorted(merged.items()):
            table[task] = {
                **stats,
                "tokens_per_forward": round(stats["generated_tokens"] / max(stats["forwards"], 1), 4),
                "tokens_per_second": round(stats["generated_tokens"] / max(stats["seconds"], 1e-9), 2),
                "seconds": round(stats["seconds"], 3),
            }
        return table
