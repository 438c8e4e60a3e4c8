"""Bad input through the `dllm_lit` command (in-process for speed; two cases as a real subprocess), and
running out of memory.

Every bad input must give one line on stderr, exit code 2, no traceback and no output file.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch

from conftest import assert_one_line_error, write
from dllm_lit.module import BlockRefineLM

FAST = ["--model.add_eos_length=3", "--model.refine_iter=2", "--model.max_new_tokens=12"]


@pytest.fixture
def messy(tmp_path) -> Path:
    """A folder of bad prompt files."""
    write(tmp_path / "latin1.txt", "caf\xe9\n".encode("latin-1"))
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "blank.txt", "\n  \n\t\n")
    write(tmp_path / "broken.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n')
    write(tmp_path / "noprompt.jsonl", '{"prompt": "a"}\n{"question": "b"}\n')
    write(tmp_path / "badmessages.jsonl", '{"messages": [{"role": "user"}]}\n')
    write(tmp_path / "long.txt", "short\n" + "x" * 300 + "\nalso short\n")
    write(tmp_path / "bad.yaml", "model: [unclosed\n")
    write(tmp_path / "unknown.yaml", "model:\n  refine_iterations: 2\n")
    write(tmp_path / "assistant_only.jsonl", '{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    write(tmp_path / "surrogate.jsonl", '{"prompt": "a\\ud800b"}\n')
    write(tmp_path / "prompts.xlsx", b"PK")
    write(tmp_path / "no_prompt.csv", "question,answer\nhi,1\n")
    write(tmp_path / "garbage.ckpt", b"not a checkpoint")
    for name, column in (("timestamps", [datetime.datetime(2026, 1, 1)]), ("bytes", [b"\x00"])):
        pyarrow.parquet.write_table(pyarrow.table({"prompt": ["hi"], "extra": column}), tmp_path / f"{name}.parquet")
    (tmp_path / "a_dir").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--data.prompts_file=missing.txt"], ["Prompts file missing.txt does not exist."]),
        (["--data.prompts_file=/proc/self/mem"], ["/proc/self/mem cannot be read"]),
        (["--data.prompts_file=a_dir"], ["a_dir is a directory"]),
        (["--data.prompts_file=latin1.txt"], ["latin1.txt is not UTF-8 text"]),
        (["--data.prompts_file=empty.txt"], ["empty.txt has no prompts."]),
        (["--data.prompts_file=blank.txt"], ["blank.txt has no prompts."]),
        (["--data.prompts_file=broken.jsonl"], ["broken.jsonl, line 2: not valid JSON"]),
        (["--data.prompts_file=noprompt.jsonl"], ["noprompt.jsonl, row 2: each row needs a 'prompt'"]),
        (["--data.prompts_file=badmessages.jsonl"], ["row 1: 'messages' must be a list of"]),
        (
            ["--data.prompts_file=long.txt", "--model.max_length=100"],
            ["Prompt 1 has 301 tokens, 202 too many for max_length=100", "--data.skip_long_prompts true"],
        ),
        (["--data.prompt=hi", "--model.refine_iter=0"], ["--model.refine_iter must be at least 1, got 0."]),
        (["--data.prompt=hi", "--model.refine_iter=-3"], ["--model.refine_iter must be at least 1, got -3."]),
        (["--data.prompt=hi", "--model.add_eos_length=-1"], ["--model.add_eos_length must be at least 0"]),
        (["--data.prompt=hi", "--model.max_new_tokens=0"], ["--model.max_new_tokens must be at least 1"]),
        (["--data.prompt=hi", "--model.max_length=1"], ["--model.max_length must be at least 2"]),
        (["--data.prompt=hi", "--config=unknown.yaml"], ["does not accept option 'model.refine_iterations'"]),
        (["--data.prompt=hi", "--config=bad.yaml"], ["Problems parsing config"]),
        (["--data.prompt=hi", "--data.prompts_file=x.txt"], ["Give exactly one of", "got prompt and prompts_file"]),
        ([], ["Give exactly one of", "(got none)"]),
        (["--data.prompt=hi", "--summary.max_display=-1"], ["--summary.max_display must be 0 or above, got -1."]),
        (["--data.prompt=hi", "--writer.output_file=a_dir"], ["Output file a_dir is a directory"]),
        (["--data.prompt=hi", "--writer.output_file=empty.txt/out.jsonl"], ["Cannot write the output file"]),
        (["--data.prompt=hi", "--writer.output_file=/proc/out.jsonl"], ["Cannot write the output file"]),
        (["--data.prompts_file=assistant_only.jsonl"], ["row 1: 'messages' holds only the assistant's reply"]),
        (["--data.prompts_file=surrogate.jsonl"], ["row 1: field 'prompt' is not valid Unicode"]),
        (["--data.prompts_file=timestamps.parquet"], ["row 1: field 'extra' cannot be written as JSON (datetime)"]),
        (["--data.prompts_file=bytes.parquet"], ["row 1: field 'extra' cannot be written as JSON (bytes)"]),
        (["--data.prompts_file=prompts.xlsx"], ["has an unknown kind (.xlsx)", ".csv"]),
        (["--data.prompts_file=no_prompt.csv"], ["no_prompt.csv, row 1: each row needs a 'prompt'"]),
        (["--data.prompt=hi", "--trainer.devices=0"], ["value is not a valid input"]),
        (["--data.prompt=hi", "--trainer.accelerator=gpu"], ["No supported gpu backend found"]),
        (["--data.prompt=hi", "--model.num_iterations=0"], ["--model.num_iterations must be at least 1"]),
        (["--data.prompt=hi", "--model.ar_loss_target=base"], ["--model.ar_loss_target base needs a lora_rank"]),
        (["--data.prompt=hi", "--data.batch_size=0"], ["--data.batch_size must be at least 1, got 0."]),
        (["--data.prompt=hi", "--model.noise_min=0.8", "--model.noise_max=0.2"], ["0 <= noise_min <= noise_max"]),
        (["--data.prompt=hi", "--model.temperature=-1"], ["--model.temperature must be 0 (greedy) or above"]),
        (["--data.prompt=hi", "--model.top_p=1.5"], ["--model.top_p must be above 0 and at most 1, got 1.5."]),
        (["--data.prompt=hi", "--model.stop_token_ids=[100000]"], ["[100000] are outside the model's vocabulary"]),
        (["--data.prompt=hi", "--ckpt_path=a_dir"], ["Checkpoint a_dir is a directory"]),
        (["--data.prompt=hi", "--ckpt_path=garbage.ckpt"], ["is not a PyTorch file of weights"]),
        (["--data.prompt=hi", "--ckpt_path=http://127.0.0.1:9/x.ckpt"], ["is remote"]),
    ],
)
@pytest.mark.slow
def test_bad_input_gives_one_line(tiny_dir, messy, args, fragments, dllm_lit_here):
    """A run that fails, before or after the model loads, leaves no output file and no parts."""
    assert_fails_cleanly(dllm_lit_here, tiny_dir, messy, args, fragments)


def assert_fails_cleanly(run, tiny_dir: str, messy: Path, args: list[str], fragments: list[str]) -> None:
    """``predict ARGS`` through ``run``: one error line holding ``fragments``, no output file, no parts."""
    done = run(
        ["predict", f"--model.model_name_or_path={tiny_dir}", *FAST, "--writer.output_file=out.jsonl", *args], messy
    )
    assert_one_line_error(done, *fragments)
    assert not list(messy.glob("*.jsonl.parts")) and not (messy / "out.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--data.prompts_file=noprompt.jsonl"], "row 2: each row needs a 'prompt'"),  # before the model loads
        (["--data.prompts_file=long.txt", "--model.max_length=100"], "Prompt 1 has 301 tokens"),  # after
    ],
)
def test_the_real_command_gives_the_same_one_line(tiny_dir, messy, args, fragment, dllm_lit):
    """The cases above run in-process for speed; the installed command's own process gives the same."""
    assert_fails_cleanly(dllm_lit, tiny_dir, messy, args, [fragment])


@pytest.mark.slow
def test_skip_long_prompts_keeps_the_rest(tiny_dir, messy, dllm_lit):
    out = messy / "out.jsonl"
    done = dllm_lit(
        [
            "predict",
            f"--model.model_name_or_path={tiny_dir}",
            *FAST,
            "--data.prompts_file=long.txt",
            "--model.max_length=100",
            "--data.skip_long_prompts=true",
            f"--writer.output_file={out}",
        ],
        messy,
    )
    assert done.returncode == 0, done.stderr
    assert "skipped 1 prompts longer than max_length=100: indices [1]" in done.stderr
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 2]


@pytest.fixture
def broken_models(tmp_path, tiny_dir) -> Path:
    import shutil

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    no_eos = tmp_path / "no_eos"
    shutil.copytree(tiny_dir, no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "empty_dir").mkdir()
    corrupt = tmp_path / "corrupt_weights"
    shutil.copytree(tiny_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return tmp_path


@pytest.mark.parametrize(
    "model,extra,fragments",
    [
        ("corrupt_weights", [], ["Could not load model weights from"]),
        ("does/not/exist", [], ["Model path 'does/not/exist' does not exist"]),
        ("empty_dir", [], ["has neither config.json nor adapter_config.json"]),
        ("no_weights", [], ["Could not load model weights from"]),
        ("no_eos", [], ["has no EOS token"]),
    ],
)
@pytest.mark.slow
def test_bad_models_give_one_line(broken_models, model, extra, fragments, dllm_lit_here):
    done = dllm_lit_here(
        ["predict", f"--model.model_name_or_path={model}", "--data.prompt=hi", *FAST, *extra], broken_models
    )
    assert_one_line_error(done, *fragments)


def hub_cache(root: Path, repo_id: str, files: Path) -> Path:
    """A Hugging Face cache holding ``files`` as the ``main`` snapshot of ``repo_id`` (blobs and links, as
    ``hf download`` lays them out)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    for directory in (snapshot, blobs, repo / "refs"):
        directory.mkdir(parents=True)
    for number, file in enumerate(sorted(files.iterdir())):
        (blobs / f"blob{number}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"blob{number}"))
    (repo / "refs" / "main").write_text(commit)
    return root


def test_a_hub_id_in_the_local_cache_loads_from_it_and_one_not_there_is_one_line(
    tiny_dir, tmp_path, dllm_lit_here, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "org/tiny", Path(tiny_dir)))
    )
    answers = []
    for model in (tiny_dir, "org/tiny"):
        out = tmp_path / f"{len(answers)}.jsonl"
        args = [f"--model.model_name_or_path={model}", "--data.prompt=hi", f"--writer.output_file={out}", *FAST]
        assert dllm_lit_here(["predict", *args], tmp_path).returncode == 0
        answers.append(json.loads(out.read_text())["response"])
    assert answers[0] == answers[1] and answers[0]
    done = dllm_lit_here(["predict", "--model.model_name_or_path=org/other", "--data.prompt=hi", *FAST], tmp_path)
    assert_one_line_error(done, "Model path 'org/other' does not exist", "Hub id in the local Hugging Face cache")


def test_out_of_memory_splits_the_batch_and_each_prompt_keeps_its_seed(tiny_dir, monkeypatch):
    settings = dict(add_eos_length=3, max_new_tokens=10, temperature=1.5, seed=7)
    module = BlockRefineLM(model_name_or_path=tiny_dir, **settings)
    module.configure_model()
    from dllm_lit.data import LeftPadCollator

    tokenizer = module.tokenizer
    items = [
        {"index": i, "input_ids": tokenizer(p).input_ids, "prompt": p, "extra": {}}
        for i, p in enumerate(["a", "bb", "ccc d", "e", "fgh"])
    ]
    batch = LeftPadCollator(tokenizer.pad_token_id)(items)
    expected = [
        module.decode(
            batch["input_ids"][i : i + 1, -len(it["input_ids"]) :],
            batch["attention_mask"][i : i + 1, -len(it["input_ids"]) :],
            {"row_seeds": [7 + i]},
        )
        .rows[0]
        .token_ids
        for i, it in enumerate(items)
    ]
    real_decode, sizes = module.decode, []

    def decode_with_a_small_memory(input_ids, attention_mask, per_row):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_decode(input_ids, attention_mask, per_row)

    monkeypatch.setattr(module, "decode", decode_with_a_small_memory)
    with pytest.warns(UserWarning, match="retrying as 2 \\+ 3"):
        rows = module.predict_step(batch, 0).rows
    assert [r["response"] for r in rows] == [tokenizer.decode(e, skip_special_tokens=True) for e in expected]
    assert sizes == [5, 2, 3, 1, 2]
    monkeypatch.setattr(module, "decode", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("always")))
    with pytest.raises(torch.OutOfMemoryError):
        module.decode_splitting_on_oom(batch["input_ids"][:1], batch["attention_mask"][:1])
