"""The compiled path (static cache, fixed shapes; CUDA graphs on a GPU) gives the eager tokens."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from conftest import EOS, MODELS, OpCounts, left_pad, random_prompts
from dllm_lit import generate_blocks
from dllm_lit.compiled import StaticForward, cached_forward
from dllm_lit.tiny import tiny_llama as llama_of

tiny_llama = MODELS["llama"]

PROMPTS = random_prompts([5, 11, 2], seed=1)


def run(model, prompts, **kwargs):
    ids, mask = left_pad(prompts)
    return generate_blocks(model, ids, attention_mask=mask, eos_token_id=EOS, **kwargs)


def summary(result):
    rows = [(r.token_ids, r.stop_reason, r.stop_token_id, r.forwards) for r in result.rows]
    return rows, result.forwards, result.refine_passes_per_block


@pytest.mark.parametrize("width", [1, 2, 8, 33])
@pytest.mark.parametrize("refine_iter", [1, 2, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_equals_eager(model, width, refine_iter, batch):
    settings = dict(add_eos_length=width - 1, refine_iter=refine_iter, max_new_tokens=45)
    assert summary(run(model, PROMPTS[:batch], backend="cuda_graph", **settings)) == summary(
        run(model, PROMPTS[:batch], **settings)
    )


@pytest.mark.parametrize("lossless", [False, True], ids=["block", "lossless"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_compiled_equals_eager_in_bf16(model, precision, lossless, monkeypatch):
    """Lightning's two bf16 precisions. Under ``bf16-mixed`` (fp32 weights, autocast) K (rotated in
    fp32) and V (a bf16 projection) reach the static cache in different dtypes: this crashed on an H200.
    The projections are fused as on a GPU."""
    monkeypatch.setattr(StaticForward, "fuse_projections", True)
    settings = dict(add_eos_length=7, refine_iter=2, max_new_tokens=30)
    if lossless:  # the compiled loop keeps the whole window: compare forwards with the eager loop's whole one
        settings.update(lossless=True, adaptive_window=False)
    if precision == "bf16-true":
        model = copy.deepcopy(model).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        expected = summary(run(model, PROMPTS, **settings))
        assert summary(run(model, PROMPTS, backend="cuda_graph", **settings)) == expected


def test_a_run_under_autocast_leaves_no_cache_for_a_run_without(model):
    """The static cache takes its dtype (and a graph its casts) from the first pass: a bf16-mixed run
    must not hand GPT-2's bf16 cache to a later fp32 run of the same shapes (it crashed)."""
    settings = dict(add_eos_length=5, refine_iter=2, max_new_tokens=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(model, PROMPTS, backend="cuda_graph", **settings)
    assert summary(run(model, PROMPTS, backend="cuda_graph", **settings)) == summary(run(model, PROMPTS, **settings))


@pytest.mark.parametrize("lossless", [False, True], ids=["block", "lossless"])
def test_fused_projections_give_the_eager_tokens(model, monkeypatch, lossless):
    """On a GPU the passes multiply q/k/v and gate/up as one product each (forced on here)."""
    monkeypatch.setattr(StaticForward, "fuse_projections", True)
    settings = dict(add_eos_length=7, refine_iter=2, max_new_tokens=30)
    if lossless:
        settings.update(lossless=True, adaptive_window=False)
    expected = summary(run(model, PROMPTS, **settings))
    assert summary(run(model, PROMPTS, backend="cuda_graph", **settings)) == expected
    if model.config.model_type == "llama":  # GPT-2's q/k/v are one product already
        attention = model.model.layers[0].self_attn
        assert (
            attention.q_proj.weight.untyped_storage().data_ptr() == attention.v_proj.weight.untyped_storage().data_ptr()
        )


def test_rows_that_stop_at_different_times(model):
    """EOS inside prompts, rows stopping by EOS at different blocks, extra stop ids, length cuts."""
    prompts = [p[:3] + [EOS] + p[3:] for p in random_prompts([6, 9, 2, 14, 7, 3], seed=3)]
    for settings in (
        dict(add_eos_length=3, refine_iter=2, max_new_tokens=40),
        dict(add_eos_length=5, refine_iter=3, max_new_tokens=100, max_length=24),
        dict(add_eos_length=7, refine_iter=8, max_new_tokens=30, stop_token_ids=[11, 12]),
        dict(add_eos_length=3, refine_iter=2, max_new_tokens=21, ignore_eos=True),
    ):
        eager = run(model, prompts, **settings)
        assert summary(run(model, prompts, backend="cuda_graph", **settings)) == summary(eager)
    assert {r.stop_reason for r in eager.rows} == {"max_new_tokens"}
    mixed = run(model, prompts, add_eos_length=3, refine_iter=2, max_new_tokens=40)
    assert {r.stop_reason for r in mixed.rows} == {"eos", "max_new_tokens"}, "the fixture needs both kinds"


STOPPING = [p[:3] + [EOS] + p[3:] for p in random_prompts([6, 9, 2, 14, 7, 3], seed=3)]


@pytest.mark.parametrize("lossless", [False, True], ids=["block", "lossless"])
def test_finished_rows_leave_the_batch(model, monkeypatch, lossless):
    """Once half the rows finished, the rest move to a smaller captured batch (a power of two): same
    tokens, forwards, stop reasons (and accepted counts) as the eager loop, where rows decode to their end."""
    moves = []
    move_rows = StaticForward.move_rows

    def recorded(self, positions, target):
        moves.append((self.batch, target.batch, len(positions)))
        move_rows(self, positions, target)

    monkeypatch.setattr(StaticForward, "move_rows", recorded)
    prompts = random_prompts([2, 20, 5, 14, 9, 30], seed=4)  # max_length: each row its own budget
    settings = dict(add_eos_length=3, refine_iter=2, max_new_tokens=60, max_length=40)
    if lossless:
        settings.update(lossless=True, adaptive_window=False)
    eager = run(model, prompts, **settings)
    compiled = run(model, prompts, backend="cuda_graph", **settings)
    assert summary(compiled) == summary(eager) and compiled.accepted_per_pass == eager.accepted_per_pass
    assert moves and moves[0][0] == 6 and all(new == count < old for old, new, count in moves), moves


def test_the_block_loop_runs_only_the_passes_it_counts(model):
    """The next block's first pass is launched before the host commits a block, where a row goes on:
    stops by EOS, stop ids and length are foreseen, so no launched pass goes unused."""
    passes = []
    hook = model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        for settings in (
            dict(add_eos_length=3, refine_iter=2, max_new_tokens=40),
            dict(add_eos_length=0, max_new_tokens=25, stop_token_ids=[11, 12]),
            dict(add_eos_length=5, refine_iter=3, max_new_tokens=100, max_length=24),
        ):
            passes.clear()
            result = run(model, STOPPING, backend="cuda_graph", **settings)
            assert len(passes) == result.forwards, settings
    finally:
        hook.remove()


def test_a_pass_computes_its_cache_slots_once_for_all_layers():
    """The cache layers write at the slots the pass computed for its mask: no per-layer ``arange``."""
    aranges = []
    for layers in (2, 6):
        model = llama_of(96, layers=layers)  # the forward holds it weakly
        forward = StaticForward(model, batch=2, cache_len=64)
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        forward(ids, 0, 4, graph=False)  # the cache's first pass allocates it
        with OpCounts() as ops:
            forward(ids, 4, 4)
        aranges.append(ops.counts["arange"])
    assert aranges[0] == aranges[1], aranges


def test_bounded_attention_spans_give_the_same_tokens(model, monkeypatch):
    """Passes attend to the used slots only (rounded up to ``span_step``): many spans, same tokens."""
    monkeypatch.setattr(StaticForward, "span_step", 8)
    for settings in (
        dict(add_eos_length=7, refine_iter=2, max_new_tokens=40),
        dict(add_eos_length=0, max_new_tokens=30),
        dict(add_eos_length=3, lossless=True, adaptive_window=False, max_new_tokens=40),
    ):
        expected = summary(run(model, STOPPING, **settings))
        assert summary(run(model, STOPPING, backend="cuda_graph", **settings)) == expected
    static = cached_forward(model, len(STOPPING))
    assert static.cache_len > 2 * StaticForward.span_step


def test_exact_settings_equal_greedy_generate(model):
    ids, mask = left_pad(PROMPTS)
    expected = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=EOS, pad_token_id=0
    )[:, ids.shape[1] :].tolist()
    for row, hf in zip(
        run(model, PROMPTS, add_eos_length=7, refine_iter=8, max_new_tokens=30, backend="cuda_graph").rows, expected
    ):
        ours = row.ids_with_stop
        assert ours == hf[: len(ours)]


def test_cache_is_reused_for_the_same_shapes_and_rebuilt_for_others():
    model = tiny_llama()
    settings = dict(add_eos_length=7, refine_iter=2, max_new_tokens=20, backend="cuda_graph")
    first = summary(run(model, PROMPTS, **settings))
    static = cached_forward(model, 3)
    assert summary(run(model, PROMPTS, **settings)) == first and cached_forward(model, 3) is static
    alone = summary(run(model, PROMPTS[1:2], **settings))  # batch 1: its own cache, the batch of 3 kept
    assert cached_forward(model, 1) is not None and cached_forward(model, 3) is static
    assert alone[0][0][:3] == first[0][1][:3]
    assert summary(run(model, PROMPTS, **settings)) == first and cached_forward(model, 3) is static
    run(model, PROMPTS, **{**settings, "max_new_tokens": 300})  # a longer cache: rebuilt
    assert cached_forward(model, 3) is not static
    alive = weakref.ref(model)
    del model, static
    gc.collect()
    assert alive() is None, "the cache must not keep the model alive"


def test_a_replaced_weight_gets_new_graphs():
    """Graphs read weights where they were at capture: a Parameter replaced after a run (as merging an
    adapter does), anywhere in the model, must not reach the old graphs."""
    model = tiny_llama()
    settings = dict(add_eos_length=7, refine_iter=2, max_new_tokens=20, backend="cuda_graph")
    before = summary(run(model, PROMPTS, **settings))
    static = cached_forward(model, 3)
    down = model.model.layers[-1].mlp.down_proj
    down.weight = torch.nn.Parameter(3 * down.weight.detach())
    after = summary(run(model, PROMPTS, **settings))
    assert cached_forward(model, 3) is not static
    assert after == summary(run(model, PROMPTS, **{**settings, "backend": "eager"})) and after != before


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(model):
    settings = dict(add_eos_length=7, refine_iter=3, max_new_tokens=24, backend="cuda_graph")
    greedy = summary(run(model, PROMPTS, **settings))
    assert summary(run(model, PROMPTS, temperature=0.7, top_k=1, seed=3, **settings)) == greedy
    first = summary(run(model, PROMPTS, temperature=1.5, top_p=0.95, seed=11, **settings))
    assert summary(run(model, PROMPTS, temperature=1.5, top_p=0.95, seed=11, **settings)) == first


def test_inductor_equals_eager(capfd, fresh_compiles):
    """torch.compile runs on CPU too: the fused forwards give the eager tokens (block and lossless mode).
    Each compile is reported on stderr; a second run compiles nothing."""
    model = tiny_llama()
    for settings in (dict(refine_iter=3), dict(lossless=True, adaptive_window=False)):  # compiled: a full window
        settings.update(add_eos_length=7, max_new_tokens=24)
        assert summary(run(model, PROMPTS, backend="inductor", **settings)) == summary(run(model, PROMPTS, **settings))
    said = capfd.readouterr().err
    assert said.count("inductor: compiling the passes") == 1
    assert "inductor: compiled the 11-token pass for 3 row(s)" in said  # lossless: W = 8 and 3 alternatives
    run(model, PROMPTS, backend="inductor", **settings)
    assert "compiled the" not in capfd.readouterr().err, "the same shapes compile once"


def test_inductor_compiles_a_width_at_most_twice_whatever_the_prompt_lengths_and_batch_sizes(capfd, fresh_compiles):
    """Every prompt length gives the static cache another length, and finished rows shrink the batch:
    the first change compiles a program with those sizes dynamic, and no later one compiles (per shape
    it took one compile each, and dynamo ran eagerly after 8)."""
    model = tiny_llama()
    settings = dict(add_eos_length=7, lossless=True, adaptive_window=False, max_new_tokens=24)
    prompts = random_prompts([5, 70, 140, 200, 260, 330, 20, 100, 300], seed=5)
    for batch in [[prompt] for prompt in prompts] + [prompts[:6]]:
        assert summary(run(model, batch, backend="inductor", **settings)) == summary(run(model, batch, **settings))
    assert capfd.readouterr().err.count("inductor: compiled the 11-token pass") <= 3  # 1 row, then dynamic, 6 rows


def test_the_deprecated_compile_flag_still_selects_the_backend():
    model = tiny_llama()
    settings = dict(add_eos_length=7, refine_iter=3, max_new_tokens=24)
    for compile, backend in ((True, "cuda_graph"), (False, "eager")):
        with pytest.warns(DeprecationWarning, match="compile= is deprecated"):
            legacy = summary(run(model, PROMPTS, compile=compile, **settings))
        assert legacy == summary(run(model, PROMPTS, backend=backend, **settings))


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(backend="cuda_graph", use_cache=False), "needs use_cache=True"),
        (dict(backend="graphs"), "backend must be one of eager, cuda_graph, inductor"),
        (dict(compile="graphs"), "compile must be false, true or 'inductor'"),
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bad_backend_settings_raise_one_sentence(change, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_llama(), PROMPTS[:1], max_new_tokens=4, **change)


@pytest.mark.slow
def test_inductor_keeps_compiling_past_eight_widths(capfd, fresh_compiles):
    """A server meets a width per request setting: the tenth width still compiles (dynamo's own limit is
    8 programs per function, then it runs the function eagerly) and gives the eager tokens."""
    model = tiny_llama()
    for width in range(1, 11):
        settings = dict(add_eos_length=width - 1, lossless=True, adaptive_window=False, max_new_tokens=12)
        assert summary(run(model, PROMPTS[:1], backend="inductor", **settings)) == summary(
            run(model, PROMPTS[:1], **settings)
        )
    assert capfd.readouterr().err.count("inductor: compiled the") >= 10
