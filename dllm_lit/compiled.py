"""The compiled decoding path: fixed-shape forwards over a preallocated KV cache, CUDA graphs on a GPU.

``backend="cuda_graph"`` (or ``"inductor"``) runs the block-refine algorithm with :func:`decode_static`,
which feeds the model only a few
input widths (block refine, block draft, and the one-off prompt prefill), always writing K/V at
explicit cache slots. Each pass may overwrite the slots of draft tokens: a slot is only ever read
by queries at later or equal slots, and every pass writes a contiguous run starting at the first
slot whose K/V are not final, so stale or garbage entries beyond it are never seen.

On CUDA each width is captured once as a ``torch.cuda.CUDAGraph`` (the attention mask, positions
and cache offset are computed inside the graph from a zero-dimensional ``start`` tensor), so a pass is
one graph launch instead of hundreds of kernel launches. On CPU the same program runs eagerly.
With ``backend="inductor"`` the fixed-shape forwards go through ``torch.compile`` instead (fused
kernels, on a CPU too, and CUDA graphs through ``mode="reduce-overhead"`` on a GPU): faster per
pass, at a compile of tens of seconds per block width (and once more where the batch size or cache
length first changes), reported on stderr.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch._dynamo.utils import counters as compile_counters
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from dllm_lit.adapters import draft_gate
from dllm_lit.attention import grouped_attention
from dllm_lit.ledger import RowLedger
from dllm_lit.norms import fused_norms
from dllm_lit.projections import fuse_weights, fused_projections
from dllm_lit.prompt_cache import CachedStart
from dllm_lit.sampling import RowSampler, block_positions
from dllm_lit.settings import DecodeSettings

_FORWARDS_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_forward(model: torch.nn.Module, batch: int) -> StaticForward | None:
    """The :class:`StaticForward` (static cache and captured graphs) the compiled path keeps for
    ``model`` and ``batch`` rows between calls, or ``None``."""
    return _FORWARDS_BY_MODEL.get(model, {}).get(batch)


def autocast_of(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` now, or ``None`` outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def weights_of(model: torch.nn.Module) -> tuple[int, ...]:
    """Where ``model``'s parameters and buffers are: a graph reads them there, so a replaced tensor
    (a new ``Parameter``, a merged adapter, ``model.to``) needs new graphs."""
    return tuple(tensor.data_ptr() for tensor in (*model.parameters(), *model.buffers()))


class RowSlotLayer(StaticLayer):
    """A static cache layer that writes each row's new K/V at that row's own slots ``start[row] ..``
    (rows of a lossless batch accept different counts, so their next tokens sit at different slots)
    and returns only the first ``span`` slots, the ones a pass may read."""

    def __init__(self, max_cache_len: int, start: torch.Tensor):
        super().__init__(max_cache_len)
        self.start = start  # [batch], shared with the StaticForward that sets it
        self.span = max_cache_len  # set by the StaticForward before each pass
        self.cols: torch.Tensor | None = None  # the pass's slots [batch, fed], where its StaticForward has them

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cols = self.cols
        if cols is None:
            cols = self.start[:, None] + torch.arange(key_states.shape[-2], device=self.device)
        index = cols[:, None, :, None]
        # Under autocast K (rotated in fp32) and V (a bf16 projection) differ: the cache keeps K's dtype.
        self.keys.scatter_(2, index.expand_as(key_states), key_states.to(self.keys.dtype))
        self.values.scatter_(2, index.expand_as(value_states), value_states.to(self.values.dtype))
        return self.keys[:, :, : self.span], self.values[:, :, : self.span]


class StaticForward:
    """``forward(ids, start, keep)``: logits of the last ``keep`` of ``ids``, row ``r`` written at
    slots ``start[r] ..`` (or all rows at ``start``), for ``batch`` rows and ``cache_len`` slots.

    A pass attends to the cache's first ``span`` slots only: the end of its writes rounded up to a
    multiple of :attr:`span_step` (one captured graph per width and span), or the whole cache under
    ``inductor`` (one compiled program per width). Grouped K/V heads are read once
    (:mod:`dllm_lit.attention`), and, outside ``inductor``, Llama-style RMSNorms run as one call each
    (:mod:`dllm_lit.norms`; :attr:`fuse_norms`) and sibling projections (q/k/v, gate/up) as one
    matrix product each, with one rotary embedding over q and k (:mod:`dllm_lit.projections`;
    :attr:`fuse_projections`); both are read when a pass runs or is captured.

    ``branch``: the last ``branch`` tokens of ``ids`` are fed a second time, after ``ids``, as a
    lossless draft branch: at the same positions, read through the model's draft adapter
    (:class:`~dllm_lit.adapters.DraftGate`), seeing the slots before the tokens they repeat and,
    causally, each other; the repeated tokens never see them (they sit at later slots). The logits
    kept are then ``keep`` of ``ids`` followed by the branch's ``branch``.

    ``alternatives``: the last ``alternatives`` tokens of ``ids`` (before a branch) are lossless
    alternatives for the token after the first fed one: each reads the slots up to that first token's
    and its own, at the next position (:meth:`keep_alternative` moves a taken one into place).
    """

    span_step = 128
    fuse_norms = True
    fuse_projections: bool | None = None  # None: where passes are CUDA graphs (on a CPU: 0-12 % slower)
    compile_announced = False  # said once per process: inductor compiles (``_fused``)
    compile_seconds = 0.0  # spent in inductor's compiles by this process (the predict summary subtracts it)
    programs = 64  # inductor programs a process may compile (2-3 per width) before dynamo runs eagerly

    def __init__(self, model: torch.nn.Module, batch: int, cache_len: int, inductor: bool = False):
        self.model = weakref.ref(model)  # the cache is keyed by the model: do not keep it alive
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.autocast = autocast_of(self.device)  # the cache's dtype and the graphs' casts depend on it
        self.batch, self.cache_len = batch, cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)
        if any(type(layer) is not StaticLayer for layer in self.cache.layers):
            raise ValueError(
                "The compiled backends support models whose layers all use full attention "
                "(no sliding-window or hybrid layers); use backend='eager' for this model."
            )
        self.start = torch.zeros(batch, dtype=torch.long, device=self.device)  # set in place: no host sync
        self.cache.layers = [RowSlotLayer(cache_len, self.start) for _ in self.cache.layers]
        self.slots = torch.arange(cache_len, device=self.device)
        self.valid = torch.ones(batch, cache_len, dtype=torch.bool, device=self.device)
        self.pad = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.use_graphs = self.device.type == "cuda"
        if self.use_graphs:
            fuse_weights(model)  # before any capture: graphs read the weights where they were then
        self.weights = weights_of(model)  # where the graphs read them: other weights need new graphs
        self.inductor = inductor
        self.fused = None  # torch.compile(self._run), built at the first graph-eligible call
        self.graphs: dict[tuple[int, ...], tuple] = {}  # (width, keep, span, branch) -> (graph, ids input, logits)
        self.branch_gates: dict[tuple[int, int], torch.Tensor] = {}  # (width, branch) -> the gate's token mask
        self.pool = None  # one memory pool for all the graphs: they never run at the same time

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, cache_len: int, inductor: bool = False):
        """Reuse the model's cache and graphs for ``batch`` rows when the settings, the places of its
        weights (:func:`weights_of`) and the autocast state match; caches of other batch sizes with the
        same settings are kept (the compiled path shrinks its batch)."""
        family = _FORWARDS_BY_MODEL.pop(model, {})
        settings = (cache_len, inductor, weights_of(model), autocast_of(next(model.parameters()).device))
        if any((each.cache_len, each.inductor, each.weights, each.autocast) != settings for each in family.values()):
            family.clear()  # free the old caches and graphs before allocating new ones
        if batch not in family:
            family[batch] = cls(model, batch, cache_len, inductor)
        _FORWARDS_BY_MODEL[model] = family
        return family[batch]

    def reset(self, prompt_mask: torch.Tensor) -> None:
        """Start a new batch of prompts (``prompt_mask``: 0 on padding, which sits before the tokens it
        pads: positions count the padding before a slot)."""
        self.valid.fill_(True)
        self.valid[:, : prompt_mask.shape[1]] = prompt_mask.bool()
        self.pad.copy_((prompt_mask == 0).sum(1, keepdim=True))

    def prefill(self, start: CachedStart | None, prompt_ids, prompt_mask, tail: torch.Tensor, keep: int, branch=0):
        """Start a new batch of left-padded prompts: feed them and ``tail`` eagerly from slot 0 and return
        the logits (:meth:`__call__`). With a prompt cache's ``start``, its cached beginning is copied
        into the first slots instead of fed, and the prompts' K/V go back to the prompt cache."""
        reused = 0
        if start is not None:
            prompt_ids, prompt_mask, reused = start.ids, start.mask, start.length
        self.reset(prompt_mask)
        if reused:
            for mine, cached in zip(self.cache.layers, start.cache.layers):
                if not mine.is_initialized:
                    mine.lazy_initialization(cached.keys, cached.values)
                mine.keys[:, :, :reused].copy_(cached.keys)
                mine.values[:, :, :reused].copy_(cached.values)
        logits = self(torch.cat([prompt_ids[:, reused:], tail], 1), reused, keep, graph=False, branch=branch)
        if start is not None:
            start.keep(self.cache)
        return logits

    def shrink(self, positions: list[int]) -> StaticForward:
        """The model's :class:`StaticForward` for ``len(positions)`` rows, holding rows ``positions``
        of this batch (in that order), to decode them on."""
        smaller = StaticForward.for_model(self.model(), len(positions), self.cache_len, self.inductor)
        self.move_rows(positions, smaller)
        return smaller

    def move_rows(self, positions: list[int], target: StaticForward) -> None:
        """Copy rows ``positions`` of this batch (their cache, padding and valid slots) into ``target``,
        in that order, so that it decodes them on from here."""
        index = torch.tensor(positions, device=self.device)
        for mine, theirs in zip(self.cache.layers, target.cache.layers):
            keys, values = mine.keys[index], mine.values[index]
            if not theirs.is_initialized:
                theirs.lazy_initialization(keys, values)
            theirs.keys.copy_(keys)
            theirs.values.copy_(values)
        target.valid.copy_(self.valid[index])
        target.pad.copy_(self.pad[index])

    def keep_alternative(self, taken: torch.Tensor, width: int) -> None:
        """After a lossless pass with alternatives: a row that took alternative ``taken[row]`` (-1: none)
        gets its K/V (slot ``start + width + taken``) in the first draft token's slot (``start + 1``),
        so that its accepted tokens sit in consecutive slots."""
        target = self.start + 1
        source = target + torch.where(taken >= 0, width - 1 + taken, 0)
        for layer in self.cache.layers:
            for cache in (layer.keys, layer.values):
                heads, dim = cache.shape[1], cache.shape[3]
                moved = cache.gather(2, source[:, None, None, None].expand(-1, heads, 1, dim))
                cache.scatter_(2, target[:, None, None, None].expand(-1, heads, 1, dim), moved)

    def span_for(self, end: int) -> int:
        """Cache slots a pass reads when no row writes at or past slot ``end``."""
        if self.inductor:
            return self.cache_len
        return min(self.cache_len, -(-end // self.span_step) * self.span_step)

    def _run(
        self, model: torch.nn.Module, ids: torch.Tensor, keep: int, span: int, branch: int = 0, alternatives: int = 0
    ) -> torch.Tensor:
        slots, fed = self.slots[:span], ids.shape[1]
        cols = self.start[:, None] + slots[:fed]  # [batch, fed]: the slot of each fed token
        causal = slots <= cols[:, :, None]
        positions = cols - self.pad
        if alternatives:  # each reads the slots up to the first fed token's and its own, at the next position
            first = fed - branch - alternatives
            in_alternatives = (slots[:fed] >= first) & (slots[:fed] < fed - branch)
            causal &= ~(in_alternatives[None, :, None] & (slots > self.start[:, None, None]))
            positions = torch.where(in_alternatives, self.start[:, None] + 1 - self.pad, positions)
        if branch:  # the branch skips the tokens it repeats (and the alternatives), and takes their positions
            repeated = cols[:, fed - 2 * branch - alternatives, None, None]  # the slot of the first repeated token
            skipped = (slots >= repeated) & (slots < repeated + branch + alternatives)
            in_branch = slots[:fed] >= fed - branch
            causal &= ~(in_branch[None, :, None] & skipped)
            positions = positions - (branch + alternatives) * in_branch
        see = (causal & self.valid[:, None, :span]) | (slots == cols[:, :, None])  # a pad query sees itself
        bias = torch.zeros(see.shape, dtype=self.dtype, device=self.device)
        bias.masked_fill_(~see, torch.finfo(self.dtype).min)
        for layer in self.cache.layers:  # their writes go to ``cols``: two kernels a layer fewer
            layer.cols = None if self.inductor else cols  # (dynamo would trace the attribute as a side effect)
        return model(
            input_ids=ids,
            attention_mask=bias[:, None],
            position_ids=positions.clamp(min=0),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits

    def __call__(
        self,
        ids: torch.Tensor,
        start: int | torch.Tensor,
        keep: int,
        *,
        end: int | None = None,
        graph: bool = True,
        branch: int = 0,
        alternatives: int = 0,
    ) -> torch.Tensor:
        """Logits ``[batch, keep (+ alternatives + branch), vocab]``. ``end``: no row writes at or past
        this slot (default: ``start + width`` for an int ``start``, the cache's end for a tensor).
        ``graph=False`` always runs eagerly (the prefill). ``branch`` and ``alternatives`` (the last
        tokens of ``ids``): see the class. A graph's logits are overwritten by the next replay of any of
        this forward's graphs: use them before the next call."""
        if branch:
            repeated = ids[:, ids.shape[1] - alternatives - branch : ids.shape[1] - alternatives]
            ids = torch.cat([ids, repeated], 1)
        keep += alternatives + branch
        if isinstance(start, torch.Tensor):
            self.start.copy_(start)
        else:
            self.start.fill_(start)
            end = start + ids.shape[1] if end is None else end
        span = self.span_for(self.cache_len if end is None else end)
        for layer in self.cache.layers:
            layer.span = span
        key = (ids.shape[1], keep, span, branch, alternatives)
        replay = graph and self.cache.is_initialized and self.use_graphs and not self.inductor
        if not (replay and key in self.graphs):
            model = self.model()
            with self._patched(model, ids.shape[1], branch):
                if not (graph and self.cache.is_initialized):
                    return self._run(model, ids, keep, span, branch, alternatives)
                if self.inductor:
                    return self._fused(model, ids, keep, span, branch, alternatives)
                if not self.use_graphs:
                    return self._run(model, ids, keep, span, branch, alternatives)
                self.graphs[key] = self._capture(model, ids, keep, span, branch, alternatives)
        cuda_graph, ids_in, logits = self.graphs[key]
        ids_in.copy_(ids)
        cuda_graph.replay()
        return logits

    def _fused(self, model: torch.nn.Module, ids: torch.Tensor, *args: int) -> torch.Tensor:
        """The pass through ``torch.compile``: fused kernels, on CUDA replayed as graphs (cudagraph
        trees). Each width keeps a static program; the batch size and the cache length turn dynamic
        where they first change (automatic dynamic shapes), so a shrinking batch or a longer prompt
        compiles once more instead of once per shape. A server meets many widths (each request may set
        ``add_eos_length``), so dynamo's ``recompile_limit`` (8 programs per function, then it runs the
        function eagerly) is raised to :attr:`programs`. Compiles are reported on stderr: they take tens
        of seconds."""
        if self.fused is None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.programs)
            self.fused = torch.compile(self._run, mode="reduce-overhead" if self.use_graphs else "default")
        if not StaticForward.compile_announced:
            print("[dllm_lit] inductor: compiling the passes (tens of seconds per new one) ...", file=sys.stderr)
            StaticForward.compile_announced = True
        torch._dynamo.mark_static(ids, 1)
        graphs, began = compile_counters["stats"]["unique_graphs"], time.perf_counter()
        logits = self.fused(model, ids, *args)
        if compile_counters["stats"]["unique_graphs"] > graphs:
            rows, width = ids.shape
            took = time.perf_counter() - began
            StaticForward.compile_seconds += took
            print(
                f"[dllm_lit] inductor: compiled the {width}-token pass for {rows} row(s) in {took:.1f} s",
                file=sys.stderr,
            )
        return logits

    @contextmanager
    def _patched(self, model: torch.nn.Module, fed: int, branch: int) -> Iterator[None]:
        """What a pass runs under (a captured graph keeps it): grouped attention, fused norms and
        projections (not under inductor, whose guards would see new forwards per call), and for a
        draft branch the adapter switched on for the branch's tokens."""
        gate = nullcontext()
        if branch:
            if (fed, branch) not in self.branch_gates:  # kept: a captured graph reads it at every replay
                in_branch = torch.arange(fed, device=self.device) >= fed - branch
                self.branch_gates[fed, branch] = in_branch.to(self.dtype)[None, :, None]
            gate = draft_gate(model).tokens(self.branch_gates[fed, branch])
        eager = not self.inductor
        fuse = self.use_graphs if self.fuse_projections is None else self.fuse_projections
        norms, projections = fused_norms(model, self.fuse_norms and eager), fused_projections(model, fuse and eager)
        with grouped_attention(model), norms, projections, gate:
            yield

    def _capture(self, model: torch.nn.Module, ids: torch.Tensor, keep: int, span: int, branch: int, alternatives: int):
        """Warm up on a side stream, then capture; both run the real pass (same slots, same inputs)."""
        ids_in = ids.clone()
        # Under autocast (bf16-mixed), cached weight casts would be freed when the context exits:
        # capture with the cache off so the casts are part of the graph.
        autocast = torch.autocast(
            "cuda",
            dtype=torch.get_autocast_dtype("cuda"),
            cache_enabled=False,
            enabled=torch.is_autocast_enabled("cuda"),
        )
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                self._run(model, ids_in, keep, span, branch, alternatives)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self.pool), autocast:
            logits = self._run(model, ids_in, keep, span, branch, alternatives)
        return cuda_graph, ids_in, logits


def decode_static(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: DecodeSettings,
    ledger: RowLedger,
    sampler: RowSampler,
    *,
    fill: int,
    start: CachedStart | None = None,
) -> None:
    """Decode left-padded prompts into ``ledger``, picking with ``sampler`` (``start``: the prompt
    cache's, :meth:`StaticForward.prefill`); every pass has one of three fixed shapes.

    Finished rows stay in the batch (they have no room, so they never block a fixed point) until at
    most half the batch is alive; then, at a block boundary, the alive rows move to a smaller
    captured batch (a power of two, topped up with finished rows). The host reads a block once, after
    its last pass, with one wait; where a row goes on, it launches the next block's first pass before it
    commits the block (stop tests, streaming, logprobs), so the device does not wait for that work.
    """
    batch, prompt_len = prompt_ids.shape
    device, width = prompt_ids.device, settings.width
    budgets = ledger.budget.tolist()
    blocks = -(-max(budgets) // width)
    cache_len = -(-(prompt_len + blocks * width) // 64) * 64  # round up: reuse graphs across calls
    forward = StaticForward.for_model(model, batch, cache_len, settings.backend == "inductor")
    members = list(range(batch))  # the ledger row at each position of the batch
    alive = list(range(batch))
    fills = torch.full((batch, width - 1), fill, dtype=prompt_ids.dtype, device=device)
    logits = forward.prefill(start, prompt_ids, prompt_mask, fills, width)  # eagerly: its width varies per call
    for index in range(blocks):
        first = prompt_len + index * width  # cache slot of the block's first token
        room = torch.tensor([budgets[row] - index * width if row in alive else 0 for row in members])
        at = block_positions(index * width, width, device)
        block, scores = sampler.choose(logits, at)
        ledger.count_forward()
        # As in the eager loop, a block whose rows may add one more token at most has nothing to
        # refine: that token depends on committed tokens alone.
        refinable = min(width, int(room.max())) > 1
        where = (first, at)
        block, scores, settled = refine_static(
            forward, sampler, ledger, settings, block, scores, to_device(room, device), where, refinable
        )
        positions = [members.index(row) for row in alive]
        seen, seen_scores, settled = on_host(block, scores, settled)
        seen, seen_room, settled = seen[positions], room[positions], settled is not None and bool(settled)
        # The last block finishes every row (by budget), and this stop test is the commit's.
        if not bool(ledger.finishing(seen, seen_room).all()):
            logits = next_first_pass(forward, block, fills, first + width, settled)
        seen_scores = None if scores is None else seen_scores[positions]
        finished = ledger.commit(alive, seen, seen_room, scores=seen_scores).tolist()
        sampler.add(block)
        if start is not None:  # final K/V: the blocks before this one, and this one's but its last token if settled
            done = [(members.index(row), row) for row, stop in zip(alive, finished) if stop]
            keep_answers(start, forward, ledger, done, index * width + (width - 1 if settled else 0))
        alive = [row for row, done in zip(alive, finished) if not done]
        if not alive:
            return
        if len(alive) <= forward.batch // 2:  # the next pass ran on the whole batch: take its alive rows on
            positions = compacted_positions(members, alive)
            forward, members = forward.shrink(positions), [members[p] for p in positions]
            logits, fills = logits[positions], fills[: len(positions)]
            sampler.keep(positions)


def next_first_pass(
    forward: StaticForward, block: torch.Tensor, fills: torch.Tensor, first: int, settled: bool
) -> torch.Tensor:
    """Launch the first pass of the block at cache slot ``first``, after the committed ``block``:
    ``block``'s last token and the fills, or, where the block did not settle, the whole block again
    (its K/V are not final)."""
    width = block.shape[1]
    if settled:  # the last refine pass fed exactly block[:-1]: its K/V are final
        return forward(torch.cat([block[:, -1:], fills], 1), first - 1, width)
    return forward(torch.cat([block, fills], 1), first - width, width)


def on_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``tensors`` (or None) on the host: on CUDA all are queued as pinned copies before the first
    wait (``.tolist()`` would wait for each in turn)."""
    if not any(each is not None and each.device.type == "cuda" for each in tensors):
        return list(tensors)
    copies = [None if each is None else HostCopy(each) for each in tensors]
    return [None if copy is None else copy.read() for copy in copies]


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host wait (through pinned memory on CUDA)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def keep_answers(start: CachedStart, forward: StaticForward, ledger: RowLedger, done: list[tuple[int, int]], count):
    """Store the prompt and the first ``count`` answer tokens of each finished ``(batch position,
    ledger row)`` in the prompt cache, for a chat's next turn."""
    for position, row in done:
        start.keep_static_row(forward.cache, position, row, ledger.rows[row].ids_with_stop, count)


def compacted_positions(members: list[int], alive: list[int]) -> list[int]:
    """Batch positions to keep: the alive rows', topped up with finished rows to a power of two
    (few captured batch sizes)."""
    size = 1 << (len(alive) - 1).bit_length()
    kept = [position for position, row in enumerate(members) if row in alive]
    spare = [position for position, row in enumerate(members) if row not in alive]
    return kept + spare[: size - len(kept)]


def refine_static(
    forward: StaticForward,
    sampler: RowSampler,
    ledger: RowLedger,
    settings: DecodeSettings,
    block: torch.Tensor,
    scores: torch.Tensor | None,
    room: torch.Tensor,
    where: tuple[int, torch.Tensor],
    refinable: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Refine passes without a host wait: the fixed-point test runs on device and freezes the block;
    on CUDA the host reads the flag one pass late, so a block that settles costs at most one extra
    pass (same tokens). Takes the drafted block, its scores (None without ``logprobs``) and ``where``
    it is (its first cache slot, its answer positions); returns the block, its scores and whether it
    settled after at least one refine pass (a device bool the caller reads with the block; None
    without a refine pass)."""
    start, positions = where
    frozen = torch.zeros((), dtype=torch.bool, device=block.device)
    lag = block.device.type == "cuda"
    passes, pending = 0, None
    for _refine_pass in range(2, settings.refine_iter + 1 if refinable else 2):
        logits = forward(block[:, :-1], start, block.shape[1] - 1)
        picked, picked_scores = sampler.choose(logits, positions[:, 1:], block[:, :-1])
        refined = torch.cat([block[:, :1], picked], 1)
        if scores is not None:
            scores = torch.where(frozen, scores, torch.cat([scores[:, :1], picked_scores], 1))
        ledger.count_forward()
        passes += 1
        fixed = ledger.is_fixed_point(refined, block, room)
        block = torch.where(frozen, block, refined)
        frozen |= fixed
        if not settings.early_exit:
            continue
        if not lag:
            if bool(frozen):
                break
        elif pending is not None and bool(pending.read()):
            break
        else:
            pending = HostCopy(frozen)
    ledger.end_block(passes)
    return block, scores, frozen if passes else None


class HostCopy:
    """A small device tensor copied to pinned host memory without waiting; read once its copy is done."""

    def __init__(self, values: torch.Tensor):
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self.host.copy_(values, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record(torch.cuda.current_stream(values.device))  # the copy's stream, whichever GPU is current

    def read(self) -> torch.Tensor:
        """Wait for the copy (queued one pass ago, so the GPU stays busy) and return the values."""
        self.done.synchronize()
        return self.host
