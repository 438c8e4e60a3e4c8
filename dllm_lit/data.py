"""Prompt sources -> tokenized, left-padded, indexed batches for prediction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from dllm_lit.models import DEFAULT_MODEL, load_tokenizer


class PromptError(ValueError):
    """The prompts given cannot be used; the message says where and how to fix it."""


def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a ``.txt`` (one prompt a line, blank lines skipped), ``.jsonl`` or ``.json`` file.

    JSON rows carry ``prompt`` (a string) or ``messages`` (chat messages); other fields pass through.
    """
    path = Path(path)
    if path.is_dir():
        raise PromptError(f"Prompts file {path} is a directory: give a .txt, .jsonl or .json file.")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"Prompts file {path} does not exist.") from None
    except UnicodeDecodeError as error:
        raise PromptError(f"Prompts file {path} is not UTF-8 text (byte {error.start}).") from None
    except OSError as error:
        raise PromptError(f"Prompts file {path} cannot be read: {error.strerror}.") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise PromptError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
    elif path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise PromptError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}).") from None
        if not isinstance(rows, list):
            raise PromptError(f"{path}: expected a JSON array of rows.")
    else:
        rows = [{"prompt": line} for line in text.splitlines() if line.strip()]
    if not rows:
        raise PromptError(f"Prompts file {path} has no prompts.")
    for number, row in enumerate(rows, start=1):
        _check_row(row, f"{path}, row {number}")
    return rows


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
        raise PromptError(f"{where}: each row needs a 'prompt' string or a 'messages' list.")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PromptError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects.")
    elif not isinstance(row["prompt"], str):
        raise PromptError(f"{where}: 'prompt' must be a string.")


def encode_prompt(tokenizer, row: dict[str, Any], use_chat_template: bool) -> list[int]:
    """Token ids of one row: the chat template (no double BOS) or the plain prompt."""
    if "messages" in row or use_chat_template:
        if not tokenizer.chat_template:
            raise PromptError(
                "The tokenizer has no chat template: drop use_chat_template and give plain 'prompt' rows."
            )
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already writes any BOS; adding special tokens again would double it.
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(row["prompt"]).input_ids


class PromptDataset(Dataset):
    """Tokenized prompts, longest first, each keeping its input index and extra fields."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer, *, use_chat_template: bool, sort_by_length: bool):
        items = []
        for index, row in enumerate(rows):
            ids = encode_prompt(tokenizer, row, use_chat_template)
            if not ids:
                raise PromptError(f"Prompt {index} is empty after tokenization.")
            prompt = row["prompt"] if "prompt" in row else row["messages"][-1]["content"]
            extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
            items.append({"index": index, "input_ids": ids, "prompt": prompt, "extra": extra})
        if sort_by_length:
            items.sort(key=lambda item: -len(item["input_ids"]))
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class LeftPadCollator:
    """Stack prompts left-padded with ``pad_token_id``; keep indices, texts and extra fields."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, width - n :] = torch.tensor(item["input_ids"])
            attention_mask[row, width - n :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": [item["index"] for item in items],
            "prompt": [item["prompt"] for item in items],
            "extra": [item["extra"] for item in items],
        }


class PromptDataModule(L.LightningDataModule):
    """Prompts to decode: one ``prompt``, a ``prompts`` list, or a ``prompts_file``.

    Args:
        prompt: A single prompt.
        prompts: A list of prompts.
        prompts_file: A ``.txt`` file (one prompt a line), or ``.jsonl``/``.json`` rows with
            ``prompt`` or ``messages``; other fields are copied to the output.
        batch_size: Prompts decoded together.
        use_chat_template: Wrap each prompt as a user message with the tokenizer's chat template.
        sort_by_length: Batch prompts of similar length together (output keeps input order).
        model_name_or_path: Whose tokenizer to use (linked to the model's by the CLI).
    """

    def __init__(
        self,
        prompt: str | None = None,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        batch_size: int = 8,
        use_chat_template: bool = False,
        sort_by_length: bool = True,
        model_name_or_path: str = DEFAULT_MODEL,
    ):
        super().__init__()
        given = [name for name, value in (("prompt", prompt), ("prompts", prompts), ("prompts_file", prompts_file)) if value is not None]
        if len(given) != 1:
            raise PromptError(
                "Give exactly one of prompt, prompts or prompts_file"
                + (f" (got {', '.join(given)})." if given else " (got none).")
            )
        if batch_size < 1:
            raise PromptError(f"batch_size must be at least 1, got {batch_size}.")
        self.prompt, self.prompts, self.prompts_file = prompt, prompts, prompts_file
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self.sort_by_length = sort_by_length
        self.model_name_or_path = model_name_or_path
        self.dataset: PromptDataset | None = None

    def rows(self) -> list[dict[str, Any]]:
        """The input rows, in input order."""
        if self.prompts_file is not None:
            return read_prompt_file(self.prompts_file)
        texts = [self.prompt] if self.prompt is not None else list(self.prompts)
        if not texts:
            raise PromptError("The prompts list is empty.")
        return [{"prompt": text} for text in texts]

    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.tokenizer = load_tokenizer(self.model_name_or_path)
            self.dataset = PromptDataset(
                self.rows(), self.tokenizer, use_chat_template=self.use_chat_template, sort_by_length=self.sort_by_length
            )

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=LeftPadCollator(self.tokenizer.pad_token_id),
        )
