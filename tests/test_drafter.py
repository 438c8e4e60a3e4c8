"""Draft adapters: a LoRA adapter that only drafts in lossless mode, while the base model verifies.

Oracles: greedy ``generate`` of the base model; the plain lossless run (a zero adapter drafts exactly
what the base would); the merged adapter's logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_lossless import greedy

from conftest import EOS, LOSSLESS_MODELS, MODELS, ROOT, left_pad, random_prompts
from dllm_lit import generate_blocks
from dllm_lit.adapters import DraftGate, add_lora

PROMPTS = random_prompts([5, 11, 2], seed=1)


def with_drafter(name: str, scale: float):
    """``(base, drafter)``: the tiny model, and the same model with a LoRA draft adapter whose B
    matrices are random times ``scale`` (0: an adapter that changes nothing)."""
    base = LOSSLESS_MODELS[name]()
    drafter = LOSSLESS_MODELS[name]()
    drafter = add_lora(drafter, rank=4, alpha=8, dropout=0.0, base_name=name).get_base_model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module_name, parameter in drafter.named_parameters():
            if "lora_B" in module_name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    drafter.draft_gate = DraftGate(drafter)
    return base.eval(), drafter.eval()


def lossless(model, prompts=PROMPTS, **settings):
    ids, mask = left_pad(prompts)
    settings = {"add_eos_length": 7, "max_new_tokens": 40, "adaptive_window": False, **settings}
    return generate_blocks(model, ids, attention_mask=mask, eos_token_id=EOS, lossless=True, **settings)


def test_the_gate_is_the_base_model_outside_the_draft_branch_and_the_merged_model_inside():
    base, drafter = with_drafter("llama", 0.5)
    ids = torch.tensor([PROMPTS[1]])
    assert torch.equal(drafter(ids).logits, base(ids).logits)
    with drafter.draft_gate.tokens(None):
        adapted = drafter(ids).logits
    half = torch.tensor([[0.0] * 5 + [1.0] * 6])[..., None]
    with drafter.draft_gate.tokens(half):
        gated = drafter(ids).logits
    assert not torch.allclose(adapted, base(ids).logits, atol=1e-3)
    torch.testing.assert_close(gated[:, :5], base(ids).logits[:, :5])  # causal: the first five saw no adapter
    assert torch.equal(drafter(ids).logits, base(ids).logits), "the gate switches itself off again"


def test_lossless_mode_and_plain_decoding_with_a_draft_adapter_do_not_warn_that_the_adapter_is_off():
    _, drafter = with_drafter("llama", 0.5)
    ids, mask = left_pad(PROMPTS)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="This model's draft adapter")
        lossless(drafter)
        generate_blocks(drafter, ids, attention_mask=mask, eos_token_id=EOS, add_eos_length=0, max_new_tokens=8)


@pytest.mark.parametrize("name", ["llama", "llama-drafty"])
def test_a_zero_adapter_drafts_exactly_what_the_base_drafts(name):
    """The draft branch sees the cache, the pending tokens before the last and its own tokens at the
    verified branch's positions: with an adapter that changes nothing, every pass accepts what the
    plain lossless run accepts."""
    base, drafter = with_drafter(name, 0.0)
    plain, drafted = lossless(base), lossless(drafter)
    assert [r.token_ids for r in drafted.rows] == [r.token_ids for r in plain.rows]
    assert drafted.accepted_per_pass == plain.accepted_per_pass
    assert max(n for per_pass in plain.accepted_per_pass for n in per_pass) >= 2


@pytest.mark.parametrize("name", ["llama", "llama-drafty"])
@pytest.mark.parametrize("width", [2, 8])
def test_lossless_with_a_draft_adapter_equals_the_base_models_greedy_generate(name, width):
    base, drafter = with_drafter(name, 0.5)
    for prompts in (PROMPTS[:1], PROMPTS):
        result = lossless(drafter, prompts, add_eos_length=width - 1, adaptive_window=True)
        assert [row.ids_with_stop for row in result.rows] == greedy(base, prompts, 40)
        assert all(row.forwards <= row.num_generated for row in result.rows)
    assert lossless(drafter).accepted_per_pass != lossless(base).accepted_per_pass, "the adapter drafts"


def test_alternatives_come_from_the_draft_adapter_and_save_passes():
    base, drafter = with_drafter("llama", 0.5)
    without = lossless(drafter, draft_alternatives=0)
    with_them = lossless(drafter, draft_alternatives=4)
    assert [row.ids_with_stop for row in with_them.rows] == greedy(base, PROMPTS, 40)
    assert with_them.forwards < without.forwards


@pytest.mark.parametrize("name", ["llama", "llama-drafty"])
@pytest.mark.parametrize("backend", ["cuda_graph", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_compiled_path_drafts_with_the_adapter_as_the_eager_loop_does(name, backend):
    """One fixed shape of ``2 W`` tokens per pass: the same tokens and the same accepted counts, pass
    for pass, as the eager loop's draft branch, so also the base model's greedy output."""
    base, drafter = with_drafter(name, 0.5)
    for prompts in (PROMPTS[:1], PROMPTS):
        eager = lossless(drafter, prompts)
        compiled = lossless(drafter, prompts, backend=backend)
        assert compiled.rows == eager.rows
        assert compiled.accepted_per_pass == eager.accepted_per_pass
    assert [row.ids_with_stop for row in compiled.rows] == greedy(base, PROMPTS, 40)
    assert compiled.accepted_per_pass != lossless(base, backend=backend).accepted_per_pass, "the adapter drafts"


@pytest.mark.parametrize("mode", [dict(refine_iter=2), dict(refine_iter=2, backend="cuda_graph")])
def test_other_modes_decode_the_base_model(mode):
    """Block mode, eager or compiled: the adapter stays off, and the user is told so."""
    base, drafter = with_drafter("llama-drafty", 0.5)
    ids, mask = left_pad(PROMPTS)
    settings = dict(attention_mask=mask, eos_token_id=EOS, add_eos_length=3, max_new_tokens=20, **mode)
    expected = generate_blocks(base, ids, **settings)
    with pytest.warns(UserWarning, match="only drafts in lossless mode"):
        drafted = generate_blocks(drafter, ids, **settings)
    assert drafted.rows == expected.rows
    assert drafted.accepted_per_pass == expected.accepted_per_pass


def test_gpt2_models_take_a_draft_adapter_too():
    base, drafter = with_drafter("gpt2", 0.5)
    assert [row.ids_with_stop for row in lossless(drafter).rows] == greedy(base, PROMPTS, 40)


def test_a_draft_adapter_trains_on_the_blocks_while_the_base_reads_the_clean_tokens():
    """Oracle: one forward over ``[clean copy, block copy]`` with the adapter gated to the block copy.
    ``clean_by_base`` reads the clean copy with the adapter off and no gradient, then the block copy
    alone: the same loss and the same gradients, on the adapter only."""
    from test_training import sft_batch

    from dllm_lit.training import (
        attention_bias,
        block_causal_mask,
        block_refine_losses,
        block_starts,
        drafted_positions,
        first_opening,
        read_blocks,
        response_cross_entropy,
    )

    ids, mask = sft_batch()
    model = add_lora(MODELS["llama"](), rank=4, alpha=8, dropout=0.0, base_name="llama")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    model.draft_gate = gate = DraftGate(model)
    with gate.tokens(None):
        noise = dict(block_size=4, num_iterations=1, generator=torch.Generator().manual_seed(2))
        (loss,), _ = block_refine_losses(model, ids, mask, fill_id=EOS, clean_by_base=True, **noise)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    starts = block_starts(mask, 4, torch.Generator().manual_seed(2))
    skip = first_opening(mask)
    block = torch.where(drafted_positions(mask, starts)[:, skip:], torch.full_like(ids[:, skip:], EOS), ids[:, skip:])
    gated = torch.cat([torch.zeros(ids.shape), torch.ones(block.shape)], 1)[..., None]
    with gate.tokens(gated):
        logits = read_blocks(model, ids, block, attention_bias(model, block_causal_mask(starts, skip))).logits
    expected = response_cross_entropy(logits[:, ids.shape[1] :], ids[:, skip:], mask[:, skip:])
    torch.testing.assert_close(loss, expected)
    expected.backward()
    assert grads and all("lora_" in name for name in grads)
    for name, parameter in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], parameter.grad, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters()), "the gate froze nothing"


def test_fit_exports_a_draft_adapter_that_decodes_the_base_models_answers(tiny_dir, tmp_path, monkeypatch):
    """``dllm_lit fit --model.draft_adapter true``: the loss falls, validation decodes losslessly with
    the drafts, and the export is a marked adapter that loads unmerged: the base model's logits
    outside the draft branch, the base model's greedy answers in lossless mode."""
    from test_training import read_metrics

    from dllm_lit import cli as dllm_cli
    from dllm_lit.adapters import is_drafter
    from dllm_lit.models import load_model, load_tokenizer
    from dllm_lit.tasks import write_task

    monkeypatch.setenv("DLLM_LIT_CACHE", str(tmp_path / "cache"))
    write_task("addition", tmp_path / "data", train=128, val=4, min_digits=2, max_digits=2)
    adapter = tmp_path / "drafter"
    dllm_cli.DllmCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs/train_tiny.yaml"),
            f"--model.model_name_or_path={tiny_dir}",
            "--model.lora_rank=4",
            "--model.draft_adapter=true",
            "--model.noise_layout=blocks",
            "--model.lossless=true",
            "--model.learning_rate=0.01",
            "--model.warmup_steps=2",
            f"--data.train_file={tmp_path / 'data/train.jsonl'}",
            f"--data.val_file={tmp_path / 'data/val.jsonl'}",
            "--data.batch_size=16",
            "--trainer.max_steps=16",
            "--trainer.val_check_interval=8",
            "--trainer.log_every_n_steps=4",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.callbacks.init_args.output_dir={adapter}",
        ]
    )
    rows = read_metrics(tmp_path / "logs")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert [float(r["val/agreement"]) for r in rows if r.get("val/agreement")] == [1.0, 1.0]
    assert is_drafter(adapter) and not any("loss_ar" in key for row in rows for key in row)

    base, drafter = load_model(tiny_dir), load_model(str(adapter))
    ids = load_tokenizer(str(adapter))(["12+34=", "71+5="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(drafter(ids.input_ids).logits, base(ids.input_ids).logits)
    settings = dict(attention_mask=ids.attention_mask, eos_token_id=EOS, max_new_tokens=12, add_eos_length=3)
    plain = generate_blocks(base, ids.input_ids, lossless=True, **settings)
    drafted = generate_blocks(drafter, ids.input_ids, lossless=True, **settings)
    assert [r.token_ids for r in drafted.rows] == [r.token_ids for r in plain.rows]
    with torch.no_grad(), drafter.draft_gate.tokens(None):
        assert not torch.allclose(drafter(ids.input_ids).logits, base(ids.input_ids).logits, atol=1e-3), "it trained"
