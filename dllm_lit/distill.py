"""``dllm_lit distill``: training rows made offline from a model's own greedy answers.

Prompts come from templates over many topics and task kinds (explanations, lists, comparisons,
definitions, short math, code), and optionally from the model itself (``--magpie N``: user turns
sampled from the chat template's user prefix, as Magpie does). They are deduplicated; the held-out
split is drawn with another seed and checked for no overlap with the training split; ``--exclude``
keeps the prompts of earlier row files out of both (to grow a data set without touching its held-out
split). Responses are the model's greedy answers, decoded with the engine in lossless mode (exactly
its autoregressive output) in batches. Rows are ``{"messages": [user, assistant]}`` lines that
``dllm_lit fit`` reads (``--data.train_file`` / ``--data.val_file``); answers cut by
``--max_new_tokens`` are left out, and so, with ``--gate_model``, are answers that model finds unlikely
(more than ``--max_gate_nll`` nats a token: a quality gate when a trained model answers its own rows).

The run is resumable: each finished batch is appended (and fsynced) to ``train.jsonl`` /
``val.jsonl``, ``distill.json`` records the settings, and a rerun with the same settings skips the
prompts already answered (other settings are refused: use a new ``--out``).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

from dllm_lit.data import encode_prompt, left_pad, read_rows, split_row
from dllm_lit.decoding import generate_blocks
from dllm_lit.model_args import add_function_flags, function_flags, model_parser, model_settings
from dllm_lit.models import load_model, load_tokenizer, resolve_device
from dllm_lit.progress import counter
from dllm_lit.settings import DecodeSettings
from dllm_lit.training import response_cross_entropy

TOPICS = [
    "photosynthesis",
    "volcanoes",
    "the water cycle",
    "black holes",
    "vaccines",
    "the printing press",
    "bees",
    "rainbows",
    "tides",
    "earthquakes",
    "the internet",
    "electricity",
    "magnets",
    "glaciers",
    "coral reefs",
    "the moon",
    "gravity",
    "DNA",
    "the Roman Empire",
    "the Renaissance",
    "jazz",
    "chess",
    "coffee",
    "bread",
    "recycling",
    "deserts",
    "rain forests",
    "sleep",
    "exercise",
    "memory",
    "languages",
    "money",
    "inflation",
    "taxes",
    "democracy",
    "maps",
    "clocks",
    "bicycles",
    "airplanes",
    "trains",
    "bridges",
    "batteries",
    "solar power",
    "wind turbines",
    "the heart",
    "the lungs",
    "bones",
    "muscles",
    "friendship",
    "kindness",
    "teamwork",
    "time management",
    "gardening",
    "cooking",
    "music",
    "painting",
    "poetry",
    "libraries",
    "museums",
    "oceans",
    "rivers",
    "mountains",
    "clouds",
    "snow",
    "stars",
]
TEMPLATES = {
    "explain": [
        "Explain {topic} in two sentences.",
        "How does {topic} work?",
        "Why is {topic} important?",
        "Explain {topic} to a ten-year-old.",
        "What is the history of {topic} in brief?",
    ],
    "list": [
        "List three facts about {topic}.",
        "Give me three tips related to {topic}.",
        "Name three common misconceptions about {topic}.",
    ],
    "define": ["What is {topic}?", "Define {topic} in one sentence.", "Describe {topic} briefly."],
    "compare": ["What is the difference between {topic} and {other}?", "Compare {topic} and {other} briefly."],
    "write": ["Write a short poem about {topic}.", "Write one sentence that uses the word '{topic}'."],
}
CODE_TASKS = [
    "reverses a string",
    "returns the largest of three numbers",
    "checks whether a number is prime",
    "counts the vowels in a string",
    "sums a list of numbers",
    "returns the factorial of n",
    "checks whether a word is a palindrome",
    "converts Celsius to Fahrenheit",
    "removes duplicates from a list",
    "returns the n-th Fibonacci number",
    "finds the average of a list",
    "capitalizes every word in a sentence",
]
MATH = ["What is {a} + {b}?", "What is {a} - {b}?", "What is {a} times {b}?", "What is {a} plus {b} minus {c}?"]


def template_prompt(rng: random.Random) -> str:
    """One prompt: a kind drawn evenly, then its template and fillers."""
    kind = rng.choice([*TEMPLATES, "code", "math"])
    if kind == "code":
        return f"Write a Python function that {rng.choice(CODE_TASKS)}."
    if kind == "math":
        return rng.choice(MATH).format(a=rng.randint(2, 99), b=rng.randint(2, 99), c=rng.randint(2, 99))
    topic, other = rng.sample(TOPICS, 2)
    return rng.choice(TEMPLATES[kind]).format(topic=topic, other=other)


def unique_prompts(count: int, seed: int, exclude: set[str] = frozenset(), extra: list[str] = ()) -> list[str]:
    """``count`` distinct prompts (``extra`` first), none in ``exclude``, drawn with ``seed``."""
    rng, chosen, seen = random.Random(seed), [], set(exclude)
    candidates = iter(extra)
    for _attempt in range(100 * count + len(extra)):
        if len(chosen) == count:
            break
        prompt = next(candidates, None) or template_prompt(rng)
        if prompt not in seen:
            seen.add(prompt)
            chosen.append(prompt)
    if len(chosen) < count:
        raise ValueError(f"Only {len(chosen)} distinct prompts could be made, fewer than the {count} asked for.")
    return chosen


def magpie_prompts(model, tokenizer, count: int, seed: int, batch_size: int) -> list[str]:
    """User turns sampled from the model after the chat template's user prefix."""
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix = tokenizer(text[: text.index(marker)], add_special_tokens=False).input_ids
    settings = DecodeSettings(add_eos_length=0, max_new_tokens=48, temperature=1.0, top_p=0.95, lossless=True)
    found: list[str] = []
    with counter(count, 0, "magpie", "turn") as bar:
        for start in range(0, count, batch_size):
            rows = min(batch_size, count - start)
            result = generate_blocks(
                model,
                torch.tensor([prefix] * rows, device=model.device),
                settings.replace(seed=seed + start),
                eos_token_id=tokenizer.eos_token_id,
            )
            for row in result.rows:
                turn = tokenizer.decode(row.token_ids, skip_special_tokens=True).strip()
                if row.stop_reason == "eos" and 10 <= len(turn) <= 300:
                    found.append(turn)
            bar.update(rows)
    return found


def distill(
    model_name_or_path: str,
    trust_remote_code: bool,
    settings: DecodeSettings,
    *,
    out: str,
    train: int = 3000,
    val: int = 200,
    seed: int = 0,
    magpie: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    exclude: list[str] = (),
    gate_model: str | None = None,
    max_gate_nll: float = 1.5,
    keep_unfinished: bool = False,
) -> None:
    """Write ``OUT/train.jsonl`` and ``OUT/val.jsonl``: prompts and the model's own greedy answers.

    Answers are decoded in lossless mode with a window of one token (``--model.add_eos_length`` is
    ignored): the answer is the same at any window, and an ordinary model accepts almost no drafted
    token, so in a batch wider windows only cost compute.

    Args:
        out: Output directory (resumed when it holds a run with the same settings).
        train: Training prompts.
        val: Held-out prompts (another seed; never in the training split).
        seed: Seed of the training prompts (the held-out split uses ``seed + 1``).
        magpie: Also sample this many user turns from the model itself (training split).
        batch_size: Prompts decoded together.
        device: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda``.
        exclude: Row files (for example an earlier run's ``train.jsonl`` and ``val.jsonl``) whose
            prompts are drawn in neither split.
        gate_model: Leave out answers this model (same tokenizer; for example the base of an adapter)
            finds unlikely.
        max_gate_nll: The gate: the most negative log-likelihood per answer token, in nats, that
            ``gate_model`` may give a kept answer (SmolLM2's own greedy answers average 0.57).
        keep_unfinished: Keep answers cut at ``--model.max_new_tokens`` as rows marked
            ``"finished": false`` instead of skipping them: the text is still the model's own greedy
            answer, and training adds no EOS after it (drafting data from prompts with long answers).
    """
    folder = Path(out)
    own_answer = dict(lossless=True, add_eos_length=0, temperature=0.0, stop_strings=(), backend="eager")
    settings = settings.replace(**own_answer)  # the model's whole greedy answer
    manifest = {
        "model": model_name_or_path,
        "train": train,
        "val": val,
        "seed": seed,
        "magpie": magpie,
        "max_new_tokens": settings.max_new_tokens,
        "max_length": settings.max_length,
    }
    if exclude:
        manifest["exclude"] = list(exclude)
    if gate_model:
        manifest["gate"] = {"model": gate_model, "max_nll": max_gate_nll}
    if keep_unfinished:
        manifest["keep_unfinished"] = True
    excluded = {prompt_text(row) for path in exclude for row in read_rows(path, "--exclude file")}
    check_manifest(folder, manifest)
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
    model = load_model(model_name_or_path, trust_remote_code=trust_remote_code).to(resolve_device(device))
    gate = (load_gate(gate_model, model, trust_remote_code), max_gate_nll) if gate_model else None
    extra = magpie_prompts(model, tokenizer, magpie, seed, batch_size) if magpie else []
    train_prompts = unique_prompts(train + len(extra), seed, exclude=excluded, extra=extra)
    val_prompts = unique_prompts(val, seed + 1, exclude=excluded | set(train_prompts))
    assert not set(val_prompts) & set(train_prompts), "the held-out split overlaps the training split"
    for name, prompts in (("train", train_prompts), ("val", val_prompts)):
        path = folder / f"{name}.jsonl"
        rows, skipped = answer_all(model, tokenizer, prompts, settings, path, batch_size, gate, keep_unfinished)
        reasons = ([] if keep_unfinished else [f"no EOS within {settings.max_new_tokens} tokens"]) + (
            [f"over --max_gate_nll {max_gate_nll}"] if gate else []
        )
        why = ": " + ", or ".join(reasons) if reasons else ""
        print(f"dllm_lit distill: {rows} rows -> {path} ({skipped} prompts skipped{why})", file=sys.stderr)
        if not rows and prompts:
            limits = ([] if keep_unfinished else ["--model.max_new_tokens"]) + (["--max_gate_nll"] if gate else [])
            raise ValueError(f"Every {name} prompt was skipped ({', or '.join(reasons)}): raise {' or '.join(limits)}.")


def prompt_text(row: dict) -> str:
    """The user's text of a prompt row (``prompt``, or the messages before the answer)."""
    prompt, _response = split_row(row)
    return prompt["messages"][-1]["content"] if "messages" in prompt else prompt["prompt"]


def check_manifest(folder: Path, manifest: dict) -> None:
    """Record the settings, or refuse to resume a run made with other ones."""
    path = folder / "distill.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != manifest:
            raise ValueError(f"{folder} holds a distill run with other settings ({recorded}): use a new --out.")
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty and holds no distill run: use a new --out.")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2))


def load_gate(name: str, model, trust_remote_code: bool):
    """The ``--gate_model``, on ``model``'s device; it must share ``model``'s vocabulary."""
    gate = load_model(name, trust_remote_code=trust_remote_code).to(model.device).eval()
    if gate.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"--gate_model {name} has another vocabulary than the model: it must share its tokenizer.")
    return gate


@torch.no_grad()
def answer_nll(model, prompt: list[int], answer: list[int]) -> float:
    """The negative log-likelihood per token, in nats, that ``model`` gives ``answer`` after ``prompt``
    (the training's AR loss, :func:`~dllm_lit.training.response_cross_entropy`, on one row)."""
    ids = torch.tensor([prompt + answer], device=model.device)
    response = torch.arange(ids.shape[1], device=model.device)[None] >= len(prompt)
    return response_cross_entropy(model(ids).logits, ids, response).item()


def training_row(tokenizer, prompt: str, row, keep_unfinished: bool) -> tuple[dict, list[int]] | None:
    """``(the .jsonl row, its answer tokens as training reads them)`` for one decoded answer, or None
    when it hit the length limit (and unfinished answers are not kept) or is empty."""
    finished = row.stop_reason == "eos"
    answer = tokenizer.decode(row.token_ids, skip_special_tokens=True).strip()
    if not (finished or (keep_unfinished and answer)):
        return None
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if finished:
        return {"messages": messages}, [*row.token_ids, row.stop_token_id]
    return {"messages": messages, "finished": False}, row.token_ids


def answer_all(
    model,
    tokenizer,
    prompts: list[str],
    settings: DecodeSettings,
    path: Path,
    batch_size: int,
    gate=None,
    keep_unfinished: bool = False,
) -> tuple[int, int]:
    """Append a row per prompt not answered yet (longest first, batch by batch, fsynced); prompts
    whose answer hit the length limit (unless ``keep_unfinished``), or fails the ``(gate model, max
    NLL)`` gate, are listed in ``<name>.skipped.json``. Returns the rows and skipped prompts in the
    split, this run's and earlier ones'."""
    skipped_path = path.with_name(f"{path.stem}.skipped.json")
    skipped = json.loads(skipped_path.read_text()) if skipped_path.is_file() else []
    answered = [prompt_text(json.loads(line)) for line in path.read_text().splitlines()] if path.is_file() else []
    done = set(skipped) | set(answered)
    ids = {p: encode_prompt(tokenizer, {"messages": [{"role": "user", "content": p}]}, True) for p in prompts}
    todo = sorted((p for p in prompts if p not in done), key=lambda p: -len(ids[p]))
    with path.open("a") as f, counter(len(prompts), len(prompts) - len(todo), path.stem, "prompt") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            input_ids, mask = left_pad([ids[p] for p in batch], tokenizer.pad_token_id)
            result = generate_blocks(
                model, input_ids, settings, attention_mask=mask, eos_token_id=tokenizer.eos_token_id
            )
            for prompt, row in zip(batch, result.rows):
                kept = training_row(tokenizer, prompt, row, keep_unfinished)
                if kept is None or (gate and answer_nll(gate[0], ids[prompt], kept[1]) > gate[1]):
                    skipped.append(prompt)
                    continue
                f.write(json.dumps(kept[0]) + "\n")
            f.flush()
            os.fsync(f.fileno())
            skipped_path.write_text(json.dumps(skipped))
            bar.update(len(batch))
    return len(prompts) - len(skipped), len(skipped)


def main(args: list[str]) -> None:
    parser = model_parser("dllm_lit distill", "Training rows from a model's own greedy answers (resumable).")
    add_function_flags(parser, distill)
    config = parser.parse_args(args)
    distill(*model_settings(config.model), **function_flags(config, distill))


if __name__ == "__main__":
    from dllm_lit.cli import main as cli_main

    cli_main(["distill", *sys.argv[1:]])
