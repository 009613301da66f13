"""Sampling parameters (vLLM's names, defaults and checks) and the per-step row the engine hands the sampler.

Host-side and jax-free: the scheduler and request state use these; `jaxserve.sampling` turns rows into device
tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np

MAX_N = 64
MAX_TOP_K = 1 << 20
MAX_LOGPROBS = 20  # top alternatives returned per generated token (vLLM's default max_logprobs is 20)
MAX_STOP = 16  # stop strings, and separately stop token ids, per request
MAX_STOP_CHARS = 256
MAX_BANNED = 32  # banned ids per row per step: EOS ids + stop_token_ids while min_tokens is not reached
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (the OpenAI API's bound; a fixed [S, 300] step input)
MAX_TOKENS_LIMIT = 1 << 20
_MAX_TOKEN_ID = 2**31 - 1  # token ids travel as i32


class RequestOutputKind(enum.Enum):
    """What each output of a request carries (vLLM's names). CUMULATIVE: everything so far (text, token ids,
    logprobs), each step; DELTA: only what is new since the previous output, so a step's work and an unread
    stream's buffer grow with the new tokens, not with the sequence (what the servers stream); FINAL_ONLY: one
    output, when the request finishes (non-streamed answers, batch jobs, LLM.generate). Every kind also sets
    delta_text / delta_token_ids."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. temperature=0 is greedy; top_k<=0, top_p=1 and min_p=0
    disable those filters; the penalties' neutral values (0, 0, 1) disable them."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None  # a tuple[str, ...] after __post_init__ (empty: none)
    stop_token_ids: Sequence[int] | None = None  # a tuple[int, ...] after __post_init__ (empty: none)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # alternatives per token; 0 = only the sampled token's logprob
    # OpenAI's: {token id: bias in [-100, 100]} added to that token's logit before sampling (JSON's string keys
    # taken too); a tuple of (id, bias) pairs, sorted, after __post_init__ (empty: none)
    logit_bias: Mapping | Sequence | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        def bad(field, value, want):
            raise ValueError(f"SamplingParams.{field}={_short_repr(value)}: {want}")

        def number(field, lo, hi, lo_open=False):
            v = getattr(self, field)
            if not _is_number(v) or not (lo < v if lo_open else lo <= v) or not v <= hi:
                bad(field, v, f"must be a finite number in {'(' if lo_open else '['}{lo}, {hi}]")

        def integer(field, lo, hi, optional=False, note=""):
            v = getattr(self, field)
            if not (optional and v is None) and (not _is_int(v) or not lo <= v <= hi):
                bad(field, v, f"must be an integer in [{lo}, {hi}]" + (" or None" if optional else "") + note)

        integer("n", 1, MAX_N)
        number("temperature", 0, 100)
        number("top_p", 0, 1, lo_open=True)
        integer("top_k", -1, MAX_TOP_K, note=" (0 or -1: no limit)")
        number("min_p", 0, 1)
        number("presence_penalty", -2, 2)
        number("frequency_penalty", -2, 2)
        number("repetition_penalty", 0, 10, lo_open=True)
        integer("seed", 0, 2**63 - 1, optional=True)
        for field in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, field), bool):
                bad(field, getattr(self, field), "must be a bool")
        integer("max_tokens", 1, MAX_TOKENS_LIMIT, optional=True)
        integer("min_tokens", 0, MAX_TOKENS_LIMIT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"must not exceed max_tokens={self.max_tokens}")
        integer("logprobs", 0, MAX_LOGPROBS, optional=True)
        if not isinstance(self.output_kind, RequestOutputKind):
            bad("output_kind", self.output_kind, "must be a RequestOutputKind")

        # Tuples, never None or lists: the params stay hashable and callers need no None checks.
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Sequence) or isinstance(stop, (str, bytes)) or len(stop) > MAX_STOP:
            bad("stop", self.stop, f"must be a string or a list of at most {MAX_STOP} strings")
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            bad("stop", self.stop, f"each stop string must be a non-empty str of at most {MAX_STOP_CHARS} characters")
        if any(lone_surrogate_at(s) is not None for s in stop):
            bad("stop", self.stop, "each stop string must be valid Unicode text (no lone surrogates)")
        object.__setattr__(self, "stop", tuple(stop))

        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or len(ids) > MAX_STOP:
            bad("stop_token_ids", self.stop_token_ids, f"must be a list of at most {MAX_STOP} token ids")
        if not all(_is_int(t) and 0 <= t <= _MAX_TOKEN_ID for t in ids):
            bad("stop_token_ids", self.stop_token_ids, f"each id must be an integer in [0, {_MAX_TOKEN_ID}]")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias, bad))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether sampling needs the sequence's token history (only then does build() copy it)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _logit_bias(value, bad) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(value, (str, bytes)) or not isinstance(items, (Sequence, type({}.items()))):
        bad("logit_bias", value, "must map token ids to biases")
    items = list(items)
    if len(items) > MAX_LOGIT_BIAS:
        bad("logit_bias", value, f"at most {MAX_LOGIT_BIAS} token ids, got {len(items)}")
    out = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            bad("logit_bias", value, "must map token ids to biases")
        key, bias = item
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10:
            key = int(key)
        if not _is_int(key) or not 0 <= key <= _MAX_TOKEN_ID:
            bad(
                "logit_bias",
                value,
                f"each key must be a token id (an integer in [0, {_MAX_TOKEN_ID}]), got {key!r:.40}",
            )
        if not _is_number(bias) or not -100 <= bias <= 100:
            bad("logit_bias", value, f"each bias must be a number in [-100, 100], got {bias!r:.40}")
        out[int(key)] = float(bias)
    return tuple(sorted(out.items()))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def banned_ids(params: SamplingParams, eos_token_ids: Sequence[int]) -> tuple[int, ...]:
    """The ids a sequence may not sample while it has fewer than min_tokens: its stop ids and (unless ignore_eos)
    the model's EOS ids, each once."""
    ids = params.stop_token_ids + (() if params.ignore_eos else tuple(eos_token_ids))
    return tuple(dict.fromkeys(ids))


def lone_surrogate_at(text: str) -> int | None:
    """The index of text's first lone surrogate (JSON can carry one: "\\ud800"; it is no Unicode scalar value,
    so no tokenizer, detokenizer or JSON encoder takes it), or None for valid Unicode text."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _short_repr(value, limit: int = 120) -> str:
    # A request can carry thousands of stop strings; the error message must not echo them all.
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


@dataclasses.dataclass(frozen=True)
class SampleRow:
    """One sequence that samples this step (host side, plain Python)."""

    params: SamplingParams
    seed: int  # resolved by the engine (it draws one for unseeded requests); used mod 2**32
    step: int  # tokens this sequence has generated so far: the draw's index
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    banned_token_ids: Sequence[int] = ()  # forced to -inf this step; at most MAX_BANNED
