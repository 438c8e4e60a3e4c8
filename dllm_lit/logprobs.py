"""Token log-probabilities: how likely the model found each token it produced.

With ``DecodeSettings.logprobs = k`` (``None``: off, nothing computed) every decoding loop keeps,
beside the tokens of each block or pass, one float tensor ``[rows, width, 1 + 2k]``
(:func:`token_scores`): the picked token's log-probability, then the ``k`` most likely tokens'
log-probabilities and their ids. Log-probabilities are the log-softmax of the model's logits at
the token's position in the pass that picked it (before temperature and top-k/p/min-p, as vLLM and
``generate``'s ``output_logits`` report them; after ``logit_bias``, the penalties and a grammar's
mask, when set, which vLLM's precede: a token the grammar forbids reads :data:`FORBIDDEN`); in
lossless mode and in exact block mode those are the autoregressive ones. The ids ride as floats
(exact below ``2**24``, far above any vocabulary) so one tensor follows the tokens through the
loops' indexing, ``where``, gather and scatter, and reaches the host once, at the commit
(:func:`entries`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import DynamicCache

EXACT_IDS = 2**24
"""Token ids are stored as float32: exact below this."""
FORBIDDEN = -9999.0
"""The log-probability reported for a token a grammar forbids (-inf is not JSON; vLLM's value)."""


class TokenLogprob(NamedTuple):
    """One token, its log-probability and the ``k`` most likely tokens' at its position
    (``(token_id, logprob)``, most likely first). A prompt's first token has neither (None)."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None


def token_scores(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """The picked tokens' log-probabilities, then the ``top`` best ones' and their ids (as floats)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=FORBIDDEN)
    chosen = logprobs.gather(-1, tokens[..., None])
    if not top:
        return chosen
    best = logprobs.topk(top, dim=-1)
    return torch.cat([chosen, best.values, best.indices.float()], dim=-1)


@torch.inference_mode()
def prompt_logprobs(model: torch.nn.Module, ids: list[int], top: int, chunk: int = 512) -> list[TokenLogprob]:
    """Each prompt token's log-probability after the tokens before it, and the ``top`` best there
    (one forward over the prompt, ``chunk`` tokens at a time over a KV cache: at most ``chunk`` rows of
    logits at once). The first token has none."""
    device = next(model.parameters()).device
    tokens, cache, scores = torch.tensor([ids], device=device), DynamicCache(), []
    for start in range(0, len(ids) - 1, chunk):
        piece = tokens[:, start : min(start + chunk, len(ids) - 1)]
        logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits
        scores += token_scores(logits[0], tokens[0, start + 1 : start + 1 + piece.shape[1]], top).tolist()
    return [TokenLogprob(ids[0], None, None), *entries(ids[1:], scores)]


def entries(token_ids: list[int], scores: list[list[float]]) -> list[TokenLogprob]:
    """One row's tokens and their scores (``token_scores(...)[row].tolist()``) as :class:`TokenLogprob`."""
    top = (len(scores[0]) - 1) // 2 if scores else 0
    return [
        TokenLogprob(token, score[0], tuple(zip(map(int, score[1 + top :]), score[1 : 1 + top], strict=True)))
        for token, score in zip(token_ids, scores, strict=True)
    ]


def openai_logprobs(tokenizer, chat: bool, scored: list, offset: int = 0) -> dict[str, Any]:
    """OpenAI's ``logprobs`` of a choice for ``scored`` tokens (:class:`TokenLogprob`, or the same as JSON
    lists): chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}``, or the completion
    API's ``{tokens, token_logprobs, top_logprobs, text_offset}`` (``offset``: the first token's
    offset in the choice's text; each top dict holds the chosen token too, as OpenAI's do; an echoed
    prompt's first token has None for both). A token's text is as the answer shows it: special
    tokens read as empty strings."""

    def text_of(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=True)

    tokens = [(text_of(token_id), logprob, top) for token_id, logprob, top in scored]
    if chat:
        content = [
            _token(text, logprob) | {"top_logprobs": [_token(text_of(i), value) for i, value in top]}
            for text, logprob, top in tokens
        ]
        return {"content": content}
    offsets = [offset + sum(len(text) for text, _, _ in tokens[:n]) for n in range(len(tokens))]
    return {
        "tokens": [text for text, _, _ in tokens],
        "token_logprobs": [logprob for _, logprob, _ in tokens],
        "top_logprobs": [
            None if top is None else {text_of(i): value for i, value in top} | {text: logprob}
            for text, logprob, top in tokens
        ],
        "text_offset": offsets,
    }


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
