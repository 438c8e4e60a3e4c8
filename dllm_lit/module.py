"""``BlockRefineLM``: a LightningModule whose ``predict_step`` runs block-refine decoding."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from dllm_lit.decoding import generate_blocks
from dllm_lit.models import DEFAULT_MODEL, load_model, load_tokenizer


class BlockRefineLM(L.LightningModule):
    """A Hugging Face causal LM decoded in blocks of ``add_eos_length + 1`` tokens.

    Args:
        model_name_or_path: A local HF directory, a ``.gguf`` file, or ``smollm2`` (the embedded
            SmolLM2-135M-Instruct).
        add_eos_length: EOS fill tokens per block; each block is ``add_eos_length + 1`` tokens.
        refine_iter: Forward passes per block. ``>= add_eos_length + 1`` equals greedy decoding.
        max_new_tokens: At most this many generated tokens per prompt.
        max_length: At most this many tokens per prompt, prompt included.
        stop_token_ids: Extra token ids that end a response, like EOS.
        temperature: 0 decodes greedily (exact, the default); above 0 samples.
        top_k: When sampling, keep the k most likely tokens.
        top_p: When sampling, nucleus threshold.
        use_cache: Keep a prefix KV cache (same tokens, far fewer FLOPs).
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        add_eos_length: int = 127,
        refine_iter: int = 2,
        max_new_tokens: int = 1024,
        max_length: int = 8192,
        stop_token_ids: list[int] | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.load_seconds = 0.0

    def configure_model(self) -> None:
        """Load weights under the trainer's precision context (idempotent)."""
        if self.model is not None:
            return
        start = time.perf_counter()
        self.tokenizer = load_tokenizer(self.hparams.model_name_or_path)
        self.model = load_model(self.hparams.model_name_or_path)
        self.load_seconds = time.perf_counter() - start

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Run the engine with this module's settings."""
        hp = self.hparams
        return generate_blocks(
            self.model,
            input_ids,
            attention_mask=attention_mask,
            eos_token_id=self.tokenizer.eos_token_id,
            max_new_tokens=hp.max_new_tokens,
            add_eos_length=hp.add_eos_length,
            refine_iter=hp.refine_iter,
            max_length=hp.max_length,
            stop_token_ids=hp.stop_token_ids or (),
            temperature=hp.temperature,
            top_k=hp.top_k,
            top_p=hp.top_p,
            use_cache=hp.use_cache,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Decode one batch; return one plain row per prompt."""
        result = self.decode(batch["input_ids"], batch["attention_mask"])
        self.last_batch_stats = {"forwards": result.forwards, "generated_tokens": result.generated_tokens}
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = []
        for index, prompt, extra, length, row in zip(
            batch["index"], batch["prompt"], batch["extra"], lengths, result.rows
        ):
            rows.append(
                {
                    **extra,
                    "index": index,
                    "prompt": prompt,
                    "response": self.tokenizer.decode(row.token_ids, skip_special_tokens=True),
                    "prompt_length": length,
                    "response_length": len(row.token_ids),
                    "stop_reason": row.stop_reason,
                    "forwards": row.forwards,
                    "tokens_per_forward": round(row.tokens_per_forward, 4),
                }
            )
        return rows
