"""The iterative refine objective, `dllm_lit fit`/`validate`, and checkpoint round trips."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from conftest import EOS, MODELS, ROOT, assert_one_line_error, run_dllm_lit
from dllm_lit.answers import extract_answer, is_correct
from dllm_lit.batch import free_port
from dllm_lit.checkpoints import CheckpointError
from dllm_lit.data import PromptError, SFTDataset
from dllm_lit.export import HFExport, export_checkpoint, save_hf
from dllm_lit.module import BlockRefineLM
from dllm_lit.tasks import write_task
from dllm_lit.tiny import char_tokenizer
from dllm_lit.training import (
    block_refine_losses,
    block_starts,
    iterative_refine_losses,
    noise_mask,
    noise_response,
    response_cross_entropy,
    trailing_fill_run,
)


def sft_batch(seed: int = 0):
    """Prompt of 5 tokens, response of 6 tokens, then a tail of 3 EOS, for 8 rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (8, 14), generator=g)
    ids[:, 11:] = EOS
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 5:] = True
    return ids, mask


def test_noise_touches_only_the_response_and_the_eos_tail_as_a_unit():
    ids, mask = sft_batch()
    ids[:, 7] = EOS  # an EOS inside the response is not part of the tail
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        noised = noise_response(ids, mask, fill_id=EOS, noise_min=0.3, noise_max=0.9, generator=g)
        assert torch.equal(noised[:, :5], ids[:, :5])
        changed = noised != ids
        assert not changed[~mask].any()
        assert (noised[changed] == EOS).all()
    # The fraction follows t: at exactly 0.5, about half the response is replaced.
    chosen = noise_mask(ids.repeat(200, 1), mask.repeat(200, 1), fill_id=EOS, noise_min=0.5, noise_max=0.5, generator=g)
    assert 0.45 < chosen[:, 5:11].float().mean().item() < 0.55
    assert noise_response(ids, mask, fill_id=EOS, noise_min=0, noise_max=0).equal(ids)


def test_the_eos_tail_is_noised_all_or_none():
    ids, mask = sft_batch()
    ids[:, 7] = EOS  # an EOS inside the response is not part of the tail
    assert torch.equal(trailing_fill_run(ids, mask, EOS)[0], torch.tensor([False] * 11 + [True] * 3))
    g = torch.Generator().manual_seed(2)
    outcomes = set()
    for _ in range(30):
        chosen = noise_mask(ids, mask, fill_id=EOS, noise_min=0.5, noise_max=0.5, generator=g)
        for row in chosen[:, 11:]:
            assert row.all() or not row.any()
            outcomes.add(bool(row.all()))
    assert outcomes == {True, False}


def test_loss_ignores_prompt_positions():
    ids, mask = sft_batch()
    logits = torch.randn(8, 14, 96, requires_grad=True)
    loss = response_cross_entropy(logits, ids, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    # Position p predicts token p+1: positions 0..3 predict prompt tokens and get no gradient.
    assert grad[:, :4].abs().sum() == 0
    assert grad[:, 4:13].abs().sum(-1).gt(0).all()
    assert grad[:, 13].abs().sum() == 0  # nothing follows the last position
    expected = torch.nn.functional.cross_entropy(logits[:, 4:13].reshape(-1, 96), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    nothing = response_cross_entropy(logits, ids, torch.zeros_like(mask))
    assert nothing.item() == 0 and torch.autograd.grad(nothing, logits)[0].abs().sum() == 0


def test_every_round_has_gradients_and_later_rounds_feed_shifted_predictions():
    model = MODELS["llama"]()
    ids, mask = sft_batch()
    seen_inputs = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen_inputs.append(args[0].clone()))
    losses, clean = iterative_refine_losses(
        model,
        ids,
        mask,
        fill_id=EOS,
        num_iterations=3,
        noise_min=0.2,
        noise_max=0.8,
        generator=torch.Generator().manual_seed(0),
    )
    hook.remove()
    assert len(losses) == 3 and len(seen_inputs) == 3 and clean is None
    for loss in losses:
        grads = torch.autograd.grad(loss, [p for p in model.parameters()], retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in grads if g is not None) > 0
    with torch.no_grad():
        predicted = model(input_ids=seen_inputs[0]).logits.argmax(-1)
    round1 = seen_inputs[1]
    assert torch.equal(round1[:, :5], ids[:, :5])
    assert torch.equal(round1[:, 5:], predicted[:, 4:13])


def test_the_autoregressive_loss_shares_round_0s_forward():
    model = MODELS["llama"]()
    ids, mask = sft_batch()
    ids[4:, 12:] = 0  # right padding makes rows of different lengths
    mask[4:, 12:] = False
    seed = dict(fill_id=EOS, num_iterations=2, noise_min=0.2, noise_max=0.8)
    alone, none = iterative_refine_losses(model, ids, mask, generator=torch.Generator().manual_seed(3), **seed)
    calls = []
    record = lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape)  # noqa: E731
    hook = model.register_forward_hook(record, with_kwargs=True)
    stacked, clean = iterative_refine_losses(
        model, ids, mask, generator=torch.Generator().manual_seed(3), clean_logits=True, **seed
    )
    hook.remove()
    assert none is None and calls == [(16, 14), (8, 14)]  # two passes, not three
    torch.testing.assert_close(torch.stack(stacked), torch.stack(alone))
    expected = response_cross_entropy(model(input_ids=ids).logits, ids, mask)  # a separate clean pass
    clean = response_cross_entropy(clean, ids, mask)
    torch.testing.assert_close(clean, expected)
    grads = torch.autograd.grad(clean, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_blocks_open_after_the_prompt_on_a_grid_shifted_per_row():
    ids, mask = sft_batch()  # response at positions 5..13
    starts = block_starts(mask, 4, torch.Generator().manual_seed(0))
    offsets = torch.randint(4, (8, 1), generator=torch.Generator().manual_seed(0))
    assert len(set(offsets.flatten().tolist())) > 1
    for row, offset in zip(starts.tolist(), offsets.flatten().tolist()):
        grid = 4 + offset  # the last prompt token (4) opens the first block, the grid the others
        expected = [p if p < 4 else 4 if p < grid else grid + (p - grid) // 4 * 4 for p in range(14)]
        assert row == expected


def test_block_noise_equals_decoding_each_block_after_its_clean_prefix(model):
    """Oracle: every block run on its own, as a decoding pass sees it (clean prefix, opening token,
    fills, then its own shifted predictions), gives the logits the one block-causal forward gives."""
    ids, mask = sft_batch()
    ids[4:, 12:] = 0  # right padding makes rows of different lengths
    mask[4:, 12:] = False
    mask[:2, 3:5] = True  # and two rows with a shorter prompt: the block copy starts at their position 2
    width, seed = 4, 5
    outputs = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: outputs.append(out.logits), with_kwargs=True)
    losses, clean = block_refine_losses(
        model,
        ids,
        mask,
        fill_id=EOS,
        block_size=width,
        generator=torch.Generator().manual_seed(seed),
        clean_logits=True,
    )
    hook.remove()
    starts = block_starts(mask, width, torch.Generator().manual_seed(seed))
    expected = [torch.zeros_like(outputs[0][:, :14]) for _ in range(2)]
    assert [o.shape[1] for o in outputs] == [14 + 12, 12]  # round 1 reads no clean copy
    with torch.no_grad():
        for row in range(8):
            for start in sorted(set(starts[row].tolist())):
                span = [p for p in range(14) if starts[row, p] == start]
                block = [ids[row, p] if p == start or not mask[row, p] else EOS for p in span]
                for round_logits in expected:
                    inputs = torch.cat([ids[row, :start], torch.tensor(block)])[None]
                    round_logits[row, span] = model(input_ids=inputs).logits[0, start:]
                    guesses = round_logits[row, span].argmax(-1).tolist()
                    block = [
                        ids[row, p] if p == start or not mask[row, p] else guesses[i - 1] for i, p in enumerate(span)
                    ]
    for round_index, round_logits in enumerate(expected):
        torch.testing.assert_close(outputs[round_index][:, -12:], round_logits[:, 2:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(losses[round_index], response_cross_entropy(round_logits, ids, mask))
    expected = response_cross_entropy(model(input_ids=ids).logits, ids, mask)
    torch.testing.assert_close(response_cross_entropy(clean, ids, mask), expected)
    grads = torch.autograd.grad(losses[1], [p for p in model.parameters()], allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_rounds_give_the_losses_and_gradients_of_rereading_both_copies(name):
    """Oracle: later rounds read only the block copy against round 0's cached clean copy; a checkpointing
    model (no cache) rereads both copies. Losses and every gradient agree, over three rounds."""
    ids, mask = sft_batch()
    runs = []
    for checkpointing in (False, True):
        model = MODELS[name]()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()  # checkpointing acts only in training; dropout off so both runs compute the same
        for dropout in (m for m in model.modules() if isinstance(m, torch.nn.Dropout)):
            dropout.p = 0.0
        losses, _ = block_refine_losses(
            model, ids, mask, fill_id=EOS, block_size=4, num_iterations=3, generator=torch.Generator().manual_seed(2)
        )
        sum(losses).backward()
        runs.append((torch.stack(losses), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for cached, reread in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(cached, reread, atol=1e-5, rtol=1e-4)


def test_block_noise_is_the_same_under_eager_attention():
    ids, mask = sft_batch()
    runs = []
    for implementation in ("sdpa", "eager"):
        model = MODELS["llama"]()
        model.config._attn_implementation = implementation
        generator = torch.Generator().manual_seed(1)
        runs.append(
            torch.stack(block_refine_losses(model, ids, mask, fill_id=EOS, block_size=3, generator=generator)[0])
        )
    torch.testing.assert_close(runs[0], runs[1])


def test_the_export_is_refreshed_after_each_validation_during_fit(tiny_dir, tmp_path):
    module = BlockRefineLM(model_name_or_path=tiny_dir)
    module.configure_model()
    export, out = HFExport(str(tmp_path / "out")), tmp_path / "out"
    for fn, sanity in (("validate", False), ("fit", True)):
        trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), sanity_checking=sanity, is_global_zero=True)
        export.on_validation_end(trainer, module)
        assert not out.exists()
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), sanity_checking=False, is_global_zero=True)
    umask = os.umask(0o022)
    try:
        export.on_validation_end(trainer, module)
    finally:
        os.umask(umask)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {0o644}  # others may read the weights


def test_an_export_replaces_the_previous_one_whole_or_not_at_all(tiny_dir, tmp_path, monkeypatch):
    module = BlockRefineLM(model_name_or_path=tiny_dir)
    module.configure_model()
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier export's file")
    save_hf(module, out)
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.tokenizer, "save_pretrained", full_disk)  # dies after the weights are written
    with pytest.raises(OSError):
        save_hf(module, out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.saving", "out"]  # redone by the next save
    monkeypatch.undo()
    (tmp_path / "link").symlink_to(out)
    save_hf(module, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (out / "model.safetensors").is_file()


def test_a_new_run_does_not_replace_an_earlier_runs_export(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    trainer = SimpleNamespace(is_global_zero=False)
    with pytest.raises(CheckpointError, match="already holds files .* or set its overwrite: true"):
        HFExport(str(out)).on_fit_start(trainer, None)
    HFExport(str(out), overwrite=True).on_fit_start(trainer, None)
    resumed = HFExport(str(out))
    resumed.load_state_dict(HFExport(str(out)).state_dict())  # what Lightning does on --ckpt_path
    resumed.on_fit_start(trainer, None)
    HFExport(str(tmp_path / "new")).on_fit_start(trainer, None)


def test_truncation_policies():
    tokenizer = char_tokenizer()
    rows = [{"prompt": "abcdefgh", "response": "xyz"}]  # BOS + 8 + 3 + EOS = 13 tokens
    with pytest.raises(PromptError, match="3 over max_length=10"):
        SFTDataset(rows, tokenizer, use_chat_template=False, max_length=10, truncation="error", source="t")
    left = SFTDataset(rows, tokenizer, use_chat_template=False, max_length=10, truncation="left", source="t")[0]
    right = SFTDataset(rows, tokenizer, use_chat_template=False, max_length=10, truncation="right", source="t")[0]
    assert tokenizer.decode(left[0]) == "cdefgh" + "xyz</s>" and left[1] == [False] * 6 + [True] * 4
    assert tokenizer.decode(right[0]) == "<s>abcdefgh" + "x" and right[1] == [False] * 9 + [True]
    with pytest.raises(PromptError, match="row 1: truncation='right' to max_length=9 leaves no response tokens"):
        SFTDataset(rows, tokenizer, use_chat_template=False, max_length=9, truncation="right", source="t")


def test_an_unfinished_answer_trains_without_an_eos(tmp_path):
    from dllm_lit.data import read_rows

    tokenizer = char_tokenizer()
    rows = [{"prompt": "ab", "response": "xyz", "finished": False}, {"prompt": "ab", "response": "xyz"}]
    cut, whole = SFTDataset(rows, tokenizer, use_chat_template=False, max_length=16, truncation="error", source="t")
    assert tokenizer.decode(cut[0]) == "<s>abxyz" and cut[1] == [False] * 3 + [True] * 3
    assert tokenizer.decode(whole[0]) == "<s>abxyz</s>" and whole[1] == [False] * 3 + [True] * 4
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "ab", "response": "x", "finished": "no"}) + "\n")
    with pytest.raises(PromptError, match="row 1: 'finished' must be true or false"):
        read_rows(tmp_path / "rows.jsonl")


@pytest.mark.parametrize(
    "response,reference,expected",
    [
        ("so #### 72", "72", True),
        ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
        ("We get 1,234 apples", "1234", True),
        ("0121", "121", False),
        ("x = 5", "#### 6", False),
    ],
)
def test_answer_matching(response, reference, expected):
    assert is_correct(response, reference) is expected


def test_extract_answer_prefers_gsm8k_then_boxed_then_last_number():
    assert extract_answer("3 then 4\n#### 7") == "7"
    assert extract_answer("\\boxed{x^{2}} and 9") == "x^{2}"
    assert extract_answer("3 then 4") == "4"


def cli(args: list[str], cwd: Path):
    return run_dllm_lit(args, cwd, env={"DLLM_LIT_CACHE": str(cwd / "cache")})


def read_metrics(folder: Path) -> list[dict[str, str]]:
    (path,) = folder.rglob("metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short `dllm_lit fit --config configs/train_tiny.yaml` run on a small addition set."""
    work = tmp_path_factory.mktemp("fit")
    write_task("addition", work / "data", train=640, val=6, min_digits=3, max_digits=3)
    done = cli(fit_args(work / "data", work / "logs", work / "exported"), work)
    assert done.returncode == 0, done.stderr[-3000:]
    (work / "stderr.txt").write_text(done.stderr)
    return work


def fit_args(data: Path, logs: Path, export: Path) -> list[str]:
    """`dllm_lit fit --config configs/train_tiny.yaml`, 40 steps on ``data``."""
    return [
        "fit",
        "--config",
        str(ROOT / "configs/train_tiny.yaml"),
        f"--data.train_file={data / 'train.jsonl'}",
        f"--data.val_file={data / 'val.jsonl'}",
        "--data.batch_size=16",
        "--trainer.max_steps=40",
        "--trainer.val_check_interval=20",
        "--trainer.log_every_n_steps=5",
        "--model.warmup_steps=5",
        "--model.learning_rate=0.003",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.callbacks.init_args.output_dir={export}",
    ]


@pytest.mark.slow
def test_fit_keeps_an_earlier_export_and_a_resumed_fit_refreshes_its_own(trained, tmp_path):
    export = tmp_path / "exported"
    shutil.copytree(trained / "exported", export)
    before = (export / "model.safetensors").read_bytes()
    args = fit_args(trained / "data", tmp_path / "logs", export)
    assert_one_line_error(cli(args, tmp_path), f"Export target {export} already holds files")
    assert (export / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "logs").exists(), "refused before the logger made a run folder"
    (ckpt,) = (trained / "logs").rglob("*.ckpt")  # step 40
    resumed = cli([*args, f"--ckpt_path={ckpt}", "--trainer.max_steps=44"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Training: step 44/44" in resumed.stderr
    assert (export / "model.safetensors").read_bytes() != before


@pytest.mark.slow
def test_fit_with_ckpt_path_last_resumes_the_newest_checkpoint_of_earlier_runs(trained, tmp_path):
    shutil.copytree(trained / "logs", tmp_path / "logs")
    (newest,) = (tmp_path / "logs").rglob("*.ckpt")  # step 40, in version_0
    args = fit_args(trained / "data", tmp_path / "logs", tmp_path / "exported")
    resumed = cli([*args, "--ckpt_path=last", "--trainer.max_steps=44"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {newest}" in resumed.stderr
    steps = [line for line in resumed.stderr.splitlines() if line.startswith("Training: step ")]
    assert steps[0].startswith("Training: step 41/44") and steps[-1].startswith("Training: step 44/44")


@pytest.mark.slow
def test_fit_lowers_the_loss_and_logs_validation(trained):
    progress = (trained / "stderr.txt").read_text().splitlines()  # a pipe, not a terminal: plain lines
    assert any(line.startswith("Training: step 40/40 (100 %), ") and "train/loss " in line for line in progress)
    assert sum(line.startswith("Validation: batch 1/1 (100 %)") for line in progress) == 2
    rows = read_metrics(trained / "logs")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    assert all(r.get(f"train/loss_round{k}") for r in rows if r.get("train/loss") for k in (0, 1))
    val = [r for r in rows if r.get("val/accuracy")]
    assert len(val) == 2
    assert all(
        0 <= float(r["val/accuracy"]) <= 1 and float(r["val/tokens_per_forward"]) > 0 and float(r["val/forwards"]) >= 1
        for r in val
    )


@pytest.mark.slow
def test_checkpoint_round_trips_to_predict(trained, dllm_lit_here, monkeypatch):
    monkeypatch.setenv("DLLM_LIT_CACHE", str(trained / "cache"))
    (ckpt,) = (trained / "logs").rglob("*.ckpt")
    export_checkpoint(ckpt, trained / "from_ckpt")
    outputs = {}
    for name, args in {
        "exported": [f"--model.model_name_or_path={trained / 'exported'}"],
        "from_ckpt": [f"--model.model_name_or_path={trained / 'from_ckpt'}"],
        "ckpt_path": [f"--ckpt_path={ckpt}"],  # the base model (tiny-char) comes from the checkpoint
    }.items():
        out = trained / f"{name}.jsonl"
        done = dllm_lit_here(
            [
                "predict",
                *args,
                f"--data.prompts_file={trained / 'data/val.jsonl'}",
                "--model.add_eos_length=3",
                "--model.max_new_tokens=8",
                f"--writer.output_file={out}",
            ],
            trained,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = [json.loads(line)["response"] for line in out.read_text().splitlines()]
    assert outputs["exported"] == outputs["from_ckpt"] == outputs["ckpt_path"]
    fresh = trained / "fresh.jsonl"
    dllm_lit_here(
        [
            "predict",
            "--model.model_name_or_path=tiny-char",
            f"--data.prompts_file={trained / 'data/val.jsonl'}",
            "--model.add_eos_length=3",
            "--model.max_new_tokens=8",
            f"--writer.output_file={fresh}",
        ],
        trained,
    )
    assert [json.loads(line)["response"] for line in fresh.read_text().splitlines()] != outputs["exported"]


@pytest.mark.slow
def test_validation_under_ddp_counts_each_sample_once(trained):
    """5 rows, 2 of them answered correctly by construction: accuracy 0.4 on 1 or 2 processes."""
    predicted = [json.loads(line) for line in (trained / "exported.jsonl").read_text().splitlines()][:5]
    rows = [
        {"prompt": r["prompt"], "answer": r["response"] if i < 2 else "no such answer"} for i, r in enumerate(predicted)
    ]
    val = trained / "val5.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for devices in ("1", "2"):
        logs = trained / f"val_logs_{devices}"
        done = cli(
            [
                "validate",
                f"--model.model_name_or_path={trained / 'exported'}",
                f"--data.val_file={val}",
                "--model.add_eos_length=3",
                "--model.max_new_tokens=8",
                "--data.batch_size=2",
                "--trainer.accelerator=cpu",
                f"--trainer.devices={devices}",
                *(["--trainer.strategy=ddp"] if devices == "2" else []),
                "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.save_dir={logs}",
            ],
            trained,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (row,) = [r for r in read_metrics(logs) if r.get("val/accuracy")]
        assert float(row["val/accuracy"]) == pytest.approx(0.4)


def test_parquet_and_chat_rows_train_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dllm_lit.data import read_rows

    rows = [{"prompt": "12+34=", "response": "46"}, {"prompt": "5+5=", "response": "01"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert read_rows(tmp_path / "train.parquet") == rows
    tokenizer = char_tokenizer()
    chat = [{"messages": [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "46"}]}]
    ((ids, mask),) = SFTDataset(chat, tokenizer, use_chat_template=False, max_length=64, truncation="error", source="t")
    assert tokenizer.decode(ids) == "<s><|user|>12+34=\n<|assistant|>46</s>"
    assert [tokenizer.decode([t]) for t, m in zip(ids, mask) if m] == ["4", "6", "</s>"]


@pytest.mark.parametrize("name", ["train_file", "val_file"])
def test_a_missing_training_file_is_named_by_its_flag(name, tiny_dir, tmp_path):
    from dllm_lit.data import DataModule

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1+2=", "response": "3"}) + "\n")
    files = {"train_file": str(train), "val_file": str(train), name: str(tmp_path / "missing.jsonl")}
    with pytest.raises(PromptError, match=rf"^--data.{name} .*missing.jsonl does not exist.$"):
        DataModule(**files, model_name_or_path=tiny_dir).setup("fit")


def test_a_list_of_train_files_trains_on_every_files_rows(tiny_dir, tmp_path):
    from dllm_lit.data import DataModule

    files = []
    for name, rows in (("a", [{"prompt": "1+2=", "response": "3"}]), ("b", [{"prompt": "4+4=", "response": "8"}] * 2)):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))

    def encoded(train_file):
        data = DataModule(train_file=train_file, model_name_or_path=tiny_dir)
        data.setup("fit")
        return [ids for ids, _mask in data.datasets["train"]]

    both = encoded([str(path) for path in files])
    assert len(both) == 3 and both == encoded(str(files[0])) + encoded(str(files[1]))
    assert both[0] != both[1] == both[2]


def test_group_by_length_batches_rows_of_similar_length_and_keeps_every_row(tiny_dir, tmp_path):
    from dllm_lit.data import DataModule

    path = tmp_path / "train.jsonl"
    lengths = [1 + n % 64 for n in range(320)]
    path.write_text("".join(json.dumps({"prompt": "q", "response": "7" * n}) + "\n" for n in lengths))

    def epoch(group_by_length):
        torch.manual_seed(0)
        data = DataModule(
            train_file=str(path), batch_size=8, group_by_length=group_by_length, model_name_or_path=tiny_dir
        )
        data.setup("fit")
        return list(data.train_dataloader())

    grouped, shuffled = epoch(True), epoch(False)
    responses = sorted(int(n) for batch in grouped for n in batch["response_mask"].sum(1))
    assert responses == sorted(n + 1 for n in lengths), "every row once (its response and EOS)"
    size = lambda batches: sum(batch["input_ids"].numel() for batch in batches)  # noqa: E731
    assert size(grouped) < 0.7 * size(shuffled)
    widths = [batch["input_ids"].shape[1] for batch in grouped]
    assert widths[0] == max(widths), "the longest batch comes first"


@pytest.mark.slow
def test_lossless_beats_the_exact_block_mode_on_a_refine_trained_model(trained):
    """Both give the model's greedy answers; lossless needs fewer forwards per token. The answers
    (4 digits + EOS) are longer than the window of 4: the exact block mode pays a confirming pass for
    each block, while lossless accepts the next block's first token in the pass that verifies the
    last one."""
    from dllm_lit import generate_blocks
    from dllm_lit.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(trained / "exported")), load_tokenizer(str(trained / "exported"))
    rows = [json.loads(line) for line in (trained / "data/val.jsonl").read_text().splitlines()]
    results = {}
    for name, settings in (("exact", dict(refine_iter=4)), ("lossless", dict(lossless=True))):
        results[name] = [
            generate_blocks(
                model,
                tokenizer(row["prompt"], return_tensors="pt").input_ids,
                add_eos_length=3,
                max_new_tokens=16,
                eos_token_id=tokenizer.eos_token_id,
                **settings,
            ).rows[0]
            for row in rows
        ]
    assert [r.token_ids for r in results["lossless"]] == [r.token_ids for r in results["exact"]]
    speed = {name: sum(r.num_generated for r in rs) / sum(r.forwards for r in rs) for name, rs in results.items()}
    assert speed["lossless"] > max(speed["exact"], 1.0), speed


@pytest.mark.slow
def test_a_lora_fit_lowers_the_loss_and_its_adapter_round_trips(tiny_dir, tmp_path, monkeypatch, capsys):
    """LoRA (peft) with the autoregressive loss term: the loss falls, the export is a small adapter
    that names its base, and loading it (merged at load) gives the trained model's logits and answers."""
    from safetensors.torch import load_file

    from dllm_lit import cli as dllm_cli
    from dllm_lit import generate_blocks
    from dllm_lit.models import load_model, load_tokenizer

    monkeypatch.setenv("DLLM_LIT_CACHE", str(tmp_path / "cache"))
    write_task("addition", tmp_path / "data", train=256, val=4, min_digits=2, max_digits=2)
    adapter = tmp_path / "adapter"
    fitted = dllm_cli.DllmCLI(
        args=[
            "fit",
            "--config",
            str(ROOT / "configs/train_tiny.yaml"),
            f"--model.model_name_or_path={tiny_dir}",
            "--model.lora_rank=8",
            "--model.ar_loss_weight=0.5",
            "--model.noise_layout=blocks",
            "--model.gradient_checkpointing=true",
            "--model.learning_rate=0.01",
            "--model.warmup_steps=2",
            f"--data.train_file={tmp_path / 'data/train.jsonl'}",
            f"--data.val_file={tmp_path / 'data/val.jsonl'}",
            "--data.batch_size=16",
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=15",
            "--trainer.log_every_n_steps=5",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--trainer.callbacks.init_args.output_dir={adapter}",
        ]
    ).model.model.eval()  # the trained PeftModel, adapter not merged
    trainable, total = fitted.get_nb_trainable_parameters()  # peft's own count
    said = capsys.readouterr().err
    assert f"Training {trainable:,} of {total:,} parameters" in said and "LoRA rank 8" in said
    assert f"Exported: dllm_lit predict --model.model_name_or_path {adapter}" in said
    rows = read_metrics(tmp_path / "logs")
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    assert any(r.get("train/loss_ar") for r in rows) and any(r.get("val/agreement") for r in rows)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_dir and not (adapter / "config.json").exists()
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)

    base, merged = load_model(tiny_dir), load_model(str(adapter))
    ids = load_tokenizer(str(adapter))("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-3), "the adapter changes the model"
        assert torch.allclose(fitted(input_ids=ids).logits, merged(ids).logits, atol=1e-5)
    answers = [
        generate_blocks(m, ids, eos_token_id=EOS, add_eos_length=3, max_new_tokens=12).rows[0].token_ids
        for m in (fitted, merged)
    ]
    assert answers[0] == answers[1] and answers[0]

    (ckpt,) = (tmp_path / "logs").rglob("*.ckpt")  # the adapter alone; exported, the same model again
    assert all("lora_" in name for name in torch.load(ckpt, weights_only=True)["state_dict"])
    exported = load_model(str(export_checkpoint(ckpt, tmp_path / "exported")))
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, merged(ids).logits, atol=1e-5)
    responses = {}  # predict with the checkpoint alone (its base and LoRA rank come from it) = the adapter
    for name, source in (("ckpt", [f"--ckpt_path={ckpt}"]), ("adapter", [f"--model.model_name_or_path={adapter}"])):
        out = tmp_path / f"{name}.jsonl"
        args = ["predict", *source, "--data.prompt=12+34=", "--model.add_eos_length=3", f"--writer.output_file={out}"]
        done = run_dllm_lit(args, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        responses[name] = json.loads(out.read_text())["response"]
    assert responses["ckpt"] == responses["adapter"]


def test_a_lora_checkpoint_holds_the_adapter_alone_and_loads_back(tiny_dir):
    """The base model's weights stay out of a LoRA fit's checkpoint; loading it back restores the
    adapter, and an adapter of another rank is one sentence, not a silent partial load."""

    def module(rank: int) -> BlockRefineLM:
        made = BlockRefineLM(model_name_or_path=tiny_dir, lora_rank=rank)
        made.configure_model()
        return made

    trained = module(4)
    with torch.no_grad():
        for name, weight in trained.named_parameters():
            if "lora_B" in name:
                weight.normal_(generator=torch.Generator().manual_seed(len(name)))
    checkpoint = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    assert saved and set(saved) == {name for name in trained.state_dict() if "lora_" in name}

    loaded = module(4)
    loaded.on_load_checkpoint(checkpoint)
    loaded.load_state_dict(saved, strict=loaded.strict_loading)
    for name, weight in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], weight, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"adapter does not fit .* with lora_rank=8: give the base model"):
        module(8).on_load_checkpoint(checkpoint)
    renamed = {"state_dict": {f"wrapped.{name}": weight for name, weight in trained.state_dict().items()}}
    trained.on_save_checkpoint(renamed)  # names not the module's own: every weight kept, loaded strictly
    assert len(renamed["state_dict"]) == len(trained.state_dict()) and "adapter_only" not in renamed


def save_random_adapter(tiny_dir: str, directory: Path):
    """A rank-4 LoRA adapter on ``tiny_dir`` with random (nonzero) B matrices, saved to ``directory``."""
    from dllm_lit.adapters import add_lora
    from dllm_lit.models import load_model

    torch.manual_seed(0)  # lora_A's initialisation: not the earlier tests' random state
    adapted = add_lora(load_model(tiny_dir), 4, None, 0.0, base_name=tiny_dir)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    adapted.save_pretrained(directory)
    return adapted


def test_lora_on_an_adapter_trains_that_adapter_further_on_its_base(tiny_dir, tmp_path):
    """``fit`` from an adapter with ``lora_rank`` starts from it (the merged adapter's logits), trains only
    its weights and saves an adapter on the same base; another rank is one sentence."""
    from dllm_lit.adapters import AdapterError
    from dllm_lit.models import load_model

    save_random_adapter(tiny_dir, tmp_path / "first")
    module = BlockRefineLM(model_name_or_path=str(tmp_path / "first"), lora_rank=4)
    module.configure_model()
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        merged = load_model(str(tmp_path / "first"))(ids).logits
        torch.testing.assert_close(module.model.eval()(input_ids=ids).logits, merged, atol=1e-5, rtol=1e-5)
    assert set(module._trainable_shapes()) == {n for n, _ in module.named_parameters() if "lora_" in n}
    module.model.save_pretrained(tmp_path / "second")
    assert json.loads((tmp_path / "second/adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir
    with pytest.raises(AdapterError, match="has LoRA rank 4: train it further with --model.lora_rank 4"):
        BlockRefineLM(model_name_or_path=str(tmp_path / "first"), lora_rank=8).configure_model()


def test_the_base_target_scores_the_adapter_against_the_base_model_with_its_adapter_off(tiny_dir, tmp_path):
    """``ar_loss_target: base``: the clean rows' loss is KL(base || model), the base being an independently
    loaded base model and the model the merged adapter; only the adapter gets a gradient, and it is
    switched on again after the teacher's pass. A fresh adapter (B = 0) scores 0 there, not with ``data``."""
    from dllm_lit.models import load_model

    save_random_adapter(tiny_dir, tmp_path / "first")
    ids, mask = sft_batch()
    with torch.no_grad():
        base = load_model(tiny_dir)(input_ids=ids).logits[:, :-1][mask[:, 1:]].log_softmax(-1)
        merged = load_model(str(tmp_path / "first"))(input_ids=ids).logits[:, :-1][mask[:, 1:]].log_softmax(-1)
    expected = (base.exp() * (base - merged)).sum(-1).mean()
    module = BlockRefineLM(model_name_or_path=str(tmp_path / "first"), lora_rank=4, ar_loss_target="base")
    module.configure_model()
    logits = module.model(input_ids=ids).logits
    loss = module.autoregressive_loss(logits, ids, mask)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    assert expected > 0.01
    loss.backward()
    graded = {name for name, weight in module.named_parameters() if weight.grad is not None and weight.grad.any()}
    assert graded and all("lora_" in name for name in graded)
    with torch.no_grad():
        torch.testing.assert_close(module.model(input_ids=ids).logits, logits.detach())  # adapter on again

    fresh = BlockRefineLM(model_name_or_path=tiny_dir, lora_rank=4, ar_loss_target="base")
    fresh.configure_model()
    data = BlockRefineLM(model_name_or_path=tiny_dir, lora_rank=4)
    data.configure_model()
    with torch.no_grad():
        assert fresh.autoregressive_loss(fresh.model(input_ids=ids).logits, ids, mask).abs() < 1e-6
        assert data.autoregressive_loss(data.model(input_ids=ids).logits, ids, mask) > 1.0


def test_the_shipped_adapter_alias_loads_offline_merged_onto_its_base(tiny_dir, tmp_path, monkeypatch):
    """``smollm2-fast`` is an adapter in the package: it resolves without a hub, merged at load."""
    from dllm_lit import models

    with pytest.raises(models.ModelLoadError, match="does not ship the 'smollm2-fast' adapter yet"):
        monkeypatch.setattr(models, "WEIGHTS", tmp_path / "none")
        models.load_model(models.FAST_MODEL)
    adapted = save_random_adapter(tiny_dir, tmp_path / "weights" / models.FAST_MODEL)
    monkeypatch.setattr(models, "WEIGHTS", tmp_path / "weights")
    ids = models.load_tokenizer(models.FAST_MODEL)("12+34=", return_tensors="pt").input_ids
    with torch.no_grad():
        shipped = models.load_model(models.FAST_MODEL)(ids).logits
        torch.testing.assert_close(shipped, adapted.eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(shipped, models.load_model(tiny_dir)(ids).logits, atol=1e-3)


def test_an_adapter_on_an_aliased_base_exports_without_peft_looking_for_the_base(tiny_dir, tmp_path):
    """peft's default save looks for the base's config to see if the vocabulary grew; an alias such as
    ``smollm2`` is not a path, so it warned on every export. LoRA never resizes the vocabulary."""
    from dllm_lit.adapters import add_lora
    from dllm_lit.export import save_hf
    from dllm_lit.models import load_model, load_tokenizer

    adapted = add_lora(load_model(tiny_dir), 4, None, 0.0, base_name="smollm2")
    module = SimpleNamespace(model=adapted, tokenizer=load_tokenizer(tiny_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_hf(module, tmp_path / "exported")
    saved = json.loads((tmp_path / "exported/adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "smollm2" and (tmp_path / "exported/adapter_model.safetensors").is_file()


def test_gradients_are_clipped_by_norm_under_fsdp(tiny_dir, monkeypatch):
    """Lightning's FSDP precision refuses clipping by norm; the module clips through FSDP's own
    ``clip_grad_norm_``: the same gradients as ``clip_grad_norm_`` on the unwrapped model."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        module = BlockRefineLM(model_name_or_path=tiny_dir)
        module.configure_model()
        plain = copy.deepcopy(module.model)
        sharded = FullyShardedDataParallel(module.model, device_id=torch.device("cpu"), use_orig_params=True)
        ids = torch.randint(3, 50, (2, 9))
        for network in (plain, sharded):
            network(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.01)
        module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=sharded))
        module.configure_gradient_clipping(None, 0.01, "norm")
        clipped = {name.replace("_fsdp_wrapped_module.", ""): p.grad for name, p in sharded.named_parameters()}
        for name, parameter in plain.named_parameters():
            torch.testing.assert_close(clipped[name], parameter.grad)
    finally:
        torch.distributed.destroy_process_group()
