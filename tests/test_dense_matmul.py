"""The dense f32 matmul kernel (reads one layer of stacked weights in place) equals XLA's dot of the slice, over
M from 1 to 512, odd N and K (tile, panel and K-block remainders), both ISAs, and inside a layer scan; the x . w^T
kernel of the tied LM head equals it for 1 to NT_MAX_ROWS (16) rows (more run XLA's dot)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.dense_matmul import NT_MAX_ROWS, dense_matmul, dense_matmul_many, dense_matmul_nt, dense_matmul_ref

KERNEL = jax.jit(dense_matmul)
AVX2_ONLY = jax.jit(lambda *a: dense_matmul(*a, isa="avx2"))


def f64(x, w):
    return x.astype(np.float64) @ w.astype(np.float64)


def tolerance(x, w):
    """f32 accumulation in any order: a few ulps of sum |x| |w| per output."""
    return 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)) + 1e-6


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 150), k=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_f64_dot(m, n, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    for kernel in (KERNEL, AVX2_ONLY):
        got = np.asarray(kernel(x, w))
        assert got.shape == (m, n) and got.dtype == np.float32
        assert np.all(np.abs(got - f64(x, w)) <= tolerance(x, w))


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 7, 12, 16, 64, 97, 128, 256, 512])
def test_every_bucket_size(m):
    """The M the buckets use, with K past one K block (512) and N past a whole number of panels."""
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 600)).astype(np.float32)
    w = rng.standard_normal((600, 200)).astype(np.float32)
    for kernel in (KERNEL, AVX2_ONLY):
        got = np.asarray(kernel(x, w))
        assert np.all(np.abs(got - f64(x, w)) <= tolerance(x, w))


def test_stacked_layers_pick_their_layer_inside_a_scan():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    w = rng.standard_normal((3, 48, 33)).astype(np.float32)

    def scan(fn):
        def body(c, i):
            return c, fn(x, w, i)

        return jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32))[1])()

    got, ref = np.asarray(scan(dense_matmul)), np.asarray(scan(dense_matmul_ref))
    for layer in range(3):
        assert np.all(np.abs(got[layer] - f64(x, w[layer])) <= tolerance(x, w[layer]))
        assert np.all(np.abs(ref[layer] - f64(x, w[layer])) <= tolerance(x, w[layer]))
    assert not np.allclose(got[0], got[1])


def test_empty_k_gives_zeros():
    got = np.asarray(KERNEL(np.ones((3, 0), np.float32), np.ones((0, 5), np.float32)))
    np.testing.assert_array_equal(got, np.zeros((3, 5), np.float32))


def test_non_f32_runs_the_reference_and_bad_shapes_name_the_problem():
    x = jnp.ones((2, 8), jnp.bfloat16)
    w = jnp.ones((8, 4), jnp.bfloat16)
    assert dense_matmul(x, w).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="disagree on K"):
        dense_matmul(jnp.ones((2, 8)), jnp.ones((9, 4)))
    with pytest.raises(ValueError, match="need a layer index"):
        dense_matmul(jnp.ones((2, 8)), jnp.ones((3, 8, 4)))
    with pytest.raises(ValueError, match="isa"):
        dense_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), isa="sse")


@pytest.mark.parametrize("m", [1, 3, 64])
def test_many_weights_in_one_call_equal_one_call_each(m):
    rng = np.random.default_rng(m)
    ws = [rng.standard_normal((2, 40, n)).astype(np.float32) for n in (70, 17, 130)]
    x = rng.standard_normal((m, 40)).astype(np.float32)
    got = jax.jit(lambda x, ws, i: dense_matmul_many(x, ws, i))(x, ws, jnp.int32(1))
    for w, y in zip(ws, got):
        np.testing.assert_allclose(np.asarray(y), np.asarray(KERNEL(x, w[1])), rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, NT_MAX_ROWS), n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_transposed_kernel_equals_f64_dot(m, n, k, seed):
    """x [M, K] . w [N, K]^T: odd N (the pair of w rows), K off the vector width (masked tails), N * K past
    the threading threshold, both ISAs; the C++ call is really in the program."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    for isa in ("auto", "avx2"):
        fn = jax.jit(lambda x, w, isa=isa: dense_matmul_nt(x, w, isa=isa))
        assert "jaxserve_matmul_f32_nt" in fn.lower(x, w).as_text()
        got = np.asarray(fn(x, w))
        assert got.shape == (m, n) and got.dtype == np.float32
        assert np.all(np.abs(got - f64(x, w.T)) <= tolerance(x, w.T))


def test_transposed_matmul_at_the_head_shape_and_outside_its_rows():
    """SmolLM2's head shape (K 576) over a slice of the vocabulary; a row's logits are the same bits whatever
    the rows beside it (1 to NT_MAX_ROWS, in the kernel's first group of 8 rows or its second); more rows take
    XLA's dot (the reference) and still agree."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4099, 576)).astype(np.float32)
    rows = rng.standard_normal((NT_MAX_ROWS + 1, 576)).astype(np.float32)
    fn = jax.jit(dense_matmul_nt)
    first = np.asarray(fn(rows[:1], w))[0]
    for m in (1, 5, 8, 9, NT_MAX_ROWS, NT_MAX_ROWS + 1):
        x = rows[:m]
        assert ("jaxserve_matmul_f32_nt" in fn.lower(x, w).as_text()) == (m <= NT_MAX_ROWS)
        got = np.asarray(fn(x, w))
        assert np.all(np.abs(got - f64(x, w.T)) <= tolerance(x, w.T))
        if m <= NT_MAX_ROWS:  # the first row, and the last (past 8: the kernel's second group of rows)
            assert np.array_equal(got[0], first)
            assert np.array_equal(got[-1], np.asarray(fn(x[-1:], w))[0])
    with pytest.raises(ValueError, match=r"w \[N, K\]"):
        dense_matmul_nt(jnp.ones((2, 8)), jnp.ones((4, 9)))
