"""Ragged paged attention: every backend against plain dense causal attention on unpaged tensors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from kernels_pallas.kv_write import write_kv
from kernels_pallas.ragged_paged_attention import ragged_paged_attention
from tests.rpa_cases import dense_attention, make_case, ragged_cases


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def _padded(case):
    """The case's arrays padded to power-of-two sizes (query rows, pages, sequences, block-table width), so
    hypothesis' many shapes fall into few compiled ones; the padding is what a kernel must ignore anyway (rows
    past the valid ones, NaN pages nobody owns, sequences with nothing cached, table columns past a sequence's
    pages)."""
    q, k, v, lens, tables, qsl, ns = case.args()
    t, n, s, w = q.shape[0], k.shape[0], lens.shape[0], tables.shape[1]
    q = np.concatenate([q, np.zeros((_pow2(t, 64) - t, *q.shape[1:]), q.dtype)])
    nan = np.full((_pow2(n, 64) - n, *k.shape[1:]), np.nan if k.dtype != np.int8 else 0, k.dtype)
    k, v = np.concatenate([k, nan]), np.concatenate([v, nan])
    lens = np.concatenate([lens, np.zeros(_pow2(s) - s, lens.dtype)])
    tables = np.pad(tables, ((0, _pow2(s) - s), (0, _pow2(w) - w)))
    qsl = np.concatenate([qsl, np.full(_pow2(s) - s, qsl[-1], qsl.dtype)])
    return (q, k, v, lens, tables, qsl, ns), t


@functools.lru_cache(maxsize=None)
def _compiled(backend, isa, sm_scale, sliding_window, soft_cap, kw: tuple):
    attn = ragged_paged_attention
    extra = dict(kw)
    if isa is not None:
        from kernels_pallas.cpu_attention import ragged_paged_attention_cpu

        attn = functools.partial(ragged_paged_attention_cpu, isa=isa)
    else:
        extra["backend"] = backend
    return jax.jit(lambda *a: attn(*a, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, **extra))


def _run(case, backend="reference", isa=None, **kw):
    """isa ("auto" / "avx2"): the C++ CPU kernel called directly, with that instruction set. One jitted function
    per configuration, over padded shapes (_padded): the output's first rows are the case's."""
    d = case.q.shape[-1]
    args, t = _padded(case)
    fn = _compiled(backend, isa, d**-0.5, case.sliding_window, case.soft_cap, tuple(sorted(kw.items())))
    return np.asarray(fn(*args))[:t]


def _check(case, out, atol=2e-5):
    rows = case.num_valid_rows
    assert np.all(np.isfinite(out[:rows])), "NaN/inf in valid rows: a read outside the sequence leaked"
    np.testing.assert_allclose(out[:rows], dense_attention(case)[:rows], atol=atol, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(case=ragged_cases())
def test_reference_equals_dense(case):
    _check(case, _run(case))


def test_reference_decode_prefill_mixed_story():
    rng = np.random.default_rng(0)
    # seq 0: a 37-token prompt in one chunk; seq 1: decode at 50 cached; seq 2: second chunk (tokens 17..24)
    case = make_case(rng, [37, 1, 8], [37, 50, 25], page_size=16, num_q_heads=9, num_kv_heads=3, head_dim=64)
    _check(case, _run(case))


def test_padding_rows_and_sequences_give_zero():
    case = make_case(
        np.random.default_rng(1),
        [3, 1],
        [10, 7],
        page_size=8,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        pad_seqs=2,
        pad_tokens=5,
    )
    out = _run(case)
    assert np.all(out[case.num_valid_rows :] == 0)


def test_write_kv_scatters_by_slot_and_drops_padding():
    k_pages = jnp.zeros((4, 8, 2, 16))
    v_pages = jnp.zeros((4, 8, 2, 16))
    k = jnp.arange(3 * 2 * 16, dtype=jnp.float32).reshape(3, 2, 16) + 1
    slots = jnp.array([2 * 8 + 5, 3 * 8 + 0, -1], jnp.int32)
    k2, v2 = write_kv(k_pages, v_pages, k, -k, slots)
    np.testing.assert_array_equal(k2[2, 5], k[0])
    np.testing.assert_array_equal(k2[3, 0], k[1])
    np.testing.assert_array_equal(v2[3, 0], -k[1])
    assert float(jnp.abs(k2).sum()) == float(jnp.abs(k[:2]).sum())  # the padding row wrote nothing


def test_unknown_backend_is_a_clear_error():
    case = make_case(np.random.default_rng(2), [1], [4], page_size=8, num_q_heads=2, num_kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="backend='cuda_magic'"):
        _run(case, backend="cuda_magic")


# ---- the C++ CPU kernel (kernels_pallas/cpu/attention.cc) ---------------------------------------------------


# Where the CPU has AVX-512 "auto" runs the 16-lane units (head_dim 16..128) and "avx2" pins the baseline ones;
# elsewhere both run the baseline.
ISAS = ("auto", "avx2")


@settings(max_examples=60, deadline=None)
@given(case=ragged_cases())
def test_cpu_kernel_equals_dense(case):
    _check(case, _run(case, backend="cpu"))
    _check(case, _run(case, isa="avx2"))


@settings(max_examples=20, deadline=None)
@given(case=ragged_cases(head_dim=64, max_kv=60))
def test_cpu_kernel_equals_dense_at_smollm2_head_dim(case):
    q8, exact = _int8_case(case)
    for isa in ISAS:
        _check(case, _run(case, isa=isa))
        _check(exact, _run(q8, isa=isa))  # int8 pages: the dense attention of the dequantized ones


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_kernel_decode_prefill_mixed_story_and_padding(isa):
    rng = np.random.default_rng(0)
    case = make_case(
        rng,
        [37, 1, 8, 1],
        [37, 50, 25, 300],
        page_size=16,
        num_q_heads=9,
        num_kv_heads=3,
        head_dim=64,
        pad_seqs=2,
        pad_tokens=5,
    )
    out = _run(case, isa=isa)
    _check(case, out)
    assert np.all(out[case.num_valid_rows :] == 0)
    np.testing.assert_allclose(out, _run(case), atol=2e-5, rtol=1e-5)  # and equals the reference


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("head_dim", [32, 128])
def test_cpu_kernel_sliding_window_and_soft_cap(isa, head_dim):
    rng = np.random.default_rng(3)
    case = make_case(
        rng,
        [20, 1, 5],
        [40, 70, 5],
        page_size=8,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=head_dim,
        sliding_window=12,
        soft_cap=30.0,
    )
    _check(case, _run(case, isa=isa))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_cpu_kernel_many_sequences_units_take_every_kv_head(isa, page_size):
    """Enough row blocks that each unit takes all KV heads of its rows (and prefetches the next block a
    position at a time), with f32 and int8 pages, prefill chunks among the decodes, and a sliding window."""
    rng = np.random.default_rng(page_size)
    q_lens = [1] * 14 + [20, 3]
    kv_lens = [int(k) for k in rng.integers(1, 90, 14)] + [45, 70]
    for window in (None, 10):
        case = make_case(
            rng, q_lens, kv_lens, page_size=page_size, num_q_heads=9, num_kv_heads=3, head_dim=64, sliding_window=window
        )
        _check(case, _run(case, isa=isa))
        q8, exact = _int8_case(case)
        _check(exact, _run(q8, isa=isa))


# ---- int8 KV pages (kernels_pallas/kv_quant.py) -----------------------------------------------------------


def _int8_case(case):
    """The case's pages quantized per row (NaN rows get a NaN scale: reading them still poisons the output), and
    the float case of the dequantized pages: the oracle's input."""
    import dataclasses

    from kernels_pallas.kv_quant import dequantize_rows, quantize_rows

    kq, vq = (np.asarray(quantize_rows(jnp.asarray(p))) for p in (case.k_pages, case.v_pages))
    exact = dataclasses.replace(
        case, k_pages=np.asarray(dequantize_rows(jnp.asarray(kq))), v_pages=np.asarray(dequantize_rows(jnp.asarray(vq)))
    )
    return dataclasses.replace(case, k_pages=kq, v_pages=vq), exact


@settings(max_examples=6, deadline=None)
@given(case=ragged_cases())
def test_int8_pages_reference_and_cpu_kernel_equal_dense_of_dequantized(case):
    q8, exact = _int8_case(case)
    want = dense_attention(exact)
    rows = case.num_valid_rows
    for backend, isa in (("reference", None), ("cpu", "auto"), ("cpu", "avx2")):
        out = _run(q8, backend=backend, isa=isa)
        assert np.all(np.isfinite(out[:rows])), (backend, isa)
        np.testing.assert_allclose(out[:rows], want[:rows], atol=2e-5, rtol=1e-5, err_msg=f"{backend} {isa}")


def test_int8_rows_round_trip_and_write():
    from kernels_pallas.kv_quant import dequantize_rows, quantize_rows

    x = np.random.default_rng(0).standard_normal((5, 2, 16)).astype(np.float32)
    x[1, 0] = 0.0
    back = np.asarray(dequantize_rows(quantize_rows(jnp.asarray(x))))
    step = np.abs(x).max(-1, keepdims=True) / 127
    assert np.all(np.abs(back - x) <= 0.5 * step + 1e-7) and np.all(back[1, 0] == 0)
    pages = jnp.zeros((3, 4, 2, 20), jnp.int8)
    k2, v2 = write_kv(pages, pages + 0, jnp.asarray(x[:2]), jnp.asarray(-x[:2]), jnp.array([5, -1], jnp.int32))
    np.testing.assert_allclose(np.asarray(dequantize_rows(k2[1, 1])), back[0], rtol=0, atol=0)
    assert np.all(np.asarray(k2[0]) == 0) and np.all(np.asarray(k2[2]) == 0)  # padding row dropped


def test_pallas_backends_refuse_int8_pages():
    case = make_case(np.random.default_rng(1), [3, 1], [10, 7], page_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16)
    q8, _ = _int8_case(case)
    for backend in ("pallas_tpu", "pallas_gpu"):
        with pytest.raises(ValueError, match="int8"):
            _run(q8, backend=backend, interpret=True)
