"""Speculative decoding, host side: the configuration (vLLM's `speculative_config` shape) and the n-gram proposer.

    LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                            "prompt_lookup_min": 2})
    LLM(speculative_config={"method": "draft_model", "model": PATH, "num_speculative_tokens": 4})
    LLM(speculative_config={"method": "draft_model", "model": TARGET_PATH, "quantization": "int4", ...})

The draft model's proposer is jaxserve.draft.DraftProposer (its own runner, KV pages and compiled k-step round).

The n-gram proposer (prompt lookup decoding, as vLLM's and llama.cpp's lookup): find the longest n-gram, n in
[prompt_lookup_min, prompt_lookup_max], that ends the sequence's tokens (prompt and output) and occurred earlier
in them; propose the (up to k) tokens that followed its earliest occurrence. Plain numpy, no jax: it runs on the
host between steps, and its cost is one vectorized comparison per n over the sequence.

    tokens:   a b c d e ... x b c d        (the suffix "b c d" ends the sequence)
                ^^^^^ earliest earlier match: propose "e ..." (k tokens)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

import numpy as np

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16
MAX_LOOKUP = 64
DEFAULT_DISABLE_BY_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup) or "draft_model" (a smaller model with the target's tokenizer, `model`).
    num_speculative_tokens: tokens proposed per sequence per step (k). prompt_lookup_min / _max: the n-gram sizes
    the ngram method matches (longest first). quantization: the draft's weights ("none", "int8", "int4",
    "auto"; None: as the target's): `model` the target's own file with "int4" is a self-speculative pair.
    disable_by_batch_size: running sequences at which speculation is off for the next step (the step is
    compute-bound there; None: never off). Default 8, measured on a 2-core CPU with SmolLM2-135M
    (scripts/bench_spec.py --sweep): n-gram on grounded streams gave 1.9x at 1 stream, 1.6x at 2, 1.15x at 4 and
    0.95x at 8."""

    method: str
    num_speculative_tokens: int
    model: str | None = None
    quantization: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE

    def __post_init__(self) -> None:
        def bad(field, want):
            raise ValueError(f"speculative_config.{field}={getattr(self, field)!r}: {want}")

        def integer(field, lo, hi, optional=False):
            v = getattr(self, field)
            if optional and v is None:
                return
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                bad(field, f"must be an integer in [{lo}, {hi}]" + (" or null" if optional else ""))

        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}")
        integer("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
        integer("prompt_lookup_min", 1, MAX_LOOKUP)
        integer("prompt_lookup_max", 1, MAX_LOOKUP)
        integer("disable_by_batch_size", 1, 1 << 20, optional=True)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            bad("prompt_lookup_min", f"must not exceed prompt_lookup_max={self.prompt_lookup_max}")
        if self.method == "draft_model" and not (isinstance(self.model, str) and self.model):
            bad("model", 'the draft model\'s path is required with method "draft_model"')
        for field in ("model", "quantization"):
            if self.method == "ngram" and getattr(self, field) is not None:
                bad(field, 'only for method "draft_model"')
        if self.quantization is not None:
            from models.config import QUANTIZATIONS

            if self.quantization not in QUANTIZATIONS:
                bad("quantization", f"must be one of {list(QUANTIZATIONS)} or null")

    @classmethod
    def parse(cls, value: SpeculativeConfig | Mapping | str | None) -> SpeculativeConfig | None:
        """A config from vLLM's dict (or its JSON text, as `--speculative-config` takes it); None stays None.
        Unknown keys are refused by name, so a misspelt option never silently does nothing."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e.msg} at {e.pos})") from None
        if not isinstance(value, Mapping):
            raise ValueError('speculative_config: must be an object such as {"method": "ngram", ...}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown option (known: {', '.join(sorted(known))})")
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise ValueError(f"speculative_config.{required}: required")
        return cls(**value)


class NgramProposer:
    """Prompt lookup: proposals from the sequence's own earlier tokens (see the module docstring)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.max_model_len = max_model_len

    def propose(self, token_ids: Sequence[int] | np.ndarray) -> list[int]:
        """Up to k tokens to verify after `token_ids` (the prompt and the output so far); [] when no n-gram of
        the sizes matches, or the context is full."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        total = tokens.shape[0]
        k = min(self.k, self.max_model_len - total)
        if k <= 0:
            return []
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            # Windows that start at 0 .. total - n - 1: each ends before the last token, so it is an earlier
            # occurrence (never the suffix itself) and at least one token follows it.
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[total - n :]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return tokens[start : start + k].tolist()
        return []


@dataclasses.dataclass
class SpecDecodeStats:
    """Counters of one engine's verifications (vLLM's spec_decode metrics): num_drafts (sequences that verified
    proposals, once per step each), num_draft_tokens (proposals), num_accepted_tokens, and accepted_per_position
    (how often the j-th proposal was accepted)."""

    k: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.k

    def record(self, num_proposed: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted proposals / proposals."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verifying step emits per sequence, on average: 1 + accepted / drafts (vLLM's)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None
