"""``DecodeSettings``: the one home of every decoding setting, its default, its documentation and its check.

Python calls (``generate_blocks(..., refine_iter=2)``), the CLI's flat flags (``--model.refine_iter``)
and YAML configs are all built from this dataclass.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

Backend = Literal["eager", "cuda_graph", "inductor"]
BACKENDS: tuple[str, ...] = ("eager", "cuda_graph", "inductor")

LEGACY_COMPILE = {False: "eager", True: "cuda_graph", "inductor": "inductor"}


@dataclass(frozen=True)
class DecodeSettings:
    """How to decode: block shape, length limits, stop tokens, sampling and the execution backend.

    Attributes:
        add_eos_length: EOS fill tokens appended per block; the block width is ``add_eos_length + 1``.
        refine_iter: Forward passes per block (draft + refinements). ``>= add_eos_length + 1`` gives
            exactly the greedy autoregressive output.
        max_new_tokens: At most this many generated tokens per prompt, the stop token included.
        max_length: At most this many tokens per prompt, the prompt (without padding) included.
        min_new_tokens: No stop token (EOS, ``stop_token_ids``) is picked before this many tokens
            (transformers' ``min_new_tokens``, vLLM's ``min_tokens``; 0: off). Stop strings and the
            length limits still end a response.
        stop_token_ids: Extra token ids that end a response, like EOS.
        stop_strings: Texts (one, or a list) that end a response once its text holds one (the tokens through
            it are kept; written responses end before it). Needs the tokenizer:
            ``generate_blocks(..., tokenizer=)``; the CLI passes the model's.
        temperature: 0 decodes greedily (exact, the default); above 0 samples (exact and lossless mode:
            the tokens of an autoregressive sampler with the same keyed numbers).
        top_k: When sampling, keep only the k most likely tokens.
        top_p: When sampling, the nucleus threshold (0 < top_p <= 1).
        min_p: When sampling, drop tokens less likely than ``min_p`` times the most likely one
            (0 <= min_p <= 1; transformers' and vLLM's ``min_p``).
        repetition_penalty: Divide a positive logit (multiply a negative one) by this for every token
            already in the prompt or the answer (transformers' and vLLM's ``repetition_penalty``; 1: off,
            above 1 repeats less).
        presence_penalty: Subtract this from the logit of every token the answer already holds
            (OpenAI's ``presence_penalty``, -2..2; 0: off).
        frequency_penalty: Subtract this times the number of times the answer already holds a token
            from its logit (OpenAI's ``frequency_penalty``, -2..2; 0: off).
        logit_bias: Token id to a value (-100..100) added to its logit at every step (OpenAI's
            ``logit_bias``; -100 bans a token). Biases and penalties apply in every mode and on every
            backend, before temperature and top-k/p/min-p; lossless and exact mode still give the
            model's own autoregressive tokens under them.
        seed: Sampling seed: row ``r`` of a call samples with ``seed + r`` (``predict``: prompt ``i``
            with ``seed + i``; ``serve``: choice ``j`` with ``seed + j``), each token with a number
            keyed by that seed and its position in the answer, so an answer does not depend on its
            batch, backend or window. None: seeds from torch's global generator (seeded by
            ``--seed_everything`` under the CLI).
        ignore_eos: EOS still fills blocks but no longer ends a row (``stop_token_ids`` still do);
            for benchmarks that need a fixed number of tokens.
        use_cache: Keep a prefix KV cache of committed tokens (same tokens, far fewer FLOPs). False
            re-encodes the whole sequence every pass (the reference, and the fallback for models
            without a cache).
        prompt_cache_mib: Prompt caching (vLLM's automatic prefix caching): keep up to this many MiB
            of recent prompts' K/V with the model, so that a call whose prompts all begin as a kept
            prompt began (a shared system message or few-shot examples, a chat's earlier turns)
            computes only the rest; each row's ``cached_tokens`` counts the tokens reused. The same
            tokens in fp32 (in bf16 a prefill of another length may differ in the last bits, as a
            batch may). Kept per model, dropped when its weights change or a call runs out of
            memory. 0 (the default; ``serve``, ``chat`` and ``batch``: 1024) is off. Every backend
            (the compiled ones copy the reused K/V into their static cache); lossless mode on the
            eager backend also keeps each answer with its prompt.
        early_exit: Stop refining a block once a pass leaves it unchanged. Never changes the tokens;
            turning it off is for tests and benchmarks.
        lossless: Lossless mode: a sliding window of ``add_eos_length + 1`` tokens whose drafts are
            verified, so the output is exactly the model's own autoregressive output (greedy, or the
            same sampling distribution) at one token per forward or more. ``refine_iter`` is
            ignored in this mode.
        adaptive_window: Lossless mode on the eager backend: after two passes in which no row
            accepted a draft token, run one-token passes (4, then 8 .. 64 of them) before drafting
            again. On a CPU a wide forward costs up to twice a one-token one, so a model that is not
            block-trained still decodes at autoregressive speed. Never changes the tokens. The
            compiled backends keep the full window (on a GPU a wide pass costs about a narrow one).
        prompt_lookup_max: Lossless mode, eager backend: where the adaptive window runs one-token
            passes (the model's own drafts do not pay), draft from the text instead, as prompt lookup
            decoding does: the up to ``add_eos_length`` tokens that followed the latest earlier
            occurrence of the text's last ``n`` tokens, ``n`` from this value down to
            ``prompt_lookup_min``. Repetitive answers (code, lists, arithmetic) then take fewer
            passes. Never changes the tokens; 0 is off.
        prompt_lookup_min: The shortest match ``prompt_lookup_max`` drafts from. On SmolLM2's
            answers a one-token match is right 0.27 times per pass at W = 4, a two-token one 0.99.
        draft_alternatives: Lossless mode: also verify the next this many most likely guesses
            for the first draft token, each read in its place in the same pass (a token tree one level
            deep). Where the draft's first token is wrong and an alternative is right, the pass accepts
            two tokens instead of one. Never changes the tokens; 0 is off.
        guided_json: Structured output (vLLM's names; at most one ``guided_*``): every answer is JSON
            that follows this JSON schema (text; ``'{"type": "object"}'``: any JSON object).
        guided_regex: Every answer matches this regular expression.
        guided_choice: Every answer is one of these texts.
        guided_grammar: Every answer follows this grammar: Lark (llguidance's dialect, ``start: ...``) or
            GBNF (llama.cpp's, ``root ::= ...``, as vLLM's xgrammar backend takes it). With any
            ``guided_*`` only the tokens the grammar allows are picked (through llguidance); the
            answer ends with a stop token once the grammar is complete. It needs the tokenizer
            (``generate_blocks(..., tokenizer=)``), lossless mode or exact blocks (approximate
            blocks could commit tokens the grammar forbids), and neither ``min_new_tokens`` nor
            ``ignore_eos``; lossless and exact mode give the model's own constrained autoregressive
            tokens. Lossless mode drafts the text the grammar forces and accepts it in one pass.
        logprobs: Also return each generated token's log-probability under the model (the log-softmax
            of its logits in the pass that picked the token: after ``logit_bias`` and the penalties,
            before temperature and top-k/p/min-p, autoregressive in lossless and exact mode) and the
            ``logprobs`` most likely tokens' at its position (0: the token's own only). None (the
            default) computes none.
        backend: How forwards run. ``eager``: the default path. ``cuda_graph``: a static KV cache and
            fixed block shapes, each forward replayed as a CUDA graph (the fast path on a GPU; on
            CPU it runs eagerly). ``inductor``: the same through torch.compile, faster per pass after
            a compile of tens of seconds per block width (and once more when the batch size or cache
            length first changes). All give the same greedy
            tokens in fp32.
    """

    add_eos_length: int = 127
    refine_iter: int = 2
    max_new_tokens: int = 1024
    max_length: int = 8192
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] | str = ()
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    use_cache: bool = True
    prompt_cache_mib: float = 0
    early_exit: bool = True
    lossless: bool = False
    adaptive_window: bool = True
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 2
    draft_alternatives: int = 3
    guided_json: str | None = None
    guided_regex: str | None = None
    guided_choice: tuple[str, ...] | None = None
    guided_grammar: str | None = None
    logprobs: int | None = None
    backend: Backend = "eager"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids or ()))
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings or ()))
        if not all(isinstance(text, str) and text for text in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(self.stop_strings)!r}.")
        for name, least in (
            ("refine_iter", 1),
            ("add_eos_length", 0),
            ("max_new_tokens", 1),
            ("max_length", 2),
            ("min_new_tokens", 0),
        ):
            value = getattr(self, name)
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}.")
        if self.prompt_cache_mib < 0:
            raise ValueError(f"prompt_cache_mib must be 0 (off) or more, got {self.prompt_cache_mib}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or above, got {self.temperature}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be above 0 and at most 1, got {self.top_p}.")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be between 0 and 1, got {self.min_p}.")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be at least 0 (0: no limit), got {self.top_k}.")
        self._check_penalties()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.lossless and not self.use_cache:
            raise ValueError("lossless=True needs use_cache=True: it verifies drafts on top of a KV cache.")
        if self.backend != "eager" and not self.use_cache:
            raise ValueError(f"backend={self.backend!r} decodes with a static KV cache: it needs use_cache=True.")
        if self.draft_alternatives < 0:
            raise ValueError(f"draft_alternatives must be at least 0 (0: off), got {self.draft_alternatives}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be at least 0 (0: the token's own only; None: off), got {self.logprobs}.")
        self._check_prompt_lookup()
        self._check_guided()

    def _check_guided(self) -> None:
        if self.guided_choice is not None:
            object.__setattr__(self, "guided_choice", tuple(self.guided_choice))
            if not self.guided_choice or not all(isinstance(text, str) and text for text in self.guided_choice):
                raise ValueError(f"guided_choice must be non-empty texts, got {list(self.guided_choice)!r}.")
        named = [name for name in GUIDED if getattr(self, name) is not None]
        if len(named) > 1:
            raise ValueError(f"Set at most one of {', '.join(GUIDED)}; got {' and '.join(named)}.")
        if not named:
            return
        if not self.lossless and self.refine_iter < self.width:
            raise ValueError(
                f"{named[0]} needs lossless=True or exact blocks (refine_iter >= add_eos_length + 1): approximate "
                "blocks could commit tokens the grammar does not allow."
            )
        for other in ("min_new_tokens", "ignore_eos"):
            if getattr(self, other):
                raise ValueError(f"{named[0]} decides where an answer ends: it cannot be combined with {other}.")
        from dllm_lit.guided import check_grammar

        check_grammar(self, named[0])

    def _check_penalties(self) -> None:
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be above 0 (1: off), got {self.repetition_penalty}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}.")
        bias = {int(token): float(value) for token, value in (self.logit_bias or {}).items()}
        object.__setattr__(self, "logit_bias", bias or None)
        wrong = [token for token, value in bias.items() if token < 0 or not -100 <= value <= 100]
        if wrong:
            raise ValueError(
                f"logit_bias maps token ids (0 and above) to values between -100 and 100, got {wrong[0]}: "
                f"{bias[wrong[0]]}."
            )

    def __hash__(self) -> int:  # the server groups jobs by settings; logit_bias is a dict
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v for v in values))

    @property
    def penalized(self) -> bool:
        """Whether a logit bias or a penalty adjusts the logits."""
        penalties = (self.repetition_penalty, self.presence_penalty, self.frequency_penalty)
        return bool(self.logit_bias) or penalties != (1.0, 0.0, 0.0)

    def _check_prompt_lookup(self) -> None:
        longest, shortest = self.prompt_lookup_max, self.prompt_lookup_min
        if longest < 0:
            raise ValueError(f"prompt_lookup_max must be at least 0 (0: off), got {longest}.")
        if longest and not 1 <= shortest <= longest:
            raise ValueError(
                f"prompt_lookup_min must be at least 1 and at most prompt_lookup_max, got {shortest} and {longest}."
            )
        if longest and not (self.lossless and self.adaptive_window and self.backend == "eager" and self.width > 1):
            raise ValueError(
                "prompt_lookup_max drafts up to add_eos_length tokens in the adaptive window's one-token passes: "
                "it needs lossless=True, adaptive_window=True, backend='eager' and add_eos_length >= 1."
            )

    @property
    def width(self) -> int:
        """The block width, ``add_eos_length + 1``."""
        return self.add_eos_length + 1

    @property
    def alternatives(self) -> int:
        """Alternatives a wide lossless pass verifies: ``draft_alternatives`` with a window of 2 or
        more, else 0."""
        return self.draft_alternatives if self.width > 1 else 0

    def replace(self, **overrides: Any) -> DecodeSettings:
        """A copy with ``overrides``; accepts the deprecated ``compile=`` (use ``backend=``)."""
        if "compile" in overrides:
            compile = overrides.pop("compile")
            warnings.warn(
                "compile= is deprecated: use backend='eager', 'cuda_graph' or 'inductor'.",
                DeprecationWarning,
                stacklevel=3,
            )
            if compile not in LEGACY_COMPILE:
                raise ValueError(f"compile must be false, true or 'inductor', got {compile!r}.")
            overrides.setdefault("backend", LEGACY_COMPILE[compile])
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"Unknown decoding setting(s): {', '.join(unknown)}.")
        return dataclasses.replace(self, **overrides) if overrides else self


GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
"""The structured-output settings (at most one is set)."""

DEFAULTS = DecodeSettings()
"""The default settings (every default above, in one object)."""
