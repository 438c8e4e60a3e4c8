"""Prompt caching: the K/V of earlier prompts reused where a new prompt begins the same way.

With ``DecodeSettings.prompt_cache_mib`` the engine keeps one :class:`PromptCache` per model
(:func:`model_prompt_cache`; vLLM's automatic prefix caching, llama.cpp's ``cache_prompt``): a
chat's next turn begins with the conversation so far, and requests share a system prompt or
few-shot examples. It is emptied when the model's weights change (an optimizer step, a merge, a
move), and K/V computed under one of ``serve``'s LoRA adapters (:data:`ADAPTER`) serve that adapter
only. Per call, :meth:`PromptCache.start` finds the stored prompt that
shares the longest beginning with every row of the batch (at least one token of each row is still
fed) and returns a :class:`CachedStart`: the prompt rows with that beginning moved in front of their
left padding, and a ``DynamicCache`` that already holds its K/V. Positions count unpadded tokens, so a
row's positions, and so its answer, are those of a plain start. After the first forward the loop
calls :meth:`CachedStart.keep`, which stores each row's whole prompt for later calls; when a row
finishes every loop also stores its prompt and the answer tokens whose K/V it holds
(:meth:`CachedStart.keep_row`: the whole answer but its last token in lossless mode, all blocks but
the last in block mode), so a chat's next turn computes little more than the new message. Entries
are dropped least recently used first once they exceed ``max_bytes``; a prompt that extends a stored
one replaces it. The compiled path copies a reused beginning into its static cache
(:meth:`~dllm_lit.compiled.StaticForward.prefill`).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from transformers import DynamicCache

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [1, heads, tokens, dim]

FULL_ATTENTION = ("DynamicLayer", "RowSlotLayer")
"""Cache layers whose columns are every token's K/V (the eager loops' and the compiled path's)."""

ADAPTER = "dllm_lit_adapter"
"""The model attribute that names the LoRA adapter its forwards run now (``serve --lora_modules``)."""

_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights state, PromptCache)


def model_prompt_cache(model: torch.nn.Module, mib: float) -> PromptCache:
    """The :class:`PromptCache` kept with ``model`` (``mib`` MiB at most), emptied first if the
    model's weights changed since the last call (in place, as an optimizer step does, or moved)."""
    parameters = list(model.parameters())
    try:
        version = sum(p._version for p in parameters)
    except RuntimeError:  # weights made under inference_mode keep no version counter
        version = None
    state = (parameters[0].data_ptr(), version)
    known, cache = _CACHES.get(model, (None, None))
    if cache is None or known != state:
        held = weakref.ref(model)  # the cache must not keep its model alive
        cache = PromptCache(0, weights=lambda: getattr(held(), ADAPTER, None))
        _CACHES[model] = (state, cache)
    cache.max_bytes = int(mib * 2**20)
    return cache


def forget(model: torch.nn.Module) -> None:
    """Drop the prompt cache kept with ``model`` (its memory is wanted: the call ran out of it)."""
    _CACHES.pop(model, None)


class PromptCache:
    """Stored prompts' K/V, by their token ids, up to ``max_bytes`` in all (see the module docstring).
    ``weights`` names the weights the model runs now (``serve``'s LoRA adapter: K/V computed under
    one are reused under that one only; default: always the same). ``hits`` and ``reused_tokens``
    count the calls that reused a beginning and the prompt tokens they did not feed again."""

    def __init__(self, max_bytes: int, weights: Callable[[], str | None] = lambda: None):
        self.max_bytes, self.weights = max_bytes, weights
        self.entries: OrderedDict[tuple, KeyValues] = OrderedDict()  # (scope, tokens): least recently used first
        self.used_bytes = self.hits = self.reused_tokens = 0
        self.lock = threading.Lock()  # for callers that decode in several threads

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> CachedStart:
        """The batch's start: the longest stored beginning all rows share (none: a plain start)."""
        scope, rows = self.weights(), unpadded(prompt_ids, prompt_mask)
        most = min(map(len, rows)) - 1  # every row feeds at least its last token
        with self.lock:
            best, length = None, 0
            for key in self.entries:
                shared = min(common_length(key[1], row) for row in rows) if key[0] == scope else 0
                if min(shared, most) > length:
                    best, length = key, min(shared, most)
            if best is None:
                return CachedStart(self, scope, rows, prompt_ids, prompt_mask)
            self.entries.move_to_end(best)
            self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + length * len(rows)
            kept = [(k[:, :, :length], v[:, :, :length]) for k, v in self.entries[best]]
        size = len(rows)
        cache = DynamicCache(
            [(k.expand(size, -1, -1, -1).clone(), v.expand(size, -1, -1, -1).clone()) for k, v in kept]
        )
        ids, mask = prefix_first(prompt_ids, prompt_mask, length)
        return CachedStart(self, scope, rows, ids, mask, cache, length)

    def store(self, scope: str | None, tokens: list[int], key_values: KeyValues) -> None:
        """Keep one prompt's K/V (replacing stored prompts it extends), then drop the least recently
        used entries over ``max_bytes``. A prompt a stored one already extends is only refreshed."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in key_values)
        key = (scope, tuple(tokens))
        with self.lock:
            longer = next((stored for stored in self.entries if extends(stored, key)), None)
            if longer is not None:
                self.entries.move_to_end(longer)
                return
            if size > self.max_bytes:
                return
            for stored in [stored for stored in self.entries if extends(key, stored)]:
                self._drop(stored)
            self.entries[key] = key_values
            self.used_bytes += size
            while self.used_bytes > self.max_bytes:
                self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple) -> None:
        for k, v in self.entries.pop(key):
            self.used_bytes -= k.numel() * k.element_size() + v.numel() * v.element_size()


class CachedStart:
    """One call's start: ``ids``/``mask`` are the prompt rows with the reused beginning (``length``
    tokens, whose K/V ``cache`` holds for every row) moved in front; ``cache`` is None without one."""

    def __init__(self, store, scope, rows, ids, mask, cache: DynamicCache | None = None, length: int = 0):
        self.store, self.scope, self.rows, self.ids, self.mask = store, scope, rows, ids, mask
        self.cache, self.length = cache, length

    def keep(self, cache: DynamicCache) -> None:
        """Store every row's prompt from ``cache``, whose first columns are the K/V of ``ids``."""
        seen = set()
        for row, (tokens, mask) in enumerate(zip(self.rows, self.mask)):
            if tuple(tokens) not in seen:
                seen.add(tuple(tokens))
                self.keep_row(cache, row, mask.bool().nonzero().squeeze(1), tokens)

    def keep_row(self, cache: DynamicCache, row: int, columns: torch.Tensor, tokens: list[int]) -> None:
        """Store the K/V of cache row ``row``'s ``columns``: those of ``tokens`` (the first ones only,
        where fewer columns are given); a model whose cache is not plain full attention layers stores
        nothing."""
        if any(type(layer).__name__ not in FULL_ATTENTION for layer in cache.layers):
            return
        columns = columns[: len(tokens)]
        key_values = [
            (layer.keys[row : row + 1][:, :, columns], layer.values[row : row + 1][:, :, columns])
            for layer in cache.layers
        ]
        self.store.store(self.scope, tokens[: len(columns)], key_values)

    def keep_static_row(self, cache, position: int, row: int, answer: list[int], count: int) -> None:
        """Store row ``row``'s prompt and the first ``count`` tokens of its ``answer`` from batch
        ``position`` of a static cache (the prompts in the first slots as ``ids`` lays them out, answer
        token ``i`` in the slot after them plus ``i``)."""
        first = self.ids.shape[1]
        prompt = self.mask[row].bool().nonzero().squeeze(1)
        columns = torch.cat([prompt, torch.arange(first, first + count, device=prompt.device)])
        self.keep_row(cache, position, columns, self.rows[row] + answer[:count])


def extends(longer: tuple, shorter: tuple) -> bool:
    """Whether entry key ``longer`` (scope, tokens) begins with entry key ``shorter``."""
    return longer[0] == shorter[0] and longer[1][: len(shorter[1])] == shorter[1]


def common_length(first: tuple[int, ...], second: list[int]) -> int:
    """How many leading tokens the two sequences share."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def unpadded(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Each row's prompt tokens without its left padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]


def prefix_first(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each left-padded row with its first ``length`` tokens moved in front of its padding."""
    width, padding = prompt_ids.shape[1], (1 - prompt_mask).sum(1, keepdim=True)
    column = torch.arange(width, device=prompt_ids.device)[None, :]
    order = torch.where(
        column < length,
        padding + column,  # the first tokens
        torch.where(column < length + padding, column - length, column),  # then the padding, then the rest
    )
    return prompt_ids.gather(1, order), prompt_mask.gather(1, order)
