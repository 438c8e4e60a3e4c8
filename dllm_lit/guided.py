"""Structured output: every answer follows a grammar (a JSON schema, a regex, a choice, a Lark or GBNF grammar).

llguidance (the engine vLLM and transformers' users take for this) compiles the ``guided_*`` setting
and keeps a matcher per batch row. A pass predicts several positions, and each follows its own text:
position ``j`` follows the committed answer and the tokens the pass fed before it (``pending``, as for
:mod:`~dllm_lit.penalties`). :class:`Guide` masks every position with the grammar's state after that
text, all of a row's states in one llguidance call (its speculative-decoding API), so lossless and
exact mode pick exactly the tokens constrained autoregressive decoding picks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

from dllm_lit.settings import GUIDED, DecodeSettings

BITS = torch.arange(32, dtype=torch.int32)


def grammar_of(settings: DecodeSettings) -> str | None:
    """The llguidance grammar of the ``guided_*`` setting, or None without one."""
    if all(getattr(settings, name) is None for name in GUIDED):
        return None  # llguidance is imported only where a grammar is asked for
    from llguidance import LLMatcher

    if settings.guided_json is not None:
        return LLMatcher.grammar_from_json_schema(settings.guided_json)
    if settings.guided_regex is not None:
        return LLMatcher.grammar_from_regex(settings.guided_regex)
    if settings.guided_choice is not None:
        choices = " | ".join(json.dumps(text, ensure_ascii=False) for text in settings.guided_choice)
        return LLMatcher.grammar_from_lark(f"start: {choices}")
    if settings.guided_grammar is not None:
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            return LLMatcher.grammar_from_lark(any_to_lark(settings.guided_grammar))
        except GbnfToLarkError as error:
            raise ValueError(f"guided_grammar is neither Lark nor GBNF: {' '.join(str(error).split())}") from None
    return None


def row_grammars(
    settings: DecodeSettings, rows: int, row_guides: Sequence[Mapping | None] | None = None
) -> list[str | None]:
    """Each row's llguidance grammar (None: unconstrained): its own ``guided_*`` setting
    (``row_guides[r]``, such as ``{"guided_json": schema}``, checked as the settings check theirs), else
    the call's."""
    own = grammar_of(settings)
    if row_guides is None:
        return [own] * rows
    if len(row_guides) != rows:
        raise ValueError(f"row_guides has {len(row_guides)} entries for {rows} prompts.")
    unknown = sorted({name for guide in row_guides if guide for name in guide} - set(GUIDED))
    if unknown:
        raise ValueError(f"row_guides may only name {', '.join(GUIDED)}; got {', '.join(unknown)}.")
    cleared = settings.replace(**dict.fromkeys(GUIDED))
    return [own if guide is None else grammar_of(cleared.replace(**guide)) for guide in row_guides]


def guide_fields(fields: Mapping) -> dict | None:
    """The ``guided_*`` fields among ``fields`` (a prompt row, a request's), as settings take them
    (``guided_json``: a schema object or its text; ``guided_choice``: a list or tuple), or None without any."""
    guide = {name: fields[name] for name in GUIDED if fields.get(name) is not None}
    if isinstance(guide.get("guided_json"), dict):
        guide["guided_json"] = json.dumps(guide["guided_json"])
    if guide.get("guided_choice") is not None:
        guide["guided_choice"] = tuple(guide["guided_choice"])
    return guide or None


def check_grammar(settings: DecodeSettings, name: str) -> None:
    """Raise ValueError, one sentence, when the ``guided_*`` setting ``name`` does not compile."""
    from llguidance import LLMatcher

    if name == "guided_json":
        try:
            json.loads(settings.guided_json)
        except ValueError as error:
            raise ValueError(f"guided_json is not a JSON schema: {error}.") from None
    problem = LLMatcher.validate_grammar(grammar_of(settings))
    if problem:
        raise ValueError(f"{name} does not compile: {' '.join(problem.split())[:300]}")


@lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer, vocab: int, stop_ids: tuple[int, ...]):
    """llguidance's view of ``tokenizer`` over a ``vocab``-wide head; ``stop_ids`` end a grammar
    (about 0.4 s to build, so kept)."""
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(stop_ids))
    except ValueError as error:  # a slow (Python) tokenizer, or a decoder llguidance does not know
        raise ValueError(f"llguidance cannot read this tokenizer for guided decoding: {error}.") from None


class Guide:
    """Each batch row's grammar state, and the masks that keep a pass's picks inside the grammar (see the
    module's docstring). Follows the batch as rows leave it (:meth:`keep`).

    Args:
        grammars: Each batch row's llguidance grammar (:func:`row_grammars`; None: unconstrained).
        tokenizer: The model's (fast) tokenizer.
        stop_ids: The tokens that end an answer; the grammar allows them once it is complete.
        vocab_size: The width of the model's logits, if known before the first pass.
    """

    def __init__(self, grammars: list[str | None], tokenizer, stop_ids: torch.Tensor, vocab_size: int | None = None):
        self.grammars, self.tokenizer = grammars, tokenizer
        self.stop_ids, self.vocab_size = tuple(stop_ids.tolist()), vocab_size
        self.matchers: list | None = None

    @classmethod
    def build(
        cls,
        settings: DecodeSettings,
        tokenizer,
        rows: int,
        stop_ids: torch.Tensor,
        vocab_size: int | None = None,
        row_guides: Sequence[Mapping | None] | None = None,
    ) -> Guide | None:
        """The call's guide (``row_guides``: see :func:`row_grammars`), or None where no row has a grammar."""
        grammars = row_grammars(settings, rows, row_guides)
        if not any(grammars):
            return None
        if tokenizer is None:
            raise ValueError("Guided decoding needs the tokenizer: generate_blocks(..., tokenizer=tokenizer).")
        return cls(grammars, tokenizer, stop_ids, vocab_size)

    def _start(self, vocab: int) -> None:
        from llguidance import LLExecutor, LLMatcher

        if self.vocab_size not in (None, vocab):
            raise ValueError(f"The model's logits have {vocab} ids, but its config.vocab_size says {self.vocab_size}.")
        self.vocab_size = vocab
        ll_tokenizer = _ll_tokenizer(self.tokenizer, vocab, self.stop_ids)
        self.matchers = [None if g is None else LLMatcher(ll_tokenizer, g, log_level=0) for g in self.grammars]
        self.executor = LLExecutor()

    def __call__(self, logits: torch.Tensor, pending: torch.Tensor | None = None, rows=None) -> torch.Tensor:
        """``logits`` ``[n, k, vocab]`` with -inf where the grammar forbids a token; ``pending``
        ``[n, k]``: the token each position was fed (-1: none), text for it and the positions after;
        ``rows``: the batch row of each of ``logits``' (default: one each, in order)."""
        count, width, vocab = logits.shape
        if self.matchers is None or vocab != self.vocab_size:
            self._start(vocab)
        rows = range(count) if rows is None else rows.tolist()
        fed = [[]] * count if pending is None else pending.tolist()
        words = (vocab + 31) // 32
        bitmask = torch.full((count * (width + 1), words), -1, dtype=torch.int32)  # -1: all allowed
        jobs, states = [], []
        for index, (row, tokens) in enumerate(zip(rows, fed)):
            first = int(bool(tokens) and tokens[0] >= 0)  # position 0 reads the state after tokens[0]
            draft = tokens[1 - first :]
            draft = draft[: next((at for at, token in enumerate(draft) if token < 0), len(draft))]
            if self.matchers[row] is not None:  # an unconstrained row's mask stays all ones
                jobs.append((self.matchers[row], index * (width + 1), draft))
            states.append(first)
        self._fill(jobs, bitmask)
        allowed = ((bitmask[:, :, None] >> BITS) & 1).bool().view(count, width + 1, words * 32)[..., :vocab]
        allowed = torch.stack([allowed[index, first : first + width] for index, first in enumerate(states)])
        if pending is None:
            allowed = allowed[:, :1].expand(count, width, vocab)
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # a row in an error state masks nothing
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def _fill(self, jobs: list, bitmask: torch.Tensor) -> None:
        """Run ``(matcher, first mask row, draft)`` jobs, in rounds that name each matcher once (llguidance
        borrows it for a call; a row's alternatives name its matcher several times)."""
        from llguidance.torch import fill_next_token_bitmask_par, fill_next_token_bitmask_par_with_draft_tokens

        while jobs:
            named, now, later = set(), [], []
            for job in jobs:
                (later if id(job[0]) in named else now).append(job)
                named.add(id(job[0]))
            single = [(matcher, index) for matcher, index, draft in now if not draft]  # the API wants a draft
            if single:
                fill_next_token_bitmask_par(self.executor, single, bitmask)
            drafted = [job for job in now if job[2]]
            if drafted:
                fill_next_token_bitmask_par_with_draft_tokens(self.executor, drafted, bitmask)
            jobs = later

    def forced(self, size: int) -> list[list[int]]:
        """Each row's next tokens, up to ``size``, that the grammar allows alone (llguidance's
        fast-forward tokens: ``{"name":"`` at the start of compact JSON); none before the first mask
        unless the vocabulary's size was known."""
        if self.matchers is None and self.vocab_size is not None:
            self._start(self.vocab_size)
        if self.matchers is None:
            return [[] for _ in self.grammars]
        return [matcher.compute_ff_tokens()[:size] if live(matcher) else [] for matcher in self.matchers]

    def add(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Each row's first ``lengths`` (default: all) of ``tokens`` ``[rows, n]`` join its answer."""
        if self.matchers is None:
            return
        lengths = [tokens.shape[1]] * tokens.shape[0] if lengths is None else lengths.tolist()
        for matcher, row, length in zip(self.matchers, tokens.tolist(), lengths):
            if live(matcher):
                matcher.consume_tokens(row[:length])

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these batch rows, in this order (as the loop's batch does)."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        self.grammars = [self.grammars[row] for row in rows]
        if self.matchers is not None:
            self.matchers = [self.matchers[row] for row in rows]


def live(matcher) -> bool:
    """Whether a row's matcher (None: the row is unconstrained) still reads tokens."""
    return matcher is not None and not matcher.is_stopped()
