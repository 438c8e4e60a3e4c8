"""``BlockRefineLM``: a LightningModule that decodes in blocks and trains models to fill them."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torchmetrics import MeanMetric
from transformers import get_cosine_schedule_with_warmup

from dllm_lit.adapters import DraftGate, adapter_base, add_lora, continue_adapter, draft_gate, is_adapter
from dllm_lit.answers import is_correct
from dllm_lit.checkpoints import CheckpointError
from dllm_lit.decoding import generate_blocks
from dllm_lit.guided import guide_fields, row_grammars
from dllm_lit.ledger import BlockGeneration, RowResult
from dllm_lit.logprobs import openai_logprobs
from dllm_lit.models import DEFAULT_MODEL, default_model_note, load_model, load_tokenizer, resolve
from dllm_lit.settings import DecodeSettings
from dllm_lit.textstream import first_stop
from dllm_lit.training import (
    block_refine_losses,
    iterative_refine_losses,
    response_cross_entropy,
    response_kl,
    weighted_total,
)


@dataclass
class PredictedBatch:
    """What ``predict_step`` returns: the output rows and the batch's decoding statistics.

    Attributes:
        rows: One plain dict per prompt (``index``, ``prompt``, ``response``, ...), ready to write.
        forwards: Forward passes the batch took.
        generated_tokens: Tokens generated over all rows, stop tokens included.
    """

    rows: list[dict[str, Any]]
    forwards: int
    generated_tokens: int


def check_training(num_iterations: int, noise_min: float, noise_max: float, loss_weights: list[float] | None) -> None:
    """Reject training settings that cannot work, with one sentence naming the setting."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be at least 1, got {num_iterations}.")
    if not 0 <= noise_min <= noise_max <= 1:
        raise ValueError(
            f"noise_min and noise_max must satisfy 0 <= noise_min <= noise_max <= 1, got {noise_min} and {noise_max}."
        )
    if loss_weights is not None and len(loss_weights) != num_iterations:
        raise ValueError(f"loss_weights has {len(loss_weights)} entries but num_iterations is {num_iterations}.")


class BlockRefineLM(L.LightningModule):
    """A Hugging Face causal LM decoded in blocks of ``add_eos_length + 1`` tokens.

    Args:
        model_name_or_path: A local HF directory, a ``.gguf`` file, a Hub id already in the local
            Hugging Face cache (never downloaded), a peft adapter directory (merged
            onto its base at load; a draft adapter stays apart and drafts in lossless mode),
            ``smollm2`` (the embedded SmolLM2-135M-Instruct), ``smollm2-fast`` (the same with the
            shipped draft adapter) or ``tiny-char`` (a fresh tiny model for toy tasks).
        trust_remote_code: Run the Python code shipped in the model directory (off by default; only
            for models whose code you trust).
        full_text: Also write ``full_text`` (prompt and response decoded as one text) and
            ``total_length`` (prompt + response tokens) per row, as the original script did.
        num_iterations: Training rounds of the iterative refine objective (1 = one noised pass).
        noise_min: Training: lower bound of the fraction of response tokens replaced by EOS.
        noise_max: Training: upper bound of that fraction (0 and 0 with one round = plain SFT).
        noise_layout: Training: ``scattered`` replaces that fraction anywhere in the response;
            ``blocks`` noises it the way decoding sees it: blocks of ``add_eos_length + 1`` tokens,
            each an opening token then fills, each after a clean prefix (one forward for all blocks
            under a block-causal mask; ``noise_min``/``noise_max`` are not used).
        loss_weights: Training: weight of each round's loss (default: 1 each).
        ar_loss_weight: Training: weight of a plain next-token loss on the clean response, added to
            the refine losses so answers stay the model's own (0: off).
        ar_loss_target: Training: what that loss matches. ``data``: the rows' response tokens
            (cross-entropy). ``base``: the base model's whole next-token distribution on them (KL
            divergence; the adapter is switched off for a pass without gradients, so it needs
            ``lora_rank``), which holds answers to the base's own beyond the training rows.
        lora_rank: Training: LoRA rank on every linear layer but the output head (peft); only the
            adapter trains, and the export is the adapter. 0: full fine-tuning. With an adapter as
            ``model_name_or_path`` (``smollm2-fast``), that adapter trains further (its rank).
        lora_alpha: Training: LoRA scaling numerator (default: twice the rank).
        lora_dropout: Training: dropout on the LoRA branch.
        gradient_checkpointing: Training: recompute activations in the backward pass (less memory).
        draft_adapter: Training (LoRA, ``noise_layout: blocks``): the adapter only drafts. The base
            model reads the clean tokens (adapter off, no gradient) and the adapter the noised blocks;
            the export is marked so that lossless decoding drafts with the adapter and verifies with
            the base, so answers stay exactly the base model's own (``ar_loss_weight`` is not used).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay.
        **decoding: Decoding settings, every field of :class:`~dllm_lit.settings.DecodeSettings`
            (``add_eos_length``, ``refine_iter``, ``max_new_tokens``, ...).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        trust_remote_code: bool = False,
        full_text: bool = False,
        num_iterations: int = 2,
        noise_min: float = 0.0,
        noise_max: float = 1.0,
        noise_layout: Literal["scattered", "blocks"] = "scattered",
        loss_weights: list[float] | None = None,
        ar_loss_weight: float = 0.0,
        ar_loss_target: Literal["data", "base"] = "data",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        draft_adapter: bool = False,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        **decoding: Any,
    ):
        super().__init__()
        try:  # fail before any model loads, naming the flag
            self.decoding = DecodeSettings(**decoding)
            check_training(num_iterations, noise_min, noise_max, loss_weights)
            if lora_rank < 0 or ar_loss_weight < 0:
                raise ValueError("lora_rank and ar_loss_weight must be 0 or more.")
            if ar_loss_target == "base" and not lora_rank:
                raise ValueError("ar_loss_target base needs a lora_rank: the base is the model with its adapter off.")
            if draft_adapter and not (lora_rank and noise_layout == "blocks" and not gradient_checkpointing):
                raise ValueError(
                    "draft_adapter needs lora_rank > 0 and noise_layout: blocks, without gradient_checkpointing."
                )
        except ValueError as error:
            raise ValueError(f"--model.{error}") from None
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self.accuracy = MeanMetric()
        self.tokens_per_forward = MeanMetric()
        self.forwards = MeanMetric()
        self.agreement = MeanMetric()

    def configure_model(self) -> None:
        """Load weights under the trainer's precision context (idempotent)."""
        if self.model is not None:
            return
        name, trust = self.hparams.model_name_or_path, self.hparams.trust_remote_code
        self.tokenizer = load_tokenizer(name, trust_remote_code=trust)
        hp = self.hparams
        adapter = resolve(name) if hp.get("lora_rank") else None
        if adapter is not None and not is_adapter(adapter):
            adapter = None
        model = load_model(adapter_base(adapter) if adapter else name, trust_remote_code=trust)
        if hp.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if adapter:  # LoRA on an adapter: train that adapter further, on its own base
            model = continue_adapter(model, adapter, hp.lora_rank)
        elif hp.get("lora_rank"):
            model = add_lora(model, hp.lora_rank, hp.lora_alpha, hp.lora_dropout, base_name=name)
        if hp.get("lora_rank") and hp.get("gradient_checkpointing"):
            model.enable_input_require_grads()
        if hp.get("draft_adapter"):  # decoding drafts with the adapter and verifies with the base
            model.draft_gate = DraftGate(model)
        self.model = model.train(self.training)

    def on_predict_start(self) -> None:
        """Refuse prompts whose own grammar cannot be followed, before any is decoded; a note (rank 0)
        when the embedded model, as shipped (no checkpoint or adapter), is decoded in a way that gives
        it poor answers."""
        prompts = getattr(self.trainer.datamodule, "datasets", {}).get("predict")
        if prompts is not None:
            self.check_row_guides(prompts.items)
        bare = self.trainer.datamodule is not None and not self.trainer.datamodule.use_chat_template
        note = default_model_note(self.hparams.model_name_or_path, self.decoding, bare)
        shipped = self.trainer.ckpt_path is None and not self.hparams.get("lora_rank")
        if note and shipped and self.trainer.is_global_zero:
            print(note, file=sys.stderr, flush=True)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_row: dict[str, list] | None = None):
        """Run the engine with this module's settings (``per_row``: :meth:`per_row` options)."""
        return generate_blocks(
            self.model,
            input_ids,
            self.decoding,
            attention_mask=attention_mask,
            eos_token_id=self.tokenizer.eos_token_id,
            tokenizer=self.tokenizer,
            **(per_row or {}),
        )

    def per_row(self, batch: dict[str, Any]) -> dict[str, list]:
        """The rows' own ``generate_blocks`` options: prompt ``i`` samples with ``seed + i`` (whatever its
        batch, and on resume), and a row with ``guided_*`` fields follows its own grammar."""
        options: dict[str, list] = {}
        if self.decoding.seed is not None:
            options["row_seeds"] = [self.decoding.seed + int(index) for index in batch["index"]]
        guides = [guide_fields(extra) for extra in batch["extra"]]
        if any(guide is not None for guide in guides):
            options["row_guides"] = guides
        return options

    def check_row_guides(self, rows: list[dict[str, Any]]) -> None:
        """Refuse, before decoding, a prompt whose ``guided_*`` fields these settings cannot follow."""
        for row in rows:
            guide = guide_fields(row["extra"])
            if guide is not None:
                try:
                    row_grammars(self.decoding, 1, [guide])
                except ValueError as error:
                    raise ValueError(f"Prompt {row['index']}: {error}") from None

    def response_text(self, row: RowResult) -> str:
        """A row's text as written: special tokens skipped, ended before a stop string."""
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        cut = first_stop(text, self.decoding.stop_strings) if row.stop_reason == "stop_string" else None
        return text if cut is None else text[:cut]

    def decode_splitting_on_oom(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_row: dict[str, list] | None = None
    ) -> BlockGeneration:
        """:meth:`decode`, retrying a batch that runs out of memory as two halves (down to one prompt)."""
        try:
            return self.decode(input_ids, attention_mask, per_row)
        except torch.OutOfMemoryError:
            rows = input_ids.shape[0]
            if rows == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = rows // 2
            rank_zero_warn(f"Out of memory decoding {rows} prompts at once; retrying as {half} + {rows - half}.")
            per_row = per_row or {}
            halves = [
                {name: values[part] for name, values in per_row.items()} for part in (slice(half), slice(half, None))
            ]
            first = self.decode_splitting_on_oom(input_ids[:half], attention_mask[:half], halves[0])
            second = self.decode_splitting_on_oom(input_ids[half:], attention_mask[half:], halves[1])
            return BlockGeneration.concat([first, second])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> PredictedBatch:
        """Decode one batch; return one plain row per prompt and the batch statistics."""
        result = self.decode_splitting_on_oom(batch["input_ids"], batch["attention_mask"], self.per_row(batch))
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = []
        for position, (index, prompt, extra, length, row) in enumerate(
            zip(batch["index"], batch["prompt"], batch["extra"], lengths, result.rows)
        ):
            rows.append(
                {
                    **extra,
                    "index": index,
                    "prompt": prompt,
                    "response": self.response_text(row),
                    "prompt_length": length,
                    "response_length": len(row.token_ids),
                    "stop_reason": row.stop_reason,
                    "forwards": row.forwards,
                    "tokens_per_forward": round(row.tokens_per_forward, 4),
                }
            )
            if self.decoding.prompt_cache_mib:  # prompt tokens read from the prompt cache
                rows[-1]["cached_tokens"] = row.cached_tokens
            if row.logprobs is not None:  # --model.logprobs: as OpenAI's completion API shows them
                rows[-1]["logprobs"] = openai_logprobs(self.tokenizer, False, row.logprobs)
            if self.hparams.full_text:
                prompt_ids = batch["input_ids"][position, batch["input_ids"].shape[1] - length :].tolist()
                rows[-1]["full_text"] = self.tokenizer.decode(prompt_ids + row.token_ids, skip_special_tokens=True)
                rows[-1]["total_length"] = length + len(row.token_ids)
        return PredictedBatch(rows=rows, forwards=result.forwards, generated_tokens=result.generated_tokens)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The iterative refine loss; logs each round's loss and the weighted total."""
        hp = self.hparams
        rounds = dict(fill_id=self.tokenizer.eos_token_id, num_iterations=hp.num_iterations)
        rounds["clean_logits"] = bool(hp.get("ar_loss_weight")) and not hp.get("draft_adapter")
        if hp.get("noise_layout") == "blocks":
            blocks = dict(block_size=self.decoding.width, clean_by_base=bool(hp.get("draft_adapter")))
            objective = partial(block_refine_losses, **blocks, **rounds)
        else:
            objective = partial(iterative_refine_losses, noise_min=hp.noise_min, noise_max=hp.noise_max, **rounds)
        gate = draft_gate(self.model)
        with gate.tokens(None) if gate else nullcontext():  # a draft adapter trains on every token it reads
            losses, clean_logits = objective(self.model, batch["input_ids"], batch["response_mask"])
        for round_index, loss in enumerate(losses):
            self.log(f"train/loss_round{round_index}", loss)
        total = weighted_total(losses, hp.loss_weights)
        if clean_logits is not None:
            ar_loss = self.autoregressive_loss(clean_logits, batch["input_ids"], batch["response_mask"].bool())
            self.log("train/loss_ar", ar_loss)
            total = total + hp.ar_loss_weight * ar_loss
        self.log("train/loss", total, prog_bar=True)
        return total

    def autoregressive_loss(self, clean_logits: torch.Tensor, ids: torch.Tensor, response_mask: torch.Tensor):
        """The clean rows' loss: cross-entropy against the response, or KL from the base model's
        distributions (``ar_loss_target: base``)."""
        if self.hparams.get("ar_loss_target", "data") == "data":
            return response_cross_entropy(clean_logits, ids, response_mask)
        with torch.no_grad(), self.model.disable_adapter():
            teacher = self.model(input_ids=ids, use_cache=False).logits
        return response_kl(clean_logits, teacher, response_mask)

    def _score(self, batch: dict[str, Any], prefix: str) -> None:
        """Decode held-out prompts with the same engine as predict; log accuracy, speed and agreement
        with the model's own autoregressive answer."""
        result = self.decode_splitting_on_oom(batch["input_ids"], batch["attention_mask"], self.per_row(batch))
        own = self._own_answers(batch, result)
        for extra, row, own_ids in zip(batch["extra"], result.rows, own or [None] * len(result.rows)):
            reference = extra.get("answer", extra.get("reference"))
            response = self.response_text(row)
            self.accuracy.update(float(reference is not None and is_correct(response, str(reference))))
            self.tokens_per_forward.update(row.tokens_per_forward)
            self.forwards.update(row.forwards)
            if own_ids is not None:
                self.agreement.update(float(row.token_ids == own_ids))
        batch_size = len(result.rows)
        names = ("accuracy", "tokens_per_forward", "forwards") + (("agreement",) if own else ())
        for name in names:
            self.log(f"{prefix}/{name}", getattr(self, name), batch_size=batch_size, prog_bar=name == "accuracy")

    def _own_answers(self, batch: dict[str, Any], result: BlockGeneration) -> list[list[int]] | None:
        """The model's greedy autoregressive answers (lossless decoding), or None when sampling."""
        settings = self.decoding
        if settings.temperature > 0:
            return None
        if settings.lossless or settings.refine_iter >= settings.width:  # already the model's own answer
            return [row.token_ids for row in result.rows]
        own = generate_blocks(
            self.model,
            batch["input_ids"],
            settings.replace(lossless=True, backend="eager"),
            attention_mask=batch["attention_mask"],
            eos_token_id=self.tokenizer.eos_token_id,
            tokenizer=self.tokenizer,
        )
        return [row.token_ids for row in own.rows]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A LoRA fit's checkpoint keeps only the weights that train (the adapter: megabytes, not the
        base model's hundreds); loading rebuilds the base from ``model_name_or_path``. Where the saved
        names are not the module's own (a strategy that renames them), it keeps everything."""
        if self.hparams.get("lora_rank"):
            trainable = self._trainable_shapes()
            adapter = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
            if len(adapter) == len(trainable):
                checkpoint["state_dict"], checkpoint["adapter_only"] = adapter, True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """An adapter-only checkpoint loads non-strictly, once its names and shapes are this model's
        trainable ones."""
        self.strict_loading = not checkpoint.get("adapter_only")
        if self.strict_loading:
            return
        if {k: v.shape for k, v in checkpoint["state_dict"].items()} != self._trainable_shapes():
            raise CheckpointError(
                f"The checkpoint's adapter does not fit {self.hparams.model_name_or_path!r} with "
                f"lora_rank={self.hparams.get('lora_rank')}: give the base model and LoRA settings it was trained with."
            )

    def _trainable_shapes(self) -> dict[str, torch.Size]:
        """Name -> shape of every parameter that trains (the adapter's alone under LoRA)."""
        return {name: parameter.shape for name, parameter in self.named_parameters() if parameter.requires_grad}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by norm under FSDP as well: the norm over every shard, through FSDP's own
        ``clip_grad_norm_`` (Lightning's FSDP precision refuses ``gradient_clip_algorithm='norm'``)."""
        sharded = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(sharded, FSDP):
            sharded.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # only the adapter under LoRA
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, self.hparams.warmup_steps, max(self.trainer.estimated_stepping_batches, 1)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
