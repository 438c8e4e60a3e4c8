"""Data: prompt sources -> left-padded, indexed batches to decode; prompt/response rows -> SFT batches."""

from __future__ import annotations

import csv
import inspect
import io
import json
import sys
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from jinja2 import TemplateError
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from dllm_lit.models import DEFAULT_MODEL, load_tokenizer
from dllm_lit.settings import DEFAULTS


class PromptError(ValueError):
    """The prompts given cannot be used; the message says where and how to fix it."""


SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".tsv")


def read_rows(path: str | Path, label: str = "Prompts file") -> list[dict[str, Any]]:
    """Rows from ``.txt`` (one prompt a line, blank lines skipped), ``.jsonl``, ``.json``, ``.parquet``,
    or ``.csv``/``.tsv`` (a header row naming the columns).

    Each row carries ``prompt`` (a string) or ``messages`` (chat messages); other fields pass through.
    Errors name the file as ``label`` (for example ``--data.train_file``).
    """
    path = Path(path)
    kinds = ", ".join(SUFFIXES)
    if path.is_dir():
        raise PromptError(f"{label} {path} is a directory: give a {kinds} file.")
    if not path.exists():
        raise PromptError(f"{label} {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix and suffix not in SUFFIXES:  # a file without a suffix is read as text lines
        raise PromptError(f"{label} {path} has an unknown kind ({suffix}): give a {kinds} file.")
    if suffix in (".parquet", ".csv", ".tsv"):
        rows = _read_table(path, suffix, label)
    else:
        rows = _parse_text_rows(path, suffix, _read_text(path, label))
    if not rows:
        raise PromptError(f"{label} {path} has no prompts.")
    for number, row in enumerate(rows, start=1):
        _check_row(row, f"{path}, row {number}")
    return rows


def _read_table(path: Path, suffix: str, label: str) -> list[dict[str, Any]]:
    """Parquet rows through pyarrow; CSV/TSV rows with a header through :mod:`csv`, every value text
    (a prompt such as "007" stays the string it was written as)."""
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as error:
            raise PromptError(f"{label} {path} cannot be read as parquet: {' '.join(str(error).split())}") from None
    try:
        return list(csv.DictReader(io.StringIO(_read_text(path, label)), delimiter="\t" if suffix == ".tsv" else ","))
    except csv.Error as error:
        raise PromptError(f"{label} {path} cannot be read as {suffix[1:]}: {error}.") from None


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not part of the text
    except UnicodeDecodeError as error:
        raise PromptError(f"{label} {path} is not UTF-8 text (byte {error.start}).") from None
    except OSError as error:
        raise PromptError(f"{label} {path} cannot be read: {error.strerror}.") from None


def _parse_text_rows(path: Path, suffix: str, text: str) -> list[Any]:
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise PromptError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise PromptError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}).") from None
        if not isinstance(rows, list):
            raise PromptError(f"{path}: expected a JSON array of rows.")
        return rows
    return [{"prompt": line} for line in text.splitlines() if line.strip()]


def _check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
        raise PromptError(f"{where}: each row needs a 'prompt' string or a 'messages' list.")
    if "messages" in row:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise PromptError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects.")
        if messages[-1]["role"] == "assistant" and len(messages) == 1:
            raise PromptError(f"{where}: 'messages' holds only the assistant's reply; add the user turn before it.")
    elif not isinstance(row["prompt"], str):
        raise PromptError(f"{where}: 'prompt' must be a string.")
    if not isinstance(row.get("finished", True), bool):
        raise PromptError(f"{where}: 'finished' must be true or false.")
    for name, value in row.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            kind = (
                "is not valid Unicode (a lone surrogate)"
                if isinstance(error, UnicodeEncodeError)
                else (f"cannot be written as JSON ({type(value).__name__}); convert it to a string")
            )
            raise PromptError(f"{where}: field {name!r} {kind}.") from None


def split_row(row: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """``(prompt part, response)``: a trailing assistant message or the ``response`` field is the response
    (a trailing assistant message stays in the prompt when the row continues it)."""
    messages = row.get("messages")
    if messages and messages[-1]["role"] == "assistant" and not row.get("continue_final_message"):
        prompt = {name: value for name, value in row.items() if name in TEMPLATE_FIELDS}
        return {**prompt, "messages": messages[:-1]}, messages[-1]["content"]
    return row, row.get("response")


TEMPLATE_FIELDS = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")
"""A chat row's fields that reach the chat template beside its messages."""

_OWN_OPTIONS = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"kwargs"}


def template_options(row: dict[str, Any]) -> dict[str, Any]:
    """``apply_chat_template``'s options for a chat row: its ``tools``, ``add_generation_prompt`` (default:
    true unless ``continue_final_message``), ``continue_final_message`` (the answer goes on with the last,
    assistant, message) and the template variables in ``chat_template_kwargs`` (vLLM's names)."""
    variables = row.get("chat_template_kwargs") or {}
    if not isinstance(variables, dict):
        raise PromptError("'chat_template_kwargs' must be an object of template variables.")
    if own := sorted(_OWN_OPTIONS.intersection(variables)):
        raise PromptError(f"chat_template_kwargs cannot set {own[0]!r}: it is not a template variable.")
    go_on = row.get("continue_final_message", False)
    new_turn = row.get("add_generation_prompt", not go_on)
    if not isinstance(go_on, bool) or not isinstance(new_turn, bool):
        raise PromptError("'add_generation_prompt' and 'continue_final_message' must be true or false.")
    if go_on and new_turn:
        raise PromptError("continue_final_message continues the last message: set add_generation_prompt to false.")
    messages = row.get("messages") or [{}]
    if go_on and messages[-1].get("role") != "assistant":
        raise PromptError("continue_final_message needs a last message from the assistant to continue.")
    return {**variables, "tools": row.get("tools"), "add_generation_prompt": new_turn, "continue_final_message": go_on}


def with_defaults(row: dict[str, Any], defaults: dict[str, Any] | None) -> dict[str, Any]:
    """``row`` with template variables ``defaults`` under its own ``chat_template_kwargs``."""
    if not defaults:
        return row
    return row | {"chat_template_kwargs": defaults | (row.get("chat_template_kwargs") or {})}


def encode_prompt(tokenizer, row: dict[str, Any], use_chat_template: bool) -> list[int]:
    """Token ids of one row's prompt: the chat template (no double BOS) or the plain prompt."""
    if "messages" in row or use_chat_template:
        if not tokenizer.chat_template:
            raise PromptError(
                "The tokenizer has no chat template: drop use_chat_template and give plain 'prompt' rows."
            )
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        options = template_options({**row, "messages": messages})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        except (TemplateError, ValueError) as error:  # the template's raise_exception, a final message it drops
            raise PromptError(f"The chat template cannot render these messages: {error}") from None
        # The template already writes any BOS; adding special tokens again would double it.
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(row["prompt"]).input_ids


def truncate(ids: list[int], max_length: int, policy: str, where: str) -> list[int]:
    """Apply the truncation ``policy`` (``error``/``left``/``right``) to a sequence over ``max_length``."""
    if len(ids) <= max_length:
        return ids
    if policy == "left":
        return ids[len(ids) - max_length :]
    if policy == "right":
        return ids[:max_length]
    raise PromptError(
        f"{where} has {len(ids)} tokens, {len(ids) - max_length} over max_length={max_length}: "
        "raise max_length or set truncation to 'left' or 'right'."
    )


class PromptDataset(Dataset):
    """Tokenized prompts to decode, longest first, each keeping its input index and extra fields.

    Prompts whose index is in ``skip`` are left out (already done). A prompt that leaves no room
    under ``max_length`` is an error, or is left out with a note when ``skip_long_prompts``.
    """

    def __init__(
        self,
        rows: list[dict[str, Any]],
        tokenizer,
        *,
        use_chat_template: bool,
        template_defaults: dict[str, Any] | None = None,
        sort_by_length: bool,
        max_length: int,
        skip_long_prompts: bool = False,
        skip: set[int] = frozenset(),
    ):
        items, too_long = [], []
        for index, row in enumerate(rows):
            if index in skip:
                continue
            prompt_row, response = split_row(row)
            try:
                ids = encode_prompt(tokenizer, with_defaults(prompt_row, template_defaults), use_chat_template)
            except PromptError as error:
                raise PromptError(f"Prompt {index}: {error}") from None
            if not ids:
                raise PromptError(f"Prompt {index} is empty after tokenization.")
            if len(ids) >= max_length:
                if not skip_long_prompts:
                    raise PromptError(
                        f"Prompt {index} has {len(ids)} tokens, {len(ids) - max_length + 1} too many for "
                        f"max_length={max_length} (which includes at least one new token): shorten it, raise "
                        "--model.max_length, or pass --data.skip_long_prompts true to skip such prompts."
                    )
                too_long.append(index)
                continue
            prompt = row["prompt"] if "prompt" in row else prompt_row["messages"][-1]["content"]
            # An input response (or final assistant message) is the reference: kept as "reference",
            # since "response" in the output is the generated one.
            extra = {k: v for k, v in row.items() if k not in ("prompt", "messages", "response")}
            if response is not None:
                extra["reference"] = response
            items.append({"index": index, "input_ids": ids, "prompt": prompt, "extra": extra})
        if too_long:
            print(
                f"[dllm_lit] skipped {len(too_long)} prompts longer than max_length={max_length}: "
                f"indices {too_long[:20]}{' ...' if len(too_long) > 20 else ''}",
                file=sys.stderr,
            )
        if sort_by_length:
            items.sort(key=lambda item: -len(item["input_ids"]))
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class SFTDataset(Dataset):
    """Prompt + response + EOS token ids, with a mask of the response positions (EOS included). A row
    with ``"finished": false`` (an answer cut at a length limit) gets no EOS."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        tokenizer,
        *,
        use_chat_template: bool,
        template_defaults: dict[str, Any] | None = None,
        max_length: int,
        truncation: str,
        source: str,
    ):
        self.items = []
        for number, row in enumerate(rows, start=1):
            prompt_row, response = split_row(row)
            if response is None:
                raise PromptError(
                    f"{source}, row {number}: training rows need a 'response' (or a final assistant message)."
                )
            prompt = encode_prompt(tokenizer, with_defaults(prompt_row, template_defaults), use_chat_template)
            answer = tokenizer(response, add_special_tokens=False).input_ids
            answer += [tokenizer.eos_token_id] if row.get("finished", True) else []
            ids = truncate(prompt + answer, max_length, truncation, f"{source}, row {number}")
            dropped = len(prompt) + len(answer) - len(ids)
            prompt_left = len(prompt) - dropped if truncation == "left" else len(prompt)
            prompt_left = min(max(prompt_left, 0), len(ids))
            if prompt_left >= len(ids):
                raise PromptError(
                    f"{source}, row {number}: truncation={truncation!r} to max_length={max_length} leaves no "
                    "response tokens to train on: raise max_length or shorten the prompt."
                )
            mask = [False] * prompt_left + [True] * (len(ids) - prompt_left)
            self.items.append((ids, mask))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: token id lists stacked, left-padded with ``pad_token_id``."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


class LeftPadCollator:
    """Stack prompts left-padded with ``pad_token_id``; keep indices, texts and extra fields."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = left_pad([item["input_ids"] for item in items], self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": [item["index"] for item in items],
            "prompt": [item["prompt"] for item in items],
            "extra": [item["extra"] for item in items],
        }


class RightPadCollator:
    """Stack SFT sequences right-padded with the fill (EOS) token; padding is outside the response mask."""

    def __init__(self, fill_id: int):
        self.fill_id = fill_id

    def __call__(self, items: list[tuple[list[int], list[bool]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.fill_id, dtype=torch.long)
        response_mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, (ids, mask) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            response_mask[row, : len(mask)] = torch.tensor(mask)
        return {"input_ids": input_ids, "response_mask": response_mask}


class StridedSampler(DistributedSampler):
    """Rank ``r`` of ``n`` takes items ``r, r + n, ...``: no padding repeats, and a rank may get none.

    Lightning keeps a ``DistributedSampler`` it is given; its own unrepeated sampler refuses ranks
    without samples, and its default one repeats samples to even out ranks.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class DataModule(L.LightningDataModule):
    """Prompts to decode (predict), prompt/response rows to train on (fit) and to score (validate/test).

    Args:
        prompt: A single prompt to decode.
        prompts: A list of prompts to decode.
        prompts_file: Prompts to decode: ``.txt`` (one a line), or ``.jsonl``/``.json``/``.parquet``
            rows with ``prompt`` or ``messages``; other fields are copied to the output.
        train_file: Training rows (``.jsonl``/``.parquet``/``.json``) with ``prompt`` + ``response``,
            or ``messages`` ending with the assistant's reply; a list of files trains on all their rows.
        val_file: Held-out rows decoded during validation; scored against ``answer`` or ``response``.
        test_file: Rows decoded by ``dllm_lit test``; defaults to ``val_file``.
        batch_size: Prompts decoded together, or sequences per training step.
        group_by_length: Train on batches of rows of similar length (transformers'
            ``LengthGroupedSampler``: random groups, the longest batch first), so that little of a
            step is padding.
        use_chat_template: Wrap each prompt as a user message with the tokenizer's chat template.
        sort_by_length: Decode prompts of similar length together (output keeps input order).
        max_length: Longest training sequence (prompt + response + EOS), linked to the model's.
        truncation: What to do with a longer training row: ``error``, or cut on the ``left``
            (start of the prompt) or the ``right`` (end of the response).
        skip_long_prompts: Skip prompts to decode that leave no room under ``max_length`` (with a
            note on stderr) instead of stopping with an error.
        num_workers: DataLoader worker processes.
        chat_template: A chat template in place of the tokenizer's: a Jinja file, or the template
            itself (for a model without one, or to change it).
        chat_template_kwargs: The template's own variables for every chat row, e.g.
            ``{"enable_thinking": false}`` (Qwen3), under a row's own ``chat_template_kwargs``.
        model_name_or_path: Whose tokenizer to use (linked to the model's by the CLI).
        trust_remote_code: Run the tokenizer code in the model directory (linked to the model's).
    """

    def __init__(
        self,
        prompt: str | None = None,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        train_file: str | list[str] | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        batch_size: int = 8,
        group_by_length: bool = False,
        use_chat_template: bool = False,
        sort_by_length: bool = True,
        max_length: int = DEFAULTS.max_length,
        truncation: Literal["error", "left", "right"] = "error",
        skip_long_prompts: bool = False,
        num_workers: int = 0,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        model_name_or_path: str = DEFAULT_MODEL,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise PromptError(f"--data.batch_size must be at least 1, got {batch_size}.")
        self.prompt, self.prompts, self.prompts_file = prompt, prompts, prompts_file
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file or val_file
        self.batch_size, self.group_by_length = batch_size, group_by_length
        self.use_chat_template = use_chat_template
        self.sort_by_length = sort_by_length
        self.max_length = max_length
        self.truncation = truncation
        self.skip_long_prompts = skip_long_prompts
        self.skip_indices: set[int] = set()  # prompts already done (resume), set by the CLI
        self.rows: list[dict[str, Any]] | None = None  # the prompt rows, once read
        self.num_workers, self.chat_template = num_workers, chat_template
        self.chat_template_kwargs = chat_template_kwargs
        template_options({"chat_template_kwargs": chat_template_kwargs})  # a bad variable fails before any model loads
        self.model_name_or_path = model_name_or_path
        self.trust_remote_code = trust_remote_code
        self.datasets: dict[str, Dataset] = {}
        # With fewer prompts than processes a rank may get none; it then just waits for the others.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def check_prompt_source(self) -> None:
        """Exactly one of prompt, prompts or prompts_file must be given."""
        given = [
            n
            for n, v in (("prompt", self.prompt), ("prompts", self.prompts), ("prompts_file", self.prompts_file))
            if v is not None
        ]
        if len(given) != 1:
            raise PromptError(
                "Give exactly one of --data.prompt, --data.prompts or --data.prompts_file"
                + (f" (got {' and '.join(given)})." if given else " (got none).")
            )

    def prompt_rows(self) -> list[dict[str, Any]]:
        """The rows to decode, in input order; read and checked once (the resume fingerprint and
        ``setup`` both use them)."""
        if self.rows is None:
            self.rows = self._read_prompt_rows()
        return self.rows

    def _read_prompt_rows(self) -> list[dict[str, Any]]:
        self.check_prompt_source()
        if self.prompts_file is not None:
            return read_rows(self.prompts_file)
        texts = [self.prompt] if self.prompt is not None else list(self.prompts)
        if not texts:
            raise PromptError("The prompts list is empty.")
        rows = [{"prompt": text} for text in texts]
        for number, row in enumerate(rows, start=1):
            _check_row(row, f"prompt {number}")
        return rows

    def _prompt_dataset(self, rows: list[dict[str, Any]], skip: set[int] = frozenset()) -> PromptDataset:
        return PromptDataset(
            rows,
            self.tokenizer,
            use_chat_template=self.use_chat_template,
            template_defaults=self.chat_template_kwargs,
            sort_by_length=self.sort_by_length,
            max_length=self.max_length,
            skip_long_prompts=self.skip_long_prompts,
            skip=skip,
        )

    def _sft_dataset(self, path: str) -> SFTDataset:
        return SFTDataset(
            read_rows(path, "--data.train_file"),
            self.tokenizer,
            use_chat_template=self.use_chat_template,
            template_defaults=self.chat_template_kwargs,
            max_length=self.max_length,
            truncation=self.truncation,
            source=path,
        )

    def _required(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise PromptError(f"This command needs --data.{name}.")
        return value

    def setup(self, stage: str) -> None:
        self.tokenizer = load_tokenizer(
            self.model_name_or_path, trust_remote_code=self.trust_remote_code, chat_template=self.chat_template
        )
        if stage == "predict" and "predict" not in self.datasets:
            self.datasets["predict"] = self._prompt_dataset(self.prompt_rows(), skip=self.skip_indices)
        if stage == "fit" and "train" not in self.datasets:
            files = self._required("train_file")
            files = [files] if isinstance(files, str) else files
            self.datasets["train"] = ConcatDataset([self._sft_dataset(path) for path in files])
        if stage in ("fit", "validate") and "val" not in self.datasets and self.val_file is not None:
            self.datasets["val"] = self._prompt_dataset(read_rows(self.val_file, "--data.val_file"))
        if stage == "validate" and "val" not in self.datasets:
            self._required("val_file")
        if stage == "test" and "test" not in self.datasets:
            self.datasets["test"] = self._prompt_dataset(read_rows(self._required("test_file"), "--data.test_file"))

    def _decode_loader(self, name: str) -> DataLoader:
        dataset, sampler = self.datasets[name], None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Lightning's default sampler pads ranks with repeats, which would count twice in metrics.
            sampler = StridedSampler(dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=LeftPadCollator(self.tokenizer.pad_token_id),
        )

    def train_dataloader(self) -> DataLoader:
        dataset, sampler = self.datasets["train"], None
        if self.group_by_length:
            sampler = LengthGroupedSampler(self.batch_size, lengths=[len(ids) for ids, _mask in dataset])
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=RightPadCollator(self.tokenizer.eos_token_id),
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._decode_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._decode_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._decode_loader("predict")
