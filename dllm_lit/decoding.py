"""Block-parallel "EOS block + refine" decoding for Hugging Face causal LMs.

Pure PyTorch + transformers: no Lightning, no file I/O. :func:`generate_blocks` checks its inputs,
opens a :class:`~dllm_lit.ledger.RowLedger` and hands the batch to one of two loops with the same
signature:

* :func:`~dllm_lit.eager.decode_eager` (``backend="eager"``): a block of ``W = add_eos_length + 1``
  tokens is drafted in one pass over ``committed + [fill] * add_eos_length``; ``refine_iter - 1``
  passes feed ``committed + block[:-1]`` and replace the block, stopping early at a fixed point; the
  block is committed, each row stops on its own, stopped rows leave the batch;
* :func:`~dllm_lit.compiled.decode_static` (``"cuda_graph"``/``"inductor"``): the same algorithm
  with fixed shapes over a static cache, replayed as CUDA graphs on a GPU.

:func:`iterative_generate` is the original research script's call, keyword for keyword.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from dllm_lit.adapters import draft_gate
from dllm_lit.compiled import decode_static
from dllm_lit.eager import decode_eager
from dllm_lit.ledger import BlockGeneration, CommitListener, LogprobListener, RowLedger
from dllm_lit.logprobs import EXACT_IDS
from dllm_lit.lossless import decode_lossless
from dllm_lit.lossless_compiled import decode_lossless_static
from dllm_lit.prompt_cache import CachedStart, PromptCache, forget, model_prompt_cache
from dllm_lit.sampling import RowSampler
from dllm_lit.settings import DEFAULTS, DecodeSettings
from dllm_lit.textstream import StopStringWatch


def _as_id_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def check_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_ids: list[int],
    settings: DecodeSettings,
    vocab_size: int | None = None,
) -> None:
    """Reject inputs the engine cannot decode, with one sentence (before any model work)."""
    if not eos_ids:
        raise ValueError("eos_token_id is required: it is the fill token and the stop token.")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}.")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match "
            f"input_ids shape {tuple(input_ids.shape)}."
        )
    prompt_lengths = attention_mask.sum(1)
    if input_ids.numel() == 0 or bool((prompt_lengths == 0).any()):
        raise ValueError("Empty prompt: every row needs at least one token.")
    if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("Right padding is not supported: pad prompts on the left (tokenizer.padding_side = 'left').")
    if vocab_size is not None:
        check_vocabulary(input_ids, eos_ids, settings, vocab_size)
    longest = int(prompt_lengths.max())
    if longest >= settings.max_length:
        raise ValueError(
            f"A prompt has {longest} tokens, which leaves no room under max_length={settings.max_length}: "
            "raise max_length or shorten the prompt."
        )


def check_vocabulary(input_ids: torch.Tensor, eos_ids: list[int], settings: DecodeSettings, vocab_size: int) -> None:
    """Every stop, EOS, biased and input id (padding included) is one of the model's ``vocab_size`` ids."""
    if settings.logprobs is not None and not settings.logprobs <= vocab_size <= EXACT_IDS:
        raise ValueError(f"logprobs={settings.logprobs} needs a vocabulary of that many ids and at most 2**24.")
    outside = sorted(i for i in {*eos_ids, *settings.stop_token_ids} if not 0 <= i < vocab_size)
    if outside:
        raise ValueError(f"Stop or EOS token ids {outside} are outside the model's vocabulary (0..{vocab_size - 1}).")
    biased = sorted(i for i in settings.logit_bias or {} if i >= vocab_size)
    if biased:
        raise ValueError(f"logit_bias names token ids {biased}, outside the model's vocabulary (0..{vocab_size - 1}).")
    outside_ids = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if outside_ids.numel():
        raise ValueError(
            f"input_ids holds token id {int(outside_ids[0])}, outside the model's vocabulary "
            f"(0..{vocab_size - 1}): were the prompts encoded with another model's tokenizer?"
        )


UNUSED_DRAFTER = (
    "This model's draft adapter only drafts in lossless mode (--model.lossless true); in block mode it is off"
    " and the base model decodes alone (garbage with refine_iter < add_eos_length + 1 unless block-trained)."
)


@torch.inference_mode()
def generate_blocks(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    settings: DecodeSettings | None = None,
    *,
    eos_token_id: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    on_commit: CommitListener | None = None,
    on_logprobs: LogprobListener | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    row_seeds: Sequence[int | None] | None = None,
    row_max_new_tokens: Sequence[int] | None = None,
    row_guides: Sequence[dict[str, Any] | None] | None = None,
    row_predictions: Sequence[Sequence[int] | None] | None = None,
    prompt_cache: PromptCache | None = None,
    **overrides: Any,
) -> BlockGeneration:
    """Decode a left-padded batch block by block; return per-row tokens and call statistics.

    Args:
        model: A Hugging Face causal LM (anything returning ``.logits`` for ``input_ids``).
        input_ids: ``[batch, prompt_len]`` prompt ids, left-padded.
        settings: Decoding settings (:class:`~dllm_lit.settings.DecodeSettings`; default: its defaults).
        eos_token_id: EOS id (or ids). The first one is the fill token; all of them stop a row.
        attention_mask: ``[batch, prompt_len]``, 0 on left padding. Defaults to all ones.
        on_commit: Called with each row's newly kept tokens at every commit (block by block; once
            per pass in lossless mode, once at the end on its compiled path); returning True stops
            that row (:data:`~dllm_lit.ledger.CommitListener`). For streaming and cancellation.
        on_logprobs: With ``logprobs``: called before ``on_commit`` with the log-probabilities of
            the tokens a row just kept (:data:`~dllm_lit.ledger.LogprobListener`; before any
            stop-string cut, which the result's ``logprobs`` follow).
        tokenizer: Decodes the rows' text for ``stop_strings``, and compiles a ``guided_*`` grammar
            (needed only with them).
        streamer: A transformers streamer (``TextStreamer``, ``TextIteratorStreamer``) for one
            prompt, as ``generate(streamer=)`` takes: it gets the prompt, each commit's tokens, then
            ``end()``.
        row_seeds: When sampling, each row's seed (None: one from torch's global generator). Default:
            ``seed + r`` for row ``r`` with a ``seed`` setting. A token's draw depends only on its
            row's seed and its position in the answer, so a row samples the same answer in any batch.
        row_max_new_tokens: Each row's own ``max_new_tokens`` (default: the setting, for every row);
            with ``row_seeds``, rows of different requests share one batch (``serve``).
        row_guides: Each row's own structured output, in place of the settings' ``guided_*``: a dict
            such as ``{"guided_json": schema}`` (None: the settings'; ``{}``: unconstrained), so that
            requests with different grammars share one batch (``serve``).
        row_predictions: Each row's predicted answer, token ids (None: none), as OpenAI's Predicted
            Outputs take it: in lossless mode (every backend) the answer is drafted from it where it
            follows it, so an answer that repeats much of it (code being edited) takes fewer
            forwards; the answer itself does not change. Block mode does not read it.
        prompt_cache: A :class:`~dllm_lit.prompt_cache.PromptCache` to use in place of the one
            ``prompt_cache_mib`` keeps with the model: the K/V of the longest beginning every prompt
            shares with an earlier call's prompt are reused, not computed again, and these prompts'
            are stored for later calls (any backend; needs ``use_cache``). Each row's
            ``cached_tokens`` says how many it reused.
        **overrides: Any :class:`~dllm_lit.settings.DecodeSettings` field, e.g. ``refine_iter=3``,
            applied on top of ``settings``.
    """
    settings = (settings or DEFAULTS).replace(**overrides)
    eos_ids = _as_id_list(eos_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    check_inputs(input_ids, attention_mask, eos_ids, settings, vocab_size)
    if draft_gate(model) is not None and not settings.lossless and settings.width > 1:  # W = 1 drafts nothing
        warnings.warn(UNUSED_DRAFTER, stacklevel=3)  # the caller, past inference_mode's wrapper
    on_commit, watch = _listeners(on_commit, streamer, tokenizer, settings, input_ids)
    device = next(model.parameters()).device
    prompt_ids = input_ids.to(device)
    prompt_mask = attention_mask.to(device=device, dtype=torch.long)
    ledger = RowLedger(prompt_mask, settings, eos_ids, on_commit, on_logprobs, row_max_new_tokens)
    sampler = RowSampler(
        settings, prompt_ids, prompt_mask, row_seeds, ledger.stop_ids, tokenizer, vocab_size, row_guides
    )
    loops = {False: (decode_eager, decode_static), True: (decode_lossless, decode_lossless_static)}
    loop = loops[settings.lossless][settings.backend != "eager"]
    start = cached_start(model, settings, prompt_cache, prompt_ids, prompt_mask)
    ledger.cached_tokens = start.length if start is not None else 0
    extra = {}
    if row_predictions is not None and settings.lossless:
        if len(row_predictions) != prompt_ids.shape[0]:
            raise ValueError(f"row_predictions needs one prediction (or None) per prompt ({prompt_ids.shape[0]}).")
        if any(row_predictions):
            extra["predictions"] = [list(prediction) if prediction else None for prediction in row_predictions]
    # The model's GPU is the current one: graphs are captured, and host copies waited for, on its streams.
    current = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    try:
        with current:
            loop(model, prompt_ids, prompt_mask, settings, ledger, sampler, fill=eos_ids[0], start=start, **extra)
    except torch.OutOfMemoryError:
        forget(model)  # a retry (predict splits the batch) gets the kept prompts' memory back
        raise
    finally:
        if streamer is not None:
            streamer.end()  # a TextIteratorStreamer's reader must not wait forever on a failed call
    return watch.finish(ledger.result()) if watch else ledger.result()


def cached_start(model, settings: DecodeSettings, prompt_cache, prompt_ids, prompt_mask) -> CachedStart | None:
    """Where the prompt cache (``prompt_cache``, else the model's with ``prompt_cache_mib``) lets the
    loops start; None without one."""
    if prompt_cache is not None and not settings.use_cache:
        raise ValueError("prompt_cache needs use_cache: without a KV cache there is nothing to start from.")
    if prompt_cache is None and settings.prompt_cache_mib and settings.use_cache:
        prompt_cache = model_prompt_cache(model, settings.prompt_cache_mib)
    return prompt_cache.start(prompt_ids, prompt_mask) if prompt_cache is not None else None


def _listeners(on_commit, streamer, tokenizer, settings: DecodeSettings, input_ids: torch.Tensor):
    """The ledger's listener (the caller's, behind a streamer, behind the stop-string watch) and the watch."""
    if settings.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: generate_blocks(..., tokenizer=tokenizer).")
    if streamer is not None:
        on_commit = stream_to(streamer, input_ids, on_commit)
    if not settings.stop_strings:
        return on_commit, None
    watch = StopStringWatch(tokenizer, settings.stop_strings, input_ids.shape[0], on_commit)
    return watch, watch


def stream_to(streamer, input_ids: torch.Tensor, on_commit: CommitListener | None) -> CommitListener:
    """The listener that feeds a transformers streamer: the prompt now, then each commit's tokens."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"A streamer takes one prompt, as in transformers' generate; got {input_ids.shape[0]}: "
            "stream a batch with on_commit instead."
        )
    streamer.put(input_ids.cpu())

    def listen(row: int, new_ids: list[int], result) -> bool:
        if new_ids:
            streamer.put(torch.tensor(new_ids))
        return on_commit(row, new_ids, result) if on_commit is not None else False

    return listen


def iterative_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None,
    max_new_tokens: int = DEFAULTS.max_new_tokens,
    add_eos_length: int = DEFAULTS.add_eos_length,
    refine_iter: int = DEFAULTS.refine_iter,
    max_length: int = DEFAULTS.max_length,
    temperature: float = DEFAULTS.temperature,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.LongTensor:
    """The original script's call: return ``[batch, prompt_len + generated_len]`` ids.

    Each row is its (left-padded) prompt, its generated tokens, its stop token if it hit one,
    then ``pad_token_id`` (EOS when ``None``). Extra keyword arguments are
    :class:`~dllm_lit.settings.DecodeSettings` fields (``stop_token_ids``, ``top_k``, ``top_p``,
    ``seed``, ``use_cache``, ``backend``...).
    """
    result = generate_blocks(
        model,
        input_ids,
        eos_token_id=eos_token_id,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        add_eos_length=add_eos_length,
        refine_iter=refine_iter,
        max_length=max_length,
        temperature=temperature,
        **kwargs,
    )
    pad = _as_id_list(eos_token_id)[0] if pad_token_id is None else pad_token_id
    outputs = [row.ids_with_stop for row in result.rows]
    longest = max(len(o) for o in outputs)
    tail = torch.full((len(outputs), longest), pad, dtype=input_ids.dtype)
    for i, o in enumerate(outputs):
        tail[i, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)
