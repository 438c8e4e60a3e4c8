"""``dllm_lit evaluate``: lm-evaluation-harness tasks, accuracy beside tokens per forward.

Runs lm-eval's ``simple_evaluate`` on :class:`~dllm_lit.lm_eval_model.DllmLM` (the ``--model.*``
settings of ``predict``), writes ``OUTPUT_DIR/results.json`` (lm-eval's results dictionary, plus a
``dllm_lit`` section with the decoding statistics per task) and, with ``--log_samples true``,
``OUTPUT_DIR/samples_<task>.jsonl``; prints lm-eval's table and one of the decoding statistics.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from dllm_lit.model_args import add_function_flags, function_flags, model_parser, model_settings
from dllm_lit.models import default_model_note, resolve, resolve_device
from dllm_lit.outputs import OutputLock, check_writable, model_identity, parts_dir, run_fingerprint


def evaluate(
    model_name_or_path: str,
    trust_remote_code: bool,
    settings,
    *,
    tasks: str,
    output_dir: str,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    log_samples: bool = False,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    chat_template: str | None = None,
    fewshot_as_multiturn: bool = True,
    system_instruction: str | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Evaluate on lm-eval tasks (under ``torchrun``: one process a device, each a share of the documents).

    Args:
        tasks: Comma-separated lm-eval task names (or groups), e.g. ``gsm8k`` or ``dllm_arith``.
        output_dir: Directory for ``results.json`` (and the samples); created if missing.
        limit: At most this many documents per task (a fraction below 1: that share of each task).
        num_fewshot: Few-shot examples per prompt (default: the task's).
        include_path: A directory of extra task YAML files, e.g. ``examples/eval_tasks``.
        log_samples: Also write each task's prompts, answers and scores (``samples_<task>.jsonl``).
        batch_size: Requests decoded (or scored) together.
        apply_chat_template: Wrap each prompt in the model's chat template (lm-eval's option).
        chat_template: With ``apply_chat_template``, this template (a Jinja file or the template
            itself) in place of the tokenizer's.
        fewshot_as_multiturn: With ``apply_chat_template``, each few-shot example as a user message
            and an assistant answer (lm-eval's option; false: all in the first user message).
        system_instruction: A system message (a chat template's) or text before every prompt.
        gen_kwargs: Generation arguments over every task's, e.g. ``{"max_gen_toks": 256}``
            (lm-eval's ``--gen_kwargs``; ``temperature``/``do_sample`` sample, as a task's would).
        device: ``auto``, ``cpu`` or ``cuda``.
        dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), ``float32``, ``bfloat16`` or ``float16``.
        seed: lm-eval's random, numpy, torch and few-shot seeds.
        overwrite: Replace the ``results.json`` of an earlier run in ``output_dir`` (refused without it),
            or start again over an interrupted one.
        resume: Finish the interrupted run in ``output_dir``: the answers it kept (every answer is kept
            as it comes) are not computed again. Only with the same model, settings, dtype and device.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError:
        raise ValueError("dllm_lit evaluate needs lm-eval: pip install 'dllm-lit[eval]'.") from None
    from dllm_lit.answer_log import AnswerLog
    from dllm_lit.lm_eval_model import DllmLM

    out, results_file = Path(output_dir), Path(output_dir) / "results.json"
    check_flags(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, include_path=include_path)
    check_run(out, resume=resume, overwrite=overwrite)
    device, rank = join_ranks(device)
    if rank == 0:
        check_writable(results_file)  # creates the directory
    manager = TaskManager(include_path=include_path)
    names = task_names(tasks, manager.all_tasks)
    decoding = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    lock = OutputLock(results_file, "--output_dir")
    if rank == 0:
        lock.acquire()
    try:
        lm = DllmLM(model_name_or_path, trust_remote_code, batch_size, device, dtype, chat_template, **decoding)
        identity = model_identity(model_name_or_path, resolve(model_name_or_path))
        identity |= {"trust_remote_code": trust_remote_code}  # as batch's fingerprint names the model
        answering = {"dtype": dtype, "chat_template": chat_template}
        fingerprint = run_fingerprint([], data=answering, decoding=decoding, model=identity)
        if rank == 0 and not resume:
            AnswerLog.clear(parts_dir(results_file))  # an interrupted run's answers, given up (--overwrite)
        lm.barrier()
        log = AnswerLog(parts_dir(results_file), fingerprint, resume, rank)
        lm.keep_answers(log)
        if rank == 0 and (note := default_model_note(model_name_or_path, settings)):
            print(note, file=sys.stderr)  # few-shot tasks read well without a template
        with hub_datasets_explained(), answers_kept(log, lm):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=log_samples,
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn,
                system_instruction=system_instruction,
                gen_kwargs=gen_kwargs,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        statistics = {"statistics": lm.decoding_statistics(), "resumed_answers": log.resumed}
        log.close()
        lm.barrier()  # every rank's answers are written
        if rank != 0:
            return None
        results["dllm_lit"] = {"model": model_name_or_path, "decoding": decoding, **statistics}
        write_results(out, results, handle_non_serializable)
        AnswerLog.clear(parts_dir(results_file), remove=True)
    finally:
        lock.release()
    print(make_table(results))
    print(statistics_table(results["dllm_lit"]["statistics"]))
    resumed = f" ({log.resumed} answers from the interrupted run)" if resume else ""
    print(f"dllm_lit evaluate: wrote {results_file}{resumed}", file=sys.stderr)
    return results


def join_ranks(device: str) -> tuple[str, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` above 1): join the process group and return this process's
    device (its ``LOCAL_RANK``'s GPU, else the CPU) and rank; else ``(device, 0)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device, 0
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(
            f"Under torchrun --device is auto, cuda or cpu (each process takes its LOCAL_RANK's GPU), got {device}."
        )
    import torch

    if resolve_device(device) == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return device, torch.distributed.get_rank()


@contextmanager
def answers_kept(log, lm):
    """On a failure or Ctrl-C, the answers so far stay for ``--resume true`` (one process that has
    none: the file goes)."""
    try:
        yield
    except BaseException:
        log.close()
        if lm.world_size == 1 and not log.answers:
            log.clear(log.path.parent, remove=True)
        elif lm.rank == 0:
            print(
                f"dllm_lit evaluate: {len(log.answers)} answers are kept; --resume true finishes the run.",
                file=sys.stderr,
            )
        raise


def write_results(out: Path, results: dict, default) -> None:
    """``results.json`` (its samples aside) and each task's ``samples_<task>.jsonl``."""
    samples = results.pop("samples", None) or {}
    write_json(out / "results.json", results, default)
    for task, rows in samples.items():
        with (out / f"samples_{task}.jsonl").open("w") as f:
            f.writelines(json.dumps(row, default=default) + "\n" for row in rows)


def check_run(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any model loads, to replace finished results or drop an interrupted run's
    answers unasked, or to resume what holds no interrupted run."""
    results, parts = out / "results.json", parts_dir(out / "results.json")
    if resume and not parts.is_dir():
        finished = "its results.json is complete" if results.is_file() else "it holds no interrupted run"
        raise ValueError(f"Nothing to resume in {out}: {finished}.")
    if not resume and not overwrite and results.is_file():
        raise ValueError(
            f"{results} holds an earlier run's results: pass --overwrite true to replace them, "
            "or choose another --output_dir."
        )
    if not resume and not overwrite and parts.is_dir():
        raise ValueError(
            f"{out} holds the answers of an interrupted run: pass --resume true to finish it, or "
            "--overwrite true to start again."
        )


def check_flags(*, limit, num_fewshot, batch_size, include_path) -> None:
    """Refuse, before any model loads, counts lm-eval would fail on deep inside (or read as "all")."""
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be above 0 (a count, or a share below 1), got {limit}.")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be at least 0, got {num_fewshot}.")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}.")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include_path {include_path} is not a directory.")


def task_names(tasks: str, known) -> list[str]:
    """The comma-separated ``tasks``, each one lm-eval knows."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        listed = ", ".join(unknown) or repr(tasks)
        raise ValueError(f"Unknown lm-eval task(s): {listed} (add --include_path for local ones).")
    return names


@contextmanager
def hub_datasets_explained():
    """A Hub task whose dataset cannot be downloaded: one sentence instead of datasets' traceback."""
    try:
        yield
    except ConnectionError as error:  # datasets' "Couldn't reach 'openai/gsm8k' on the Hub (...)"
        raise ValueError(
            f"{error}: lm-eval downloads a Hub task's dataset on first use; run once where the Hub is "
            "reachable (it is cached then), or use local tasks (--include_path)."
        ) from None


def write_json(path: Path, value: dict, default) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a results file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, default=default))
    os.replace(temporary, path)


def statistics_table(statistics: dict[str, dict]) -> str:
    """The decoding statistics per task as a Markdown table."""
    lines = [
        "| task | requests | prompt tokens (cached) | generated tokens | forwards | tokens/forward | tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, s in statistics.items():
        lines.append(
            f"| {task} | {s['requests']} | {s['prompt_tokens']} ({s['cached_prompt_tokens']}) "
            f"| {s['generated_tokens']} | {s['forwards']} | {s['tokens_per_forward']:.2f} "
            f"| {s['tokens_per_second']:.1f} |"
        )
    return "\n".join(lines)


def evaluate_parser():
    """``dllm_lit evaluate [--config FILE] [--model.* ...] --tasks T --output_dir DIR ...``."""
    parser = model_parser("dllm_lit evaluate", "lm-evaluation-harness tasks, with accuracy and tokens per forward.")
    add_function_flags(parser, evaluate)
    return parser


def main(args: list[str]) -> None:
    config = evaluate_parser().parse_args(args)
    evaluate(*model_settings(config.model), **function_flags(config, evaluate))
