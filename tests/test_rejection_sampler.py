"""Verifying speculated tokens (jaxserve.rejection_sampler): the emitted prefix by hand, and a statistical check
that speculation does not change the distribution: the tokens emitted at each position, over many keyed draws,
are distributed as the target's p (chi-square), while a verifier that is wrong on purpose (resampling from p
instead of the residual) fails the same check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from jaxserve import rejection_sampler as rs


def test_point_mass_emits_the_matching_prefix_and_one_more():
    target = jnp.array([[5, 6, 7, 8], [5, 9, 7, 8], [1, 2, 3, 4], [4, 4, 4, 4]], jnp.int32)
    draft = jnp.array([[5, 6, 7], [5, 6, 7], [9, 9, 9], [4, 4, 0]], jnp.int32)
    num_draft = jnp.array([3, 3, 3, 2], jnp.int32)
    n, tokens = rs.verify_point_mass(target, draft, num_draft)
    assert n.tolist() == [3, 1, 0, 2]
    assert tokens.tolist() == [
        [5, 6, 7, 8],  # all three accepted, then the bonus
        [5, 9, -1, -1],  # x_1 = 6 rejected: the target's own 9 instead
        [1, -1, -1, -1],  # nothing accepted: plain decoding's token
        [4, 4, 4, -1],  # only 2 proposals (the third slot is padding, never accepted): both, then the bonus
    ]
    n0, t0 = rs.verify_point_mass(target, draft, jnp.zeros(4, jnp.int32))  # no proposals: one token, as always
    assert n0.tolist() == [0] * 4 and t0[:, 0].tolist() == [5, 5, 1, 4]


V, K, DRAWS = 6, 2, 20000


def _dists(seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(V) * 0.7, size=K + 1).astype(np.float32)  # the target's rows (independent here)
    q = rng.dirichlet(np.ones(V) * 0.7, size=K).astype(np.float32)  # the draft's
    return p, q


def _run(verifier, p, q, key):
    draw_keys, prop_keys = jax.random.split(key)
    keys = jax.random.split(draw_keys, DRAWS * (K + 1)).reshape(DRAWS, K + 1)
    draft = jax.random.categorical(prop_keys, jnp.log(jnp.asarray(q))[None], shape=(DRAWS, K)).astype(jnp.int32)
    tp = jnp.broadcast_to(jnp.asarray(p), (DRAWS, K + 1, V))
    dp = jnp.broadcast_to(jnp.asarray(q), (DRAWS, K, V))
    return jax.jit(verifier)(tp, dp, draft, jnp.full(DRAWS, K, jnp.int32), keys)


def _correct(tp, dp, draft, num_draft, keys):
    return rs.rejection_sample(tp, dp, draft, num_draft, keys)


def _biased(tp, dp, draft, num_draft, keys):
    # accept with min(1, p/q) but, on a rejection, draw from p itself (the classic mistake)
    n, _ = rs.rejection_sample(tp, dp, draft, num_draft, keys)
    plain = jax.vmap(jax.vmap(jax.random.categorical))(keys, jnp.log(tp)).astype(jnp.int32)
    pos = jnp.arange(K + 1)[None, :]
    padded = jnp.pad(draft, ((0, 0), (0, 1)), constant_values=-1)
    tokens = jnp.where(pos < n[:, None], padded, jnp.where(pos == n[:, None], plain, -1))
    return n, tokens


def _statistic(tokens, p, position):
    emitted = np.asarray(tokens[:, position])
    emitted = emitted[emitted >= 0]
    counts = np.bincount(emitted, minlength=V)
    expected = p[position].astype(np.float64)
    return chisquare(counts, expected / expected.sum() * counts.sum()).pvalue, len(emitted)


@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_sampling_keeps_the_target_distribution(seed):
    p, q = _dists(seed)
    n, tokens = _run(_correct, p, q, jax.random.key(seed))
    for position in range(K + 1):  # each row's p is independent of the tokens before it here, so each
        pvalue, count = _statistic(tokens, p, position)  # position's emitted tokens are distributed as p_j
        assert count > 1000 and pvalue > 1e-3, (position, pvalue)
    assert 0 < float(jnp.mean(n)) < K  # some accepted, some rejected: both paths ran
    _, biased = _run(_biased, p, q, jax.random.key(seed))
    assert min(_statistic(biased, p, j)[0] for j in range(K)) < 1e-6  # the check can fail


def test_point_mass_verification_keeps_the_target_distribution():
    """n-gram proposals are fixed tokens: the emitted first token is the target's own draw, whatever was proposed,
    and acceptance happens at rate p(x)."""
    p, _ = _dists(3)
    keys = jax.random.split(jax.random.key(7), DRAWS * (K + 1)).reshape(DRAWS, K + 1)
    target = jax.vmap(jax.vmap(jax.random.categorical))(keys, jnp.broadcast_to(jnp.log(p), (DRAWS, K + 1, V)))
    draft = jnp.full((DRAWS, K), int(np.argmax(p[0])), jnp.int32)  # always propose p_0's mode
    n, tokens = rs.verify_point_mass(target.astype(jnp.int32), draft, jnp.full(DRAWS, K, jnp.int32))
    pvalue, _ = _statistic(tokens, p, 0)
    assert pvalue > 1e-3
    accepted_first = float(jnp.mean(n >= 1))
    assert abs(accepted_first - p[0].max()) < 4 * np.sqrt(p[0].max() * (1 - p[0].max()) / DRAWS)
