"""Verifying speculated tokens, on device (vLLM's RejectionSampler). Pure functions of static shapes.

A sequence with k proposals x_0..x_{k-1} gets k + 1 rows in the target's step: row j is the target's
distribution p_j after the sequence's tokens and x_0..x_{j-1}. What comes out is the accepted prefix plus one
more token (a correction at the first rejection, or the bonus token after k acceptances):

    rows       p_0   p_1   p_2   p_3   p_4          k = 4 proposals
    proposals  x_0   x_1   x_2   x_3
    accepted   yes   yes   no                       -> emits x_0 x_1 c_2 (c_2 ~ the residual at row 2)

Two rules, both exact (the emitted tokens have the distribution of plain decoding, token by token):

- `verify_point_mass`: proposals without a distribution (n-gram lookup, a greedy draft). y_j is the target's own
  draw at row j, made exactly as plain decoding would make it (same logits processing, same key (seed, step + j));
  x_j is accepted iff y_j == x_j, and at the first mismatch y_j is the correction. P(accept) = p_j(x_j) and a
  rejection emits p_j conditioned on != x_j: rejection sampling with q = the point mass at x_j. A seeded request
  therefore emits the very tokens it emits without speculation; greedy rows are the longest matching prefix.
- `rejection_sample`: proposals drawn from a draft distribution q_j: accept x_j with probability
  min(1, p_j(x_j) / q_j(x_j)); at the first rejection draw from normalize(max(0, p_j - q_j)); after k
  acceptances draw the bonus from p_k. Uniforms and draws are keyed by (seed, step + j), so a seeded run is
  reproducible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _emit(accept: jax.Array, num_draft: jax.Array, last: jax.Array, draft: jax.Array):
    """accept bool[S, K], num_draft i32[S] -> (num_accepted i32[S], tokens i32[S, K + 1]): the accepted proposals,
    then last[s, num_accepted] (the correction or bonus); entries past it are -1."""
    s, k = accept.shape
    j = jnp.arange(k)[None, :]
    ok = accept & (j < num_draft[:, None])
    num_accepted = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)  # the leading run of acceptances
    pos = jnp.arange(k + 1)[None, :]
    padded = jnp.pad(draft, ((0, 0), (0, 1)), constant_values=-1)
    tokens = jnp.where(pos < num_accepted[:, None], padded, -1)
    tokens = jnp.where(pos == num_accepted[:, None], jnp.take_along_axis(last, num_accepted[:, None], 1), tokens)
    return num_accepted, tokens.astype(jnp.int32)


def verify_point_mass(target: jax.Array, draft: jax.Array, num_draft: jax.Array):
    """target i32[S, K + 1]: the target's draw at each row; draft i32[S, K] (entries past num_draft ignored);
    num_draft i32[S] in [0, K]. Returns (num_accepted i32[S], tokens i32[S, K + 1], -1 past the emitted)."""
    return _emit(target[:, :-1] == draft, num_draft, target, draft)


def rejection_sample(
    target_probs: jax.Array,  # f32[S, K + 1, V]: p_j, the target's processed distribution at each row
    draft_probs: jax.Array,  # f32[S, K, V]: q_j, the draft's distribution each proposal was drawn from
    draft: jax.Array,  # i32[S, K]
    num_draft: jax.Array,  # i32[S]
    keys: jax.Array,  # key[S, K + 1]: one per row, (seed, step + j)
):
    """Returns (num_accepted i32[S], tokens i32[S, K + 1], -1 past the emitted). Rows past num_draft are never
    read for acceptance; row num_draft's p is the bonus distribution."""
    s, k1, v = target_probs.shape
    k = k1 - 1
    rows = jnp.arange(s)[:, None]
    cols = jnp.arange(k)[None, :]
    p_x = target_probs[rows, cols, draft]  # f32[S, K]
    q_x = draft_probs[rows, cols, draft]
    accept_keys, draw_keys = jax.vmap(jax.vmap(lambda key: tuple(jax.random.split(key))))(keys)
    u = jax.vmap(jax.vmap(jax.random.uniform))(accept_keys[:, :k])  # f32[S, K]
    accept = u * q_x < p_x  # u < p / q, without dividing by a q of 0 (a proposal q could not draw: never)
    # The residual at each row (the bonus row: p itself); a row whose residual is all 0 (p == q) is never used.
    q_full = jnp.pad(draft_probs, ((0, 0), (0, 1), (0, 0)))
    residual = jnp.maximum(target_probs - q_full, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, target_probs)
    logits = jnp.log(residual)  # -inf where 0: categorical never draws those
    last = jax.vmap(jax.vmap(jax.random.categorical))(draw_keys, logits).astype(jnp.int32)  # i32[S, K + 1]
    return _emit(accept, num_draft, last, draft)
