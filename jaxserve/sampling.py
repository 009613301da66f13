"""Sampling parameters (vLLM's names and defaults), their per-step device form, and the on-device sampler.

Host: `SamplingParams` (one per request, validated once) and `SampleRow` (one per sequence that samples this
step) become `SamplingTensors`, numpy arrays with one row per sequence slot, in `SamplingTensors.build`.
Device: `sample(logits, st)` is a pure, jit-able function of static shapes, in vLLM v1's order:

    raw logits -> logprobs (before anything reshapes the distribution)
               -> banned ids -> penalties -> greedy: argmax
                                           | random: temperature -> min_p -> top_k -> top_p -> draw
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling_params import (  # noqa: F401  (re-exported)
    MAX_BANNED,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TOKENS_LIMIT,
    MAX_TOP_K,
    SampleRow,
    SamplingParams,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-sequence sampling settings, one row per sequence slot S. Rows past the real ones are padding:
    greedy, no filters, no penalties, no logprobs. build() returns numpy arrays; the caller transfers them."""

    temperature: jax.Array  # f32[S]; 0 = greedy
    top_k: jax.Array  # i32[S]; <= 0 = no limit
    top_p: jax.Array  # f32[S]; 1 = no limit
    min_p: jax.Array  # f32[S]; 0 = no limit
    seeds: jax.Array  # u32[S]
    step: jax.Array  # i32[S]: tokens generated so far, so each draw has its own key
    presence: jax.Array  # f32[S]
    frequency: jax.Array  # f32[S]
    repetition: jax.Array  # f32[S]; 1 = none
    banned: jax.Array  # i32[S, MAX_BANNED]; -1 = padding
    history: jax.Array  # i32[S, H]: prompt ids then output ids, -1 padding; all -1 in rows without penalties
    num_prompt: jax.Array  # i32[S]: how many leading history entries are prompt tokens
    num_logprobs: jax.Array  # i32[S]; -1 = none requested
    bias_ids: jax.Array  # i32[S, MAX_LOGIT_BIAS]: logit_bias's token ids; -1 = padding
    bias_values: jax.Array  # f32[S, MAX_LOGIT_BIAS]: added to those tokens' logits

    @classmethod
    def build(cls, rows: Sequence[SampleRow], num_rows: int, history_len: int) -> "SamplingTensors":
        """Rows padded to num_rows (the compiled S bucket). history_len is H; when no row has penalties the
        history is never read, so pass 1 and the [S, H] block costs nothing."""
        n = len(rows)
        if n > num_rows:
            raise ValueError(f"{n} rows do not fit num_rows={num_rows}")
        if history_len < 1:
            raise ValueError(f"history_len={history_len} must be >= 1")
        params = [r.params for r in rows]

        def col(values, dtype, pad):
            out = np.full(num_rows, pad, dtype)
            out[:n] = values
            return out

        banned = np.full((num_rows, MAX_BANNED), -1, np.int32)
        bias_ids = np.full((num_rows, MAX_LOGIT_BIAS), -1, np.int32)
        bias_values = np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32)
        history = np.full((num_rows, history_len), -1, np.int32)
        num_prompt = np.zeros(num_rows, np.int32)
        for i, r in enumerate(rows):
            if r.banned_token_ids:
                if len(r.banned_token_ids) > MAX_BANNED:
                    raise ValueError(
                        f"row {i}: {len(r.banned_token_ids)} banned token ids exceed MAX_BANNED={MAX_BANNED}"
                    )
                banned[i, : len(r.banned_token_ids)] = r.banned_token_ids
            if r.params.logit_bias:
                ids, values = zip(*r.params.logit_bias)
                bias_ids[i, : len(ids)] = ids
                bias_values[i, : len(ids)] = values
            if r.params.has_penalties:
                p, o = len(r.prompt_token_ids), len(r.output_token_ids)
                if p + o > history_len:
                    raise ValueError(f"row {i}: prompt {p} + output {o} tokens exceed history_len={history_len}")
                history[i, :p] = r.prompt_token_ids
                history[i, p : p + o] = r.output_token_ids
                num_prompt[i] = p
        return cls(
            temperature=col([p.temperature for p in params], np.float32, 0.0),
            top_k=col([p.top_k for p in params], np.int32, 0),
            top_p=col([p.top_p for p in params], np.float32, 1.0),
            min_p=col([p.min_p for p in params], np.float32, 0.0),
            seeds=col([r.seed % 2**32 for r in rows], np.uint32, 0),
            step=col([r.step for r in rows], np.int32, 0),
            presence=col([p.presence_penalty for p in params], np.float32, 0.0),
            frequency=col([p.frequency_penalty for p in params], np.float32, 0.0),
            repetition=col([p.repetition_penalty for p in params], np.float32, 1.0),
            banned=banned,
            bias_ids=bias_ids,
            bias_values=bias_values,
            history=history,
            num_prompt=num_prompt,
            num_logprobs=col([-1 if p.logprobs is None else p.logprobs for p in params], np.int32, -1),
        )

    @classmethod
    def from_params(cls, params: list[SamplingParams], steps: list[int], default_seed: int = 0) -> "SamplingTensors":
        """One row per params, no token history, nothing banned: for a caller that tracks no history."""
        if len(params) != len(steps):
            raise ValueError(f"{len(params)} params but {len(steps)} steps")
        for p in params:
            if p.has_penalties:
                raise ValueError("penalties need the token history: use SamplingTensors.build with SampleRows")
        rows = [SampleRow(p, default_seed if p.seed is None else p.seed, s, (), ()) for p, s in zip(params, steps)]
        return cls.build(rows, len(rows), history_len=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerOutput:
    """Logprobs are under the raw distribution (log_softmax of the logits) and are computed only when some row of
    the batch asked for them (otherwise logprobs and top_logprobs are 0, ranks 0 and top_ids -1)."""

    token_ids: jax.Array  # i32[S]
    logprobs: jax.Array  # f32[S]: the sampled token's log-prob
    ranks: jax.Array  # i32[S]: 1 + how many tokens the raw distribution ranks above the sampled one
    top_ids: jax.Array  # i32[S, MAX_LOGPROBS]: the raw distribution's top tokens, best first
    top_logprobs: jax.Array  # f32[S, MAX_LOGPROBS]


def sample(logits: jax.Array, st: SamplingTensors) -> SamplerOutput:
    """logits: f32[S, V]. Each row's draw depends only on its seed, step and logits, never on the batch."""
    raw = logits = logits.astype(jnp.float32)
    with jax.named_scope("ban"):
        logits = _ban(_bias(logits, st), st.banned)
    with jax.named_scope("penalties"):
        logits = apply_penalties(logits, st)
    with jax.named_scope("pick"):
        token_ids = _pick(logits, st)
    with jax.named_scope("logprobs"):
        # vLLM v1 reports the model's own distribution: logprobs of the raw logits, before bans, penalties and
        # temperature. A few passes over [S, V] (logsumexp, rank count, top_k): paid only when someone asks.
        logprobs, ranks, top_ids, top_logprobs = _logprobs(raw, token_ids, st.num_logprobs)
    return SamplerOutput(token_ids, logprobs, ranks, top_ids, top_logprobs)


def _logprobs(raw: jax.Array, token_ids: jax.Array, num_logprobs: jax.Array):
    s, v = raw.shape
    k = min(MAX_LOGPROBS, v)

    def compute():
        lse = jax.nn.logsumexp(raw, axis=-1)  # f32[S]
        chosen = jnp.take_along_axis(raw, token_ids[:, None], axis=-1)  # f32[S, 1]
        ranks = 1 + jnp.sum(raw > chosen, axis=-1, dtype=jnp.int32)
        vals, ids = jax.lax.top_k(raw, k)  # sorted, best first
        pad = MAX_LOGPROBS - k  # only for vocabularies smaller than MAX_LOGPROBS
        ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        vals = jnp.pad(vals - lse[:, None], ((0, 0), (0, pad)))
        return chosen[:, 0] - lse, ranks, ids, vals

    def nothing():
        zeros = jnp.zeros((s, MAX_LOGPROBS), jnp.float32)
        return jnp.zeros(s, jnp.float32), jnp.zeros(s, jnp.int32), jnp.full((s, MAX_LOGPROBS), -1, jnp.int32), zeros

    return jax.lax.cond(jnp.any(num_logprobs >= 0), compute, nothing)


def _per_row(ids: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
    """Index of logits[S, V] at each row's token ids i32[S, K] (-1 padded): the -1s become the out-of-range
    index V, which an update with mode="drop" skips (a bare -1 would wrap to V - 1)."""
    return jnp.arange(ids.shape[0])[:, None], jnp.where(ids >= 0, ids, vocab)


def _bias(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """logit_bias: each row's biases added to its tokens' logits."""
    return logits.at[_per_row(st.bias_ids, logits.shape[1])].add(st.bias_values, mode="drop")


def _ban(logits: jax.Array, banned: jax.Array) -> jax.Array:
    return logits.at[_per_row(banned, logits.shape[1])].set(-jnp.inf, mode="drop")


def apply_penalties(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """vLLM's penalties. logits f32[S, V] -> f32[S, V]. Repetition applies to tokens seen in the prompt or the
    output (positive logits divided by it, the rest multiplied); frequency and presence to output tokens only."""
    active = (st.repetition != 1) | (st.presence != 0) | (st.frequency != 0)

    def penalize():
        s, v = logits.shape
        rows = jnp.arange(s)[:, None]
        ids = jnp.where(st.history >= 0, st.history, v)  # -1 padding -> out of range -> dropped
        is_output = jnp.arange(st.history.shape[1])[None, :] >= st.num_prompt[:, None]  # bool[S, H]
        seen = jnp.zeros((s, v), jnp.int32).at[rows, ids].add(1, mode="drop") > 0
        out_counts = jnp.zeros((s, v), jnp.float32).at[rows, ids].add(is_output.astype(jnp.float32), mode="drop")
        rep = jnp.where(seen, st.repetition[:, None], 1.0)
        x = logits * jnp.where(logits > 0, 1.0 / rep, rep)
        x = x - st.frequency[:, None] * out_counts
        return x - st.presence[:, None] * (out_counts > 0)

    # Two [S, V] scatters and a few passes: paid only by batches where some row has a penalty.
    return jax.lax.cond(jnp.any(active), penalize, lambda: logits)


def argmax(x: jax.Array, block: int = 128) -> jax.Array:
    """jnp.argmax over the last axis of f32[S, V] (the first index of the max; a NaN counts as the max, as there),
    ~6x faster on XLA:CPU: its argmax is a variadic (value, index) reduce that does not vectorize, so this takes
    plain maxima of blocks of `block`, then argmaxes only the [S, V / block] block maxima and the winning block.
    XLA:CPU's vectorized max may drop NaNs: a batch holding one takes jnp.argmax instead."""
    s, v = x.shape

    def blocked():
        padded = jnp.pad(x, ((0, 0), (0, -v % block)), constant_values=-jnp.inf)
        blocks = padded.reshape(s, -1, block)
        best = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # the first block holding the max
        within = jnp.argmax(jnp.take_along_axis(blocks, best[:, None, None], axis=1)[:, 0], axis=-1)
        return (best * block + within).astype(jnp.int32)

    return jax.lax.cond(jnp.any(jnp.isnan(x)), lambda: jnp.argmax(x, axis=-1).astype(jnp.int32), blocked)


def _pick(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    greedy = argmax(logits)

    def draw():
        drawn = jax.vmap(jax.random.categorical)(row_keys(st), _draw_logits(logits, st)).astype(jnp.int32)
        return jnp.where(st.temperature > 0, drawn, greedy)

    # An all-greedy batch skips the whole random path.
    return jax.lax.cond(jnp.any(st.temperature > 0), draw, lambda: greedy)


def row_keys(st: SamplingTensors) -> jax.Array:
    """key[S]: each row's draw key, (seed, step): a row's draw never depends on the batch around it."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(st.seeds, st.step)


def _draw_logits(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """The logits a random row draws from: temperature, then min_p / top_k / top_p (f32[S, V], unnormalized)."""
    temp = jnp.where(st.temperature > 0, st.temperature, 1.0)
    scaled = logits / temp[:, None]  # f32[S, V]
    filters = (st.top_k > 0) | (st.top_p < 1) | (st.min_p > 0)
    # The sort is the costly part: batches whose random rows all use vLLM's defaults skip it.
    return jax.lax.cond(jnp.any(filters & (st.temperature > 0)), lambda: _filter(scaled, st), lambda: scaled)


def target_logits(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """f32[S, V]: what each row's token is drawn from, after bans, penalties, temperature and filters
    (unnormalized; a greedy row is 0 at its argmax and -inf elsewhere). Its row softmax is the distribution p a
    speculated token is verified against (jaxserve.rejection_sampler), and categorical(row_keys(st), it) draws
    the very token `sample` draws."""
    logits = apply_penalties(_ban(_bias(logits.astype(jnp.float32), st), st.banned), st)
    greedy = argmax(logits)
    onehot = jnp.where(jnp.arange(logits.shape[-1])[None, :] == greedy[:, None], 0.0, -jnp.inf)
    return jnp.where(st.temperature[:, None] > 0, _draw_logits(logits, st), onehot)


def _filter(scaled: jax.Array, st: SamplingTensors) -> jax.Array:
    """min_p, then top_k, then top_p on temperature-scaled logits f32[S, V]; dropped tokens become -inf."""
    vocab = scaled.shape[-1]
    desc = _sort_descending(scaled)  # f32[S, V], largest first: the one sort
    # min_p (by value), top_k (by rank) and top_p (by mass) each keep a prefix of `desc`, so one threshold value
    # expresses all three. The first token always survives (exp(0) >= min_p, and the mass before it is 0).
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(st.top_k > 0, jnp.minimum(st.top_k, vocab), vocab)
    # prob / max prob = exp(logit - max logit): min_p needs no softmax of its own.
    keep = (rank < k[:, None]) & (jnp.exp(desc - desc[:, :1]) >= st.min_p[:, None])
    desc = jnp.where(keep, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    # Smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p. top_p = 1 keeps
    # everything outright, or float rounding of the cumsum could drop the tail.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < st.top_p[:, None]) | (st.top_p[:, None] >= 1)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # f32[S, 1]
    # Tokens tied with the threshold all stay (top_k may then keep a few more than k).
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _sort_descending(x: jax.Array) -> jax.Array:
    """f32[S, V] sorted along the last axis, largest first. XLA:CPU sorts floats with a NaN-aware comparator, ~4x
    slower than int32 keys, so this sorts the floats' order-preserving int32 image and maps it back (exact)."""

    def flip(i):  # an involution: negative floats' magnitude bits reversed, so int order == float order
        return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)

    keys = flip(jax.lax.bitcast_convert_type(x, jnp.int32))
    # ~ reverses int order without overflow, so an ascending sort gives largest first.
    keys = ~jax.lax.sort(~keys, dimension=x.ndim - 1, is_stable=False)
    return jax.lax.bitcast_convert_type(flip(keys), jnp.float32)
