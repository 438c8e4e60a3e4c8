"""Block-parallel "EOS block + refine" decoding for Hugging Face causal LMs.

Pure PyTorch + transformers: no Lightning, no file I/O. Read top to bottom, the
loop in :func:`generate_blocks` is the algorithm:

* a block of ``width = add_eos_length + 1`` tokens is drafted in one forward pass
  over ``committed + [fill] * add_eos_length``;
* ``refine_iter - 1`` further passes feed ``committed + block[:-1]`` and replace the
  block with the new predictions, stopping early at a fixed point;
* the block is committed, each row stops on its own at a stop token or a length
  limit, and stopped rows leave the active batch.

With ``use_cache=True`` (the default) committed positions live in a prefix KV cache:
a pass feeds only the not-yet-cached committed tokens plus the block, and the cache
is cropped back to the committed length afterwards. ``compile=True`` runs the same algorithm
with fixed shapes over a static cache (:func:`_decode_static`, :mod:`dllm_lit.static`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dllm_lit.static import StaticForward

StopReason = Literal["eos", "max_new_tokens", "max_length"]


@dataclass
class RowResult:
    """What one prompt produced.

    Attributes:
        token_ids: Generated ids, without the prompt, padding or the stop token.
        stop_reason: ``"eos"`` (a stop token), ``"max_new_tokens"`` or ``"max_length"``.
        stop_token_id: The stop token that ended the row, or ``None``.
        forwards: Forward passes run while this row was in the active batch.
    """

    token_ids: list[int]
    stop_reason: StopReason
    stop_token_id: int | None
    forwards: int

    @property
    def num_generated(self) -> int:
        """Generated tokens, counting the stop token."""
        return len(self.token_ids) + (self.stop_token_id is not None)

    @property
    def tokens_per_forward(self) -> float:
        return self.num_generated / max(self.forwards, 1)


@dataclass
class BlockGeneration:
    """The result of one :func:`generate_blocks` call.

    Attributes:
        rows: One :class:`RowResult` per input row, in input order.
        forwards: Model forward passes for the whole batch.
        refine_passes_per_block: Refine passes (after the draft pass) each block used.
    """

    rows: list[RowResult]
    forwards: int = 0
    refine_passes_per_block: list[int] = field(default_factory=list)

    @property
    def blocks(self) -> int:
        return len(self.refine_passes_per_block)

    @property
    def generated_tokens(self) -> int:
        return sum(row.num_generated for row in self.rows)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens over all rows per forward pass of the batch."""
        return self.generated_tokens / max(self.forwards, 1)


def _as_id_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def check_settings(*, add_eos_length: int, refine_iter: int, max_new_tokens: int, max_length: int) -> None:
    """Reject impossible decoding settings with one sentence (before any model work)."""
    for name, value, least in (("refine_iter", refine_iter, 1), ("add_eos_length", add_eos_length, 0),
                               ("max_new_tokens", max_new_tokens, 1), ("max_length", max_length, 2)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}.")


def _check_arguments(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    eos_ids: list[int],
    max_new_tokens: int,
    add_eos_length: int,
    refine_iter: int,
    max_length: int,
) -> None:
    if not eos_ids:
        raise ValueError("eos_token_id is required: it is the fill token and the stop token.")
    check_settings(add_eos_length=add_eos_length, refine_iter=refine_iter, max_new_tokens=max_new_tokens,
                   max_length=max_length)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}.")
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
    longest = int(prompt_lengths.max())
    if longest >= max_length:
        raise ValueError(
            f"A prompt has {longest} tokens, which leaves no room under max_length={max_length}: "
            "raise max_length or shorten the prompt."
        )


def _model_accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _build_sampler(
    temperature: float, top_k: int | None, top_p: float | None, seed: int | None, device: torch.device
):
    """Return ``pick(logits [A, k, V]) -> ids [A, k]``: argmax, or transformers' warpers + sampling."""
    if temperature <= 0:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    generator = None  # None: torch's global generator (seeded by seed_everything under the CLI)
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        # The warpers used here read only the scores, never the ids.
        probs = torch.softmax(warpers(None, flat), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])

    return pick


def _first_stop_and_kept(block: torch.Tensor, stop_ids: torch.Tensor, room: torch.Tensor):
    """Per row: the position of the first stop token (or the width), and how many tokens the row
    keeps from this block (through that stop token, at most ``room``)."""
    width = block.shape[1]
    is_stop = torch.isin(block, stop_ids)
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), width)
    return first_stop, torch.minimum(first_stop + 1, room.clamp(max=width))


def _is_fixed_point(refined: torch.Tensor, block: torch.Tensor, stop_ids: torch.Tensor, room: torch.Tensor):
    """A device bool: the refine pass changed none of the tokens any row keeps. Only those (through
    each row's first stop token, within its room) must settle: by causality the tokens after them
    cannot change them, and are dropped."""
    _, kept = _first_stop_and_kept(refined, stop_ids, room)
    positions = torch.arange(block.shape[1], device=block.device)
    return ((refined == block) | (positions >= kept[:, None])).all()


@torch.inference_mode()
def generate_blocks(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    eos_token_id: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 1024,
    add_eos_length: int = 127,
    refine_iter: int = 2,
    max_length: int = 8192,
    stop_token_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    ignore_eos: bool = False,
    use_cache: bool = True,
    early_exit: bool = True,
    compile: bool | Literal["inductor"] = False,
) -> BlockGeneration:
    """Decode a left-padded batch block by block; return per-row tokens and call statistics.

    Args:
        model: A Hugging Face causal LM (anything returning ``.logits`` for ``input_ids``).
        input_ids: ``[batch, prompt_len]`` prompt ids, left-padded.
        eos_token_id: EOS id (or ids). The first one is the fill token; all of them stop a row.
        attention_mask: ``[batch, prompt_len]``, 0 on left padding. Defaults to all ones.
        max_new_tokens: At most this many generated tokens per row, the stop token included.
        add_eos_length: Fill tokens appended per block; the block width is ``add_eos_length + 1``.
        refine_iter: Forward passes per block (draft + refinements). ``>= add_eos_length + 1``
            gives exactly the greedy autoregressive output.
        max_length: At most this many tokens per row, prompt (without padding) included.
        stop_token_ids: Extra ids that end a row, like EOS.
        temperature: 0 for greedy (default, exact); above 0 samples.
        top_k: Keep only the k most likely tokens when sampling.
        top_p: Nucleus sampling threshold when sampling.
        seed: Seed of a private sampling generator; ``None`` samples from torch's global one.
        ignore_eos: EOS still fills blocks but no longer ends a row (``stop_token_ids`` still do);
            for benchmarks that need a fixed number of tokens.
        use_cache: Keep a prefix KV cache of committed tokens. ``False`` re-encodes the whole
            sequence each pass (the reference, and the fallback for models without a cache).
        early_exit: Stop refining a block once a pass leaves it unchanged. Never changes the
            tokens; turning it off is only for tests and benchmarks.
        compile: ``True``: decode with a static KV cache and fixed block shapes, each forward
            replayed as a CUDA graph on a GPU (the fast path there; on CPU it runs eagerly).
            ``"inductor"``: the same through ``torch.compile`` (fused kernels): faster still, after
            a compile of tens of seconds per batch size and width. Same greedy tokens in fp32.
    """
    eos_ids = _as_id_list(eos_token_id)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_arguments(
        input_ids,
        attention_mask,
        eos_ids=eos_ids,
        max_new_tokens=max_new_tokens,
        add_eos_length=add_eos_length,
        refine_iter=refine_iter,
        max_length=max_length,
    )
    if compile not in (False, True, "inductor"):
        raise ValueError(f"compile must be false, true or 'inductor', got {compile!r}.")
    if compile and not use_cache:
        raise ValueError("compile=True decodes with a static KV cache: it needs use_cache=True.")
    device = next(model.parameters()).device
    fill = eos_ids[0]
    stop_set = set(_as_id_list(list(stop_token_ids))) | (set() if ignore_eos else set(eos_ids))
    stop_ids = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    pick = _build_sampler(temperature, top_k, top_p, seed, device)
    keep_kwarg = _model_accepts(model, "logits_to_keep")
    batch = input_ids.shape[0]

    committed = input_ids.to(device)
    mask = attention_mask.to(device=device, dtype=torch.long)
    prompt_lengths = mask.sum(1)
    room_by_length = max_length - prompt_lengths
    budget = torch.clamp(room_by_length, max=max_new_tokens)  # generated tokens each row may add
    length_reason: list[StopReason] = [
        "max_new_tokens" if max_new_tokens <= int(r) else "max_length" for r in room_by_length
    ]
    active = torch.arange(batch, device=device)  # input row of each active row
    cache = DynamicCache() if use_cache else None
    cached = 0  # leading columns of `committed` whose K/V in `cache` are final
    generated = 0  # tokens committed so far by every active row
    width = add_eos_length + 1
    out = BlockGeneration(rows=[None] * batch)  # type: ignore[list-item]
    token_lists: list[list[int]] = [[] for _ in range(batch)]

    def commit(rows: list[int], block: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        """Append each row's kept tokens (up to its first stop token, within its room); record the
        rows that finish; return which did. The one device-to-host copy of a block."""
        first_stop, keep_len = _first_stop_and_kept(block, stop_ids, room)
        hit_stop = first_stop < keep_len
        finished = hit_stop | (room <= block.shape[1])
        keep_len = keep_len - hit_stop.long()  # the stop token is reported apart from the tokens
        for row, stop, done, n, ids in zip(rows, hit_stop.tolist(), finished.tolist(), keep_len.tolist(),
                                           block.tolist()):
            token_lists[row].extend(ids[:n])
            if done:
                out.rows[row] = RowResult(
                    token_ids=token_lists[row],
                    stop_reason="eos" if stop else length_reason[row],
                    stop_token_id=ids[n] if stop else None,
                    forwards=out.forwards,
                )
        return finished

    if compile:
        _decode_static(model, committed, mask, inductor=compile == "inductor", width=width, refine_iter=refine_iter,
                       budget=budget, fill=fill, stop_ids=stop_ids, pick=pick, early_exit=early_exit, out=out,
                       commit=commit)
        return out

    def forward(block_inputs: torch.Tensor, predict: int) -> torch.Tensor:
        """Run ``committed + block_inputs``; return logits of the last ``predict`` positions."""
        nonlocal cached
        start = cached if use_cache else 0
        if use_cache and cache.get_seq_length() > cached:
            cache.crop(cached - cache.get_seq_length())  # negative: drop the drafts
        tokens = torch.cat([committed[:, start:], block_inputs], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(block_inputs)], dim=1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)[:, start:]
        kwargs = {"logits_to_keep": predict} if keep_kwarg else {}
        logits = model(
            input_ids=tokens,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=use_cache,
            **kwargs,
        ).logits[:, -predict:]
        out.forwards += 1
        cached = committed.shape[1]  # the K/V of the block inputs are drafts, not final
        return logits

    while active.numel() > 0:
        # The last block shrinks to what the roomiest row may still add: by causality the
        # tokens before the cut are the same as with the full width.
        room = budget[active] - generated  # tokens each active row may still add
        block_width = min(width, int(room.max()))
        fill_block = torch.full((active.numel(), block_width - 1), fill, device=device, dtype=committed.dtype)
        block = pick(forward(fill_block, predict=block_width))
        refine_passes = 0
        fixed_point = False
        for _refine_pass in range(2, refine_iter + 1):
            if block_width == 1:
                break  # nothing to refine: the only token depends on committed tokens alone
            refined = block.clone()
            refined[:, 1:] = pick(forward(block[:, :-1], predict=block_width - 1))
            refine_passes += 1
            fixed_point = bool(_is_fixed_point(refined, block, stop_ids, room))
            block = refined
            if fixed_point and early_exit:
                break
        if fixed_point:
            # The last pass fed exactly block[:-1], so the K/V it cached are final.
            cached = committed.shape[1] + block_width - 1
        out.refine_passes_per_block.append(refine_passes)

        finished = commit(active.tolist(), block, room)
        committed = torch.cat([committed, block], dim=1)
        mask = torch.cat([mask, torch.ones_like(block)], dim=1)
        generated += block_width

        if bool(finished.any()):
            still = (~finished).nonzero().squeeze(1)
            active, committed, mask = active[still], committed[still], mask[still]
            if cache is not None and still.numel() > 0:
                cache.batch_select_indices(still)
    return out


def _decode_static(model, prompt_ids, prompt_mask, *, inductor, width, refine_iter, budget, fill, stop_ids, pick,
                   early_exit, out, commit) -> None:
    """The compiled path: every pass has one of three fixed shapes over a static cache.

    All rows stay in the batch until the last one finishes (finished rows have no room, so they
    never block a fixed point). Inside a block the host never waits on the GPU: the fixed-point
    test runs on device and freezes the block, and on CUDA the host reads the flag one pass late,
    so a block that settles costs at most one extra pass. The block is read once, at its commit.
    """
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    budgets = budget.tolist()
    blocks = -(-max(budgets) // width)
    cache_len = -(-(prompt_len + blocks * width) // 64) * 64  # round up: reuse graphs across calls
    forward = StaticForward.for_model(model, batch, cache_len, inductor)
    forward.reset(prompt_mask)
    fills = torch.full((batch, width - 1), fill, dtype=prompt_ids.dtype, device=device)
    alive = list(range(batch))
    alive_mask = torch.ones(batch, dtype=torch.bool, device=device)
    lag = device.type == "cuda"
    block, settled = None, False
    for index in range(blocks):
        start = prompt_len + index * width  # cache slot of the block's first token
        room = torch.where(alive_mask, budget - index * width, 0)
        if block is None:  # the prefill: prompt + fills, run eagerly (its width varies per call)
            logits = forward(torch.cat([prompt_ids, fills], 1), 0, width, graph=False)
        elif settled:  # the last pass fed exactly block[:-1]: its K/V are final
            logits = forward(torch.cat([block[:, -1:], fills], 1), start - 1, width)
        else:  # re-feed the whole committed block
            logits = forward(torch.cat([block, fills], 1), start - width, width)
        block = pick(logits)
        out.forwards += 1
        frozen = torch.zeros((), dtype=torch.bool, device=device)
        passes, pending = 0, None
        # As in the eager loop, a block whose rows may add one more token at most has nothing to
        # refine: that token depends on committed tokens alone.
        most_room = max(budgets[row] for row in alive) - index * width
        for _refine_pass in range(2, refine_iter + 1):
            if min(width, most_room) == 1:
                break
            refined = torch.cat([block[:, :1], pick(forward(block[:, :-1], start, width - 1))], 1)
            out.forwards += 1
            passes += 1
            fixed = _is_fixed_point(refined, block, stop_ids, room)
            block = torch.where(frozen, block, refined)
            frozen |= fixed
            if not early_exit:
                continue
            if not lag:
                if bool(frozen):
                    break
            elif pending is not None and pending.query_and_read():
                break
            else:
                pending = _HostFlag(frozen)
        out.refine_passes_per_block.append(passes)
        settled = passes > 0 and bool(frozen)
        rows = torch.tensor(alive, device=device)
        finished = commit(alive, block[rows], room[rows]).tolist()
        for row, done in zip(list(alive), finished):
            if done:
                alive.remove(row)
                alive_mask[row] = False
        if not alive:
            return


class _HostFlag:
    """A device bool copied to pinned host memory without waiting; read once its copy is done."""

    def __init__(self, flag: torch.Tensor):
        self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.host.copy_(flag, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def query_and_read(self) -> bool:
        """Wait for the copy (queued one pass ago, so the GPU stays busy) and return the flag."""
        self.done.synchronize()
        return bool(self.host)


def iterative_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None,
    max_new_tokens: int = 1024,
    add_eos_length: int = 127,
    refine_iter: int = 2,
    max_length: int = 8192,
    temperature: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.LongTensor:
    """The seed's call: return ``[batch, prompt_len + generated_len]`` ids.

    Each row is its (left-padded) prompt, its generated tokens, its stop token if it hit one,
    then ``pad_token_id`` (EOS when ``None``). Extra keyword arguments go to
    :func:`generate_blocks` (``stop_token_ids``, ``top_k``, ``top_p``, ``seed``, ``use_cache``).
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
    outputs = [row.token_ids + ([row.stop_token_id] if row.stop_token_id is not None else []) for row in result.rows]
    longest = max(len(o) for o in outputs)
    tail = torch.full((len(outputs), longest), pad, dtype=input_ids.dtype)
    for i, o in enumerate(outputs):
        tail[i, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)
