"""Runs as a scheduler sees them: interrupted, killed, resumed, run twice at once, failing, on two
processes; and checkpoints that must never run code. Everything drives the real `dllm_lit` command.

Oracles: an uninterrupted run of the same command, and the file as it was before the run.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, predict_args, start_dllm_lit, wait_for_rows, write, write_forty_prompts
from dllm_lit.module import BlockRefineLM
from dllm_lit.outputs import fingerprint_difference, run_fingerprint
from dllm_lit.sampling import SAMPLING_SCHEME
from dllm_lit.settings import DEFAULTS
from dllm_lit.tasks import write_task

pytestmark = pytest.mark.slow

FAST = ["--model.add_eos_length=3", "--model.refine_iter=2", "--model.max_new_tokens=12"]


def start_run(model_dir: str, cwd: Path, out: Path, prompts: Path, *extra: str):
    return start_dllm_lit(predict_args(model_dir, out, prompts, *extra), cwd)


def saved_rows(parts: Path) -> list[dict]:
    return [json.loads(line) for p in parts.glob("rank*.jsonl") for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory) -> Path:
    """The uninterrupted result of the run the tests interrupt (the same forty prompts, decoded once)."""
    where = tmp_path_factory.mktemp("reference")
    path = where / "reference.jsonl"
    assert start_run(tiny_dir, where, path, write_forty_prompts(where)).wait() == 0
    return path


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_dir, tmp_path, forty_prompts, reference):
    out, parts = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.parts"
    run = start_run(tiny_dir, tmp_path, out, forty_prompts)
    wait_for_rows(parts, 6)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert 6 <= len(saved_rows(parts)) < 40  # every line is complete JSON; what was finished is there
    resumed = start_run(tiny_dir, tmp_path, out, forty_prompts, "--writer.resume=true")
    _, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    assert out.read_text() == reference.read_text()
    assert not parts.exists() and not (tmp_path / ".out.jsonl.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_rerun_keeps_the_old_file_and_resume_finishes(tiny_dir, tmp_path, forty_prompts, reference, sig):
    out, parts = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.parts"
    write(out, "the finished result of an earlier run\n")
    run = start_run(tiny_dir, tmp_path, out, forty_prompts, "--writer.overwrite=true")
    wait_for_rows(parts, 4)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "rerun the same command with --writer.resume true" in stderr
    assert out.read_text() == "the finished result of an earlier run\n"
    kept = saved_rows(parts)
    assert 4 <= len(kept) < 40
    resumed = start_run(tiny_dir, tmp_path, out, forty_prompts, "--writer.resume=true")
    assert resumed.wait() == 0
    assert out.read_text() == reference.read_text()
    final = {json.loads(line)["index"]: json.loads(line) for line in out.read_text().splitlines()}
    assert all(final[row["index"]] == row for row in kept)


def test_sigterm_stops_every_rank_of_a_two_process_run(tiny_dir, tmp_path, forty_prompts, reference):
    out, parts = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.parts"
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    run = start_run(tiny_dir, tmp_path, out, forty_prompts, *ddp)
    wait_for_rows(parts, 4)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode != 0 and not out.exists()
    assert "--writer.resume true" in stderr
    resumed = start_run(tiny_dir, tmp_path, out, forty_prompts, *ddp, "--writer.resume=true")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert out.read_text() == reference.read_text()


def test_a_run_destroys_its_process_group_before_it_exits(tiny_dir, tmp_path, dllm_lit_here):
    """A Gloo group alive at interpreter exit sometimes aborts a finished run (SIGABRT, exit -6)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        done = dllm_lit_here(["predict", f"--model.model_name_or_path={tiny_dir}", "--data.prompt=hi", *FAST], tmp_path)
        assert done.returncode == 0 and not torch.distributed.is_initialized(), done.stderr
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_second_run_on_the_same_output_is_refused(tiny_dir, tmp_path, dllm_lit_here):
    prompts = write(tmp_path / "many.txt", "".join(f"prompt {i}\n" for i in range(2000)))  # a long first run
    out, parts = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.parts"
    first = start_run(tiny_dir, tmp_path, out, prompts)
    wait_for_rows(parts, 2)
    second = dllm_lit_here(predict_args(tiny_dir, out, prompts, "--writer.overwrite=true"), tmp_path)
    assert_one_line_error(second, "is being written by another dllm_lit run (PID", str(first.pid))
    assert first.poll() is None, "the first run must still be running"
    before = len(saved_rows(parts))
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=300)
    assert "finished responses are kept" in stderr and len(saved_rows(parts)) >= before > 0


def test_resume_refuses_rows_of_another_run(tiny_dir, tmp_path, forty_prompts, dllm_lit_here):
    out, parts = tmp_path / "out.jsonl", tmp_path / ".out.jsonl.parts"
    run = start_run(tiny_dir, tmp_path, out, forty_prompts)
    wait_for_rows(parts, 4)
    run.send_signal(signal.SIGKILL)
    run.wait()
    kept = sorted(map(json.dumps, saved_rows(parts)))
    other = write(tmp_path / "other.txt", "".join(f"another prompt {i}\n" for i in range(40)))
    three = write(tmp_path / "three.txt", "a\nb\nc\n")
    template = write(tmp_path / "t.jinja", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cases = [
        (other, [], "different prompts (row 0 and 39 more)"),
        (three, [], "different prompts (40 then, 3 now)"),
        (forty_prompts, ["--model.refine_iter=3"], "different decoding settings (refine_iter 2 -> 3"),
        (forty_prompts, ["--model.model_name_or_path=tiny-char"], "a different model"),
        (forty_prompts, [f"--data.chat_template={template}"], "different data settings (chat_template None -> '"),
    ]
    for prompts, extra, fragment in cases:
        done = dllm_lit_here(predict_args(tiny_dir, out, prompts, *extra, "--writer.resume=true"), tmp_path)
        assert_one_line_error(done, f"Cannot resume {out}", fragment, "--writer.overwrite true")
    assert sorted(map(json.dumps, saved_rows(parts))) == kept and not out.exists()


def test_resume_and_overwrite_say_what_they_would_do(tiny_dir, tmp_path, dllm_lit_here):
    prompts = write(tmp_path / "p.txt", "one\ntwo\n")
    out = tmp_path / "out.jsonl"
    args = predict_args(tiny_dir, out, prompts)
    assert dllm_lit_here([*args, "--writer.resume=true"], tmp_path).returncode == 0  # nothing to resume: a fresh run
    finished = out.read_text()
    assert_one_line_error(dllm_lit_here(args, tmp_path), f"Output file {out} exists", "--writer.overwrite true")
    assert_one_line_error(dllm_lit_here([*args, "--writer.resume=true"], tmp_path), "Nothing to resume")
    assert out.read_text() == finished


def test_a_failing_run_leaves_the_output_as_it_was(tiny_dir, tmp_path, dllm_lit_here):
    import shutil

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    prompts = write(tmp_path / "p.txt", "one\ntwo\n")
    out = write(tmp_path / "out.jsonl", "finished rows\n")
    done = dllm_lit_here(predict_args(str(no_weights), out, prompts, "--writer.overwrite=true"), tmp_path)
    assert_one_line_error(done, "Could not load model weights")
    bad_stop = dllm_lit_here(
        predict_args(tiny_dir, out, prompts, "--writer.overwrite=true", "--model.stop_token_ids=[9999]"), tmp_path
    )
    assert_one_line_error(bad_stop, "outside the model's vocabulary")
    assert out.read_text() == "finished rows\n"
    new = tmp_path / "new.jsonl"
    assert_one_line_error(dllm_lit_here(predict_args(str(no_weights), new, prompts), tmp_path), "Could not load")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_weights", "out.jsonl", "p.txt"]


def test_a_symlinked_output_keeps_its_link(tiny_dir, tmp_path, dllm_lit_here):
    prompts = write(tmp_path / "p.txt", "one\ntwo\n")
    (tmp_path / "results").mkdir()
    target = write(tmp_path / "results" / "latest.jsonl", "old\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    assert dllm_lit_here(predict_args(tiny_dir, link, prompts, "--writer.overwrite=true"), tmp_path).returncode == 0
    assert link.is_symlink() and len(target.read_text().splitlines()) == 2


def test_concurrent_runs_with_different_outputs_do_not_collide(tiny_dir, tmp_path, forty_prompts):
    runs = [start_run(tiny_dir, tmp_path, tmp_path / f"run{i}.jsonl", forty_prompts) for i in range(2)]
    assert [run.wait() for run in runs] == [0, 0]
    first, second = ((tmp_path / f"run{i}.jsonl").read_text().splitlines() for i in range(2))
    assert len(first) == 40 and first == second


SAMPLED = ["--model.temperature=1.2", "--model.seed=5"]


@pytest.mark.parametrize(
    "count,batch,sampling",
    [(7, 2, []), (1, 2, []), (3, 16, []), (7, 3, SAMPLED)],
    ids=["uneven", "one-rank-empty", "big-batch", "sampled"],
)
def test_two_processes_match_one(tiny_dir, tmp_path, count, batch, sampling, dllm_lit, dllm_lit_here):
    """Also when sampling: prompt i samples with seed + i, whichever process and batch it lands in.
    The one-process run is this process (seconds sooner); the two-process one is the command."""
    prompts = write(tmp_path / "p.txt", "".join(f"q{i} {'y' * i}\n" for i in range(count)))
    outputs = {}
    for devices, run in ((1, dllm_lit_here), (2, dllm_lit)):
        out = tmp_path / f"out{devices}.jsonl"
        ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"] if devices == 2 else []
        args = [*predict_args(tiny_dir, out, prompts, *FAST, *sampling, f"--data.batch_size={batch}")]
        args.append("--trainer.accelerator=cpu")
        done = run([*args, *ddp], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[devices] = out.read_text()
    assert outputs[1] == outputs[2]
    assert [json.loads(line)["index"] for line in outputs[2].splitlines()] == list(range(count))


class _Payload:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def served(tmp_path):
    """A localhost HTTP server over ``tmp_path/www``; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def test_checkpoints_never_run_code(tiny_dir, tmp_path, served, dllm_lit_here):
    url, root = served
    marker = tmp_path / "code-ran"
    module = BlockRefineLM(model_name_or_path=tiny_dir)
    module.configure_model()
    evil = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {"model_name_or_path": tiny_dir},
        "payload": _Payload(marker),
    }
    torch.save(evil, root / "evil.ckpt")
    torch.load(root / "evil.ckpt", weights_only=False)  # the payload is real: a plain load runs it
    assert marker.exists()
    marker.unlink()
    for ckpt in (f"{url}/evil.ckpt", str(root / "evil.ckpt")):
        done = dllm_lit_here(
            ["predict", f"--ckpt_path={ckpt}", f"--model.model_name_or_path={tiny_dir}", "--data.prompt=hi", *FAST],
            tmp_path,
        )
        assert_one_line_error(done, "Checkpoint", "remote" if "://" in ckpt else "refused")
        export = dllm_lit_here([ckpt, str(tmp_path / "hf")], tmp_path, module="dllm_lit.export")
        assert_one_line_error(export, "Checkpoint", prefix="dllm_lit.export: error:")
    assert not marker.exists()


@pytest.fixture
def good_checkpoint(tiny_dir, tmp_path) -> Path:
    module = BlockRefineLM(model_name_or_path=tiny_dir)
    module.configure_model()
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.mark.parametrize(
    "source,target,fragment",
    [
        ("missing.ckpt", "hf", "does not exist"),
        (".", "hf", "is a directory"),
        ("garbage.ckpt", "hf", "is not a PyTorch file of weights"),
        ("good.ckpt", "a_file", "is a file"),
        ("good.ckpt", "full_dir", "is not empty"),
        ("good.ckpt", "/proc/hf", "Cannot write the export"),
    ],
)
def test_export_errors_are_one_line(good_checkpoint, tmp_path, dllm_lit_here, source, target, fragment):
    write(tmp_path / "garbage.ckpt", b"not a checkpoint")
    write(tmp_path / "a_file", "x")
    (tmp_path / "full_dir").mkdir()
    write(tmp_path / "full_dir" / "x", "x")
    done = dllm_lit_here([source, target], tmp_path, module="dllm_lit.export")
    assert_one_line_error(done, fragment, prefix="dllm_lit.export: error:")


def test_export_round_trips_a_checkpoint(good_checkpoint, tiny_dir, tmp_path, dllm_lit_here):
    done = dllm_lit_here([str(good_checkpoint), "hf"], tmp_path, module="dllm_lit.export")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "config.json").is_file()
    prompts = write(tmp_path / "p.txt", "one\ntwo\n")
    outputs = []
    for model_dir in (tiny_dir, str(tmp_path / "hf")):
        out = tmp_path / f"{len(outputs)}.jsonl"
        assert dllm_lit_here(predict_args(model_dir, out, prompts, *FAST), tmp_path).returncode == 0
        outputs.append([json.loads(line)["response"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1]


def test_fit_never_writes_into_the_working_directory(tiny_dir, tmp_path, dllm_lit):
    write_task("addition", tmp_path / "data", train=32, val=2, min_digits=2, max_digits=2)
    write(tmp_path / "config.yaml", "a file of the user's\n")
    done = dllm_lit(
        [
            "fit",
            f"--model.model_name_or_path={tiny_dir}",
            f"--data.train_file={tmp_path}/data/train.jsonl",
            "--data.batch_size=8",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--model.warmup_steps=1",
            "--trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "config.yaml").read_text() == "a file of the user's\n"
    assert (tmp_path / "checkpoints" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml", "data"]


def test_resume_takes_settings_added_since_at_their_defaults_but_no_rows_sampled_another_way():
    """A run interrupted before a version added settings resumes when they are at their defaults; a
    sampled run recorded before keyed sampling does not (its rows were drawn another way)."""
    rows = [{"prompt": "a"}]
    now = run_fingerprint(rows, data={}, decoding={**asdict(DEFAULTS), "precision": "32"}, model={})
    earlier = json.loads(json.dumps(now))
    for added in ("repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"):
        del earlier["decoding"][added]
    assert fingerprint_difference(earlier, now) is None
    penalized = {**asdict(DEFAULTS.replace(presence_penalty=1.0)), "precision": "32"}
    changed = run_fingerprint(rows, data={}, decoding=penalized, model={})
    assert "presence_penalty None -> 1.0" not in fingerprint_difference(earlier, changed)
    assert "presence_penalty 0.0 -> 1.0" in fingerprint_difference(earlier, changed)
    sampled = {**asdict(DEFAULTS.replace(temperature=1.0)), "precision": "32"}
    before = run_fingerprint(rows, data={}, decoding=sampled, model={})
    keyed = run_fingerprint(rows, data={}, decoding={**sampled, "sampling": SAMPLING_SCHEME}, model={})
    assert "sampling None -> " in fingerprint_difference(before, keyed)
