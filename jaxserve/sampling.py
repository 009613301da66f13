"""Sampling parameters (vLLM's field names) and the on-device sampler."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_K = 1 << 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature=0 is greedy. top_k<=0 and top_p=1 disable those filters."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(field, value, want):
            raise ValueError(f"SamplingParams.{field}={value!r}: {want}")

        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            bad("temperature", self.temperature, "must be a number in [0, 100]")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "must be a number in (0, 1]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOP_K:
            bad("top_k", self.top_k, f"must be an integer in [-1, {MAX_TOP_K}] (0 or -1: no limit)")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "must be a positive integer or None")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", self.seed, "must be an integer in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-sequence sampling settings as device arrays (one row per sequence slot of the batch)."""

    temperature: jax.Array  # f32[S]; 0 = greedy
    top_k: jax.Array  # i32[S]; <= 0 = no limit
    top_p: jax.Array  # f32[S]
    seeds: jax.Array  # u32[S]
    step: jax.Array  # i32[S]: tokens generated so far, so each draw has its own key

    @classmethod
    def from_params(cls, params: list[SamplingParams], steps: list[int], default_seed: int = 0) -> "SamplingTensors":
        return cls(
            temperature=np.array([p.temperature for p in params], np.float32),
            top_k=np.array([p.top_k for p in params], np.int32),
            top_p=np.array([p.top_p for p in params], np.float32),
            seeds=np.array([(default_seed if p.seed is None else p.seed) % 2**32 for p in params], np.uint32),
            step=np.array(steps, np.int32),
        )


def sample(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """logits: f32[S, V] -> i32[S]. Each row's draw depends only on its seed and step, not on the batch."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        vocab = logits.shape[-1]
        temp = jnp.where(st.temperature > 0, st.temperature, 1.0)
        scaled = logits / temp[:, None]
        desc = -jnp.sort(-scaled, axis=-1)  # [S, V], largest first
        k = jnp.where(st.top_k > 0, jnp.minimum(st.top_k, vocab), vocab)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [S, 1]
        desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < st.top_p[:, None]
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        threshold = jnp.maximum(kth, cutoff)
        filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(st.seeds, st.step)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
        return jnp.where(st.temperature > 0, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(st.temperature > 0), draw, lambda: greedy)
