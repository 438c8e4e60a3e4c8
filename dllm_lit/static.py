"""Fixed-shape forward passes over a preallocated KV cache, replayed as CUDA graphs on a GPU.

The compiled decoding path (``generate_blocks(..., compile=True)``) feeds the model only a few
input widths (block refine, block draft, and the one-off prompt prefill), always writing K/V at
explicit cache slots. Each pass may overwrite the slots of draft tokens: a slot is only ever read
by queries at later or equal slots, and every pass writes a contiguous run starting at the first
slot whose K/V are not final, so stale or garbage entries beyond it are never seen.

On CUDA each width is captured once as a ``torch.cuda.CUDAGraph`` (the attention mask, positions
and cache offset are computed inside the graph from a zero-dimensional ``start`` tensor), so a pass is
one graph launch instead of hundreds of kernel launches. On CPU the same program runs eagerly.
With ``inductor=True`` the fixed-shape forwards go through ``torch.compile`` instead (fused
elementwise kernels, and CUDA graphs through ``mode="reduce-overhead"`` on a GPU): faster per
pass, at a compile of tens of seconds per batch size and block width.
"""

from __future__ import annotations

import weakref

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

_GRAPHS_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StaticForward:
    """``forward(ids, start, keep)``: logits of the last ``keep`` of ``ids`` written at slots
    ``start ..``, for a batch of ``batch`` rows and a cache of ``cache_len`` slots."""

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int, inductor: bool = False):
        self.model = weakref.ref(model)  # the cache is keyed by the model: do not keep it alive
        parameter = next(model.parameters())
        self.weights = parameter.data_ptr()  # graphs read the weights where they were at capture
        self.device, self.dtype = parameter.device, parameter.dtype
        self.batch, self.cache_len = batch, cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        if any(type(layer) is not StaticLayer for layer in self.cache.layers):
            raise ValueError("compile=True supports models whose layers all use full attention "
                             "(no sliding-window or hybrid layers); use compile=False for this model.")
        self.slots = torch.arange(cache_len, device=self.device)
        self.valid = torch.ones(batch, cache_len, dtype=torch.bool, device=self.device)
        self.pad = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.start = torch.zeros((), dtype=torch.long, device=self.device)  # set by fill_: no host sync
        self.use_graphs = self.device.type == "cuda"
        self.inductor = inductor
        self.fused = None  # torch.compile(self._run), built at the first graph-eligible call
        self.graphs: dict[tuple[int, int], tuple] = {}  # (width, keep) -> (graph, ids input, logits)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, cache_len: int, inductor: bool = False):
        """Reuse the model's cache and graphs when the settings match; otherwise build new ones."""
        current = _GRAPHS_BY_MODEL.pop(model, None)
        settings = (batch, cache_len, inductor, next(model.parameters()).data_ptr())
        if current is None or (current.batch, current.cache_len, current.inductor, current.weights) != settings:
            current = None  # free the old cache and graphs before allocating new ones
            current = cls(model, batch, cache_len, inductor)
        _GRAPHS_BY_MODEL[model] = current
        return current

    def reset(self, prompt_mask: torch.Tensor) -> None:
        """Start a new batch of left-padded prompts (``prompt_mask`` is 0 on padding)."""
        self.valid.fill_(True)
        self.valid[:, : prompt_mask.shape[1]] = prompt_mask.bool()
        self.pad.copy_((prompt_mask == 0).sum(1, keepdim=True))

    def _run(self, model: torch.nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
        cols = self.start + self.slots[: ids.shape[1]]  # the cache slot of each fed token
        causal = self.slots <= cols[:, None]
        see = (causal & self.valid[:, None, :]) | (self.slots == cols[:, None])  # a pad query sees itself
        bias = torch.zeros(see.shape, dtype=self.dtype, device=self.device)
        bias.masked_fill_(~see, torch.finfo(self.dtype).min)
        for layer in self.cache.layers:  # StaticLayer writes at cumulative_length onwards
            layer.cumulative_length.copy_(self.start)
        return model(
            input_ids=ids,
            attention_mask=bias[:, None],
            position_ids=(cols - self.pad).clamp(min=0),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits

    def __call__(self, ids: torch.Tensor, start: int, keep: int, *, graph: bool = True) -> torch.Tensor:
        """Logits ``[batch, keep, vocab]``. ``graph=False`` always runs eagerly (the prefill). A
        graph's logits are overwritten by its next replay: use them before the next call."""
        self.start.fill_(start)
        model = self.model()
        if not (graph and self.cache.is_initialized):
            return self._run(model, ids, keep)
        if self.inductor:  # fused kernels; on CUDA also replayed as graphs (cudagraph trees)
            if self.fused is None:
                mode = "reduce-overhead" if self.use_graphs else "default"
                self.fused = torch.compile(self._run, mode=mode, dynamic=False)
            return self.fused(model, ids, keep)
        if not self.use_graphs:
            return self._run(model, ids, keep)
        key = (ids.shape[1], keep)
        if key not in self.graphs:
            self.graphs[key] = self._capture(model, ids, keep)
        cuda_graph, ids_in, logits = self.graphs[key]
        ids_in.copy_(ids)
        cuda_graph.replay()
        return logits

    def _capture(self, model: torch.nn.Module, ids: torch.Tensor, keep: int):
        """Warm up on a side stream, then capture; both run the real pass (same slots, same inputs)."""
        ids_in = ids.clone()
        # Under autocast (bf16-mixed), cached weight casts would be freed when the context exits:
        # capture with the cache off so the casts are part of the graph.
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False,
                                  enabled=torch.is_autocast_enabled("cuda"))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                self._run(model, ids_in, keep)
        torch.cuda.current_stream(self.device).wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph), autocast:
            logits = self._run(model, ids_in, keep)
        return cuda_graph, ids_in, logits
