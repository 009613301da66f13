"""The quantized matmul: the C++ FFI kernel equals the jnp reference, the reference equals a float64
dequantize-then-matmul, over shapes, group sizes, M from 1 to 512 and odd sizes; the load-time quantizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.quantized_matmul import (
    BLOCK,
    F32_MIN_ROWS,
    NEVER,
    check_inputs,
    dequantize,
    f32_min_rows,
    quantize_activations,
    quantized_matmul,
    quantized_matmul_many,
    quantized_matmul_ref,
    unpack_4bit,
)
from models.quant import host_dequantize, pack_4bit, quantize_int4, quantize_int8


def random_weight(rng, n, k, bits, group, layers=None):
    lead = () if layers is None else (layers,)
    g = k // group
    if bits == 4:
        values = rng.integers(0, 256, (*lead, n, k // 2), dtype=np.uint8)
        mins = (rng.standard_normal((*lead, n, g)) * 0.05).astype(np.float16)
    else:
        values = rng.integers(-127, 128, (*lead, n, k), dtype=np.int8)
        mins = None
    scales = (rng.random((*lead, n, g)) * 0.02 + 1e-3).astype(np.float16)
    return values, scales, mins


def f64_oracle(x, values, scales, mins, isa="auto"):
    """Quantize x as the kernel does (f32 ops; only below f32_min_rows rows), then everything in float64."""
    m, k = x.shape
    if m >= f32_min_rows(isa):
        xf = x.astype(np.float64)
    else:
        q, d = (np.asarray(a) for a in quantize_activations(jnp.asarray(x)))
        xf = (q.astype(np.float64).reshape(m, k // BLOCK, BLOCK) * d.astype(np.float64)[..., None]).reshape(m, k)
    nib = np.asarray(unpack_4bit(jnp.asarray(values))) if mins is not None else values
    n = nib.shape[0]
    g = scales.shape[-1]
    w = nib.astype(np.float64).reshape(n, g, k // g) * scales.astype(np.float64)[..., None]
    if mins is not None:
        w = w + mins.astype(np.float64)[..., None]
    return xf @ w.reshape(n, k).T


def tolerance(x, values, scales, mins):
    """Error allowed for f32 accumulation: a few ulps of sum |x| |w| per output."""
    mins = None if mins is None else jnp.asarray(mins)
    w = np.abs(np.asarray(dequantize(jnp.asarray(values), jnp.asarray(scales), mins)))
    return 1e-5 * (np.abs(x) @ w.T) + 1e-6


KERNEL = jax.jit(quantized_matmul)
REF = jax.jit(lambda *a: quantized_matmul_ref(*a, min_f32_rows=f32_min_rows("auto")))  # the kernel's rule


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 70),
    kb=st.integers(1, 12),
    bits=st.sampled_from([4, 8]),
    group_blocks=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
)
def test_kernel_equals_reference_and_f64(m, n, kb, bits, group_blocks, seed, scale):
    kb = kb * group_blocks  # K holds whole groups
    k = kb * BLOCK
    rng = np.random.default_rng(seed)
    values, scales, mins = random_weight(rng, n, k, bits, BLOCK * group_blocks)
    x = (rng.standard_normal((m, k)) * scale).astype(np.float32)
    x[rng.random((m, k)) < 0.05] = 0.0  # zero blocks and entries (scale 0 paths)
    got, ref = np.asarray(KERNEL(x, values, scales, mins)), np.asarray(REF(x, values, scales, mins))
    tol = tolerance(x, values, scales, mins)
    assert got.shape == ref.shape == (m, n)
    assert np.all(np.abs(got - ref) <= tol)
    assert np.all(np.abs(ref - f64_oracle(x, values, scales, mins)) <= tol)


AVX2_ONLY = jax.jit(lambda *a: quantized_matmul(*a, isa="avx2"))
REF_AVX2 = jax.jit(lambda *a: quantized_matmul_ref(*a, min_f32_rows=f32_min_rows("avx2")))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 15, 16, 31, 64, 127, 128, 255, 512])
def test_every_bucket_size(m, bits):
    """The M the buckets use, on SmolLM2's widest projection shapes (threads, every tile remainder, a panel
    past N), with the ISA the CPU offers (AVX-512 VNNI: a row-dot GEMV for few rows, the integer GEMM for more)
    and with the AVX2 baseline pinned (the same where the CPU has neither). 11 | 12 and 15 | 16 straddle the
    VNNI GEMV / GEMM crossovers (int8 | 4-bit)."""
    rng = np.random.default_rng(m)
    for n, k in ((1536 + 3, 576), (40, 1536 + 32)):  # 1568: an odd number of blocks
        values, scales, mins = random_weight(rng, n, k, bits, BLOCK)
        x = rng.standard_normal((m, k)).astype(np.float32)
        for kernel, ref, isa in ((KERNEL, REF, "auto"), (AVX2_ONLY, REF_AVX2, "avx2")):
            got, want = np.asarray(kernel(x, values, scales, mins)), np.asarray(ref(x, values, scales, mins))
            assert np.all(np.abs(got - want) <= tolerance(x, values, scales, mins)), (isa, n, k)
            assert np.all(np.abs(want - f64_oracle(x, values, scales, mins, isa)) <= tolerance(x, values, scales, mins))


@pytest.mark.parametrize("bits", [4, 8])
def test_stacked_layers_pick_their_layer(bits):
    """Values stacked [L, N, K] with a traced layer index read that layer (inside a scan, as the model does)."""
    rng = np.random.default_rng(1)
    values, scales, mins = random_weight(rng, 40, 96, bits, BLOCK, layers=3)
    x = rng.standard_normal((5, 96)).astype(np.float32)

    def scan(fn):
        def body(c, i):
            return c, fn(x, values, scales, mins, i)

        return jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32))[1])()

    got, ref = np.asarray(scan(quantized_matmul)), np.asarray(scan(quantized_matmul_ref))
    for layer in range(3):
        one = np.asarray(REF(x, values[layer], scales[layer], None if mins is None else mins[layer]))
        np.testing.assert_array_equal(ref[layer], one)
        assert np.all(np.abs(got[layer] - one) <= 1e-5 * np.abs(one).max() + 1e-6)
    assert not np.allclose(ref[0], ref[1])


@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_where_activations_stay_f32(isa):
    """Below f32_min_rows the result is that of int8 activations; from it on, of f32 activations. With AVX-512
    VNNI (isa auto) x is quantized at every M; pinned to AVX2 (or without VNNI) from F32_MIN_ROWS on it is not."""
    from kernels_pallas.cpu import cpu_has_vnni

    assert f32_min_rows(isa) == (NEVER if isa == "auto" and cpu_has_vnni() else F32_MIN_ROWS)
    kernel = KERNEL if isa == "auto" else AVX2_ONLY
    rng = np.random.default_rng(2)
    values, scales, mins = random_weight(rng, 8, 64, 8, BLOCK)
    x = rng.standard_normal((F32_MIN_ROWS, 64)).astype(np.float32)
    exact = x.astype(np.float64) @ np.asarray(dequantize(jnp.asarray(values), jnp.asarray(scales))).T.astype(np.float64)
    many = np.abs(np.asarray(kernel(x, values, scales, None)) - exact).max()
    few = np.abs(np.asarray(kernel(x[: F32_MIN_ROWS - 1], values, scales, None)) - exact[: F32_MIN_ROWS - 1]).max()
    assert few > 1e-3  # int8 activations
    assert (many > 1e-3) if f32_min_rows(isa) == NEVER else (many < 1e-4)


def test_activation_quantization_matches_its_definition():
    x = np.array([[0.5, -1.27, 0.0, 0.004] * 8, [0.0] * 32], np.float32)
    q, d = (np.asarray(a) for a in quantize_activations(jnp.asarray(x)))
    assert d[0, 0] == np.float32(1.27) * np.float32(1 / 127) and d[1, 0] == 0
    assert q[0, 1] == -127 and q[0, 2] == 0 and np.all(q[1] == 0)
    np.testing.assert_array_equal(q[0, :4], np.rint(x[0, :4] * (np.float32(1) / d[0, 0])).astype(np.int8))


def test_quantizers_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 48, 128)).astype(np.float32)
    q8, q4 = quantize_int8(w), quantize_int4(w)
    step8 = q8.scales.astype(np.float32).repeat(BLOCK, axis=-1)
    step4 = q4.scales.astype(np.float32).repeat(BLOCK, axis=-1)
    assert np.all(np.abs(host_dequantize(q8) - w) <= 0.5 * step8 + 1e-6)
    assert np.all(np.abs(host_dequantize(q4) - w) <= 0.5 * step4 + 2e-3 * np.abs(w).max())  # f16 min rounding
    nib = rng.integers(0, 16, (3, 64), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(unpack_4bit(jnp.asarray(pack_4bit(nib)))), nib)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(x=np.zeros((2, 40), np.float32)), "multiple of 32"),
        (dict(values=np.zeros((4, 64), np.int16)), "int8"),
        (dict(scales=np.zeros((4, 3), np.float16)), "group"),
        (dict(scales=np.zeros((4, 2), np.float32)), "float16"),
        (dict(mins=np.zeros((4, 2), np.float16)), "mins"),
        (dict(layer=np.int32(0)), "layer"),
    ],
)
def test_bad_inputs_name_the_problem(bad, match):
    args = dict(
        x=np.zeros((2, 64), np.float32),
        values=np.zeros((4, 64), np.int8),
        scales=np.zeros((4, 2), np.float16),
        mins=None,
        layer=None,
    )
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        check_inputs(*args.values())


def test_build_without_a_compiler_names_the_fix(monkeypatch, tmp_path):
    """No C++ compiler: a clear error saying what to install and how to run the references instead."""
    import kernels_pallas.cpu as cpu

    monkeypatch.setattr(cpu, "library_path", lambda: str(tmp_path / "libjaxserve_cpu-x.so"))
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(cpu.CpuKernelsUnavailable, match="C\\+\\+17 compiler.*attention_backend='reference'"):
        cpu.build()


def test_reference_backend_runs_without_the_cpu_kernels():
    """backend="reference" never touches the C++ library (the fallback users ask for)."""
    rng = np.random.default_rng(5)
    values, scales, mins = random_weight(rng, 8, 64, 4, BLOCK)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    text = jax.jit(lambda x: quantized_matmul(x, values, scales, mins, backend="reference")).lower(x).as_text()
    assert "jaxserve_qmatmul" not in text
    # (the weights as arguments, as REF takes them: baked in as constants, XLA folds the dequantization at
    # compile time in its own order, one ulp off on some CPUs)
    run = jax.jit(lambda *a: quantized_matmul(*a, backend="reference"))
    np.testing.assert_allclose(
        np.asarray(run(x, values, scales, mins)),
        np.asarray(jax.jit(quantized_matmul_ref)(x, values, scales, mins)),  # the reference backend's own rule
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 5, 9, 64])
def test_many_weights_in_one_call_equal_one_call_each(m, bits):
    """q, k, v (and gate, up) in one kernel call: each output equals that weight's own call, stacked or not,
    with outputs of different widths (one narrower than a panel)."""
    rng = np.random.default_rng(m + bits)
    weights = [random_weight(rng, n, 96, bits, BLOCK, layers=2) for n in (70, 24, 33)]
    x = rng.standard_normal((m, 96)).astype(np.float32)
    layer = jnp.int32(1)
    got = jax.jit(lambda x, ws, i: quantized_matmul_many(x, ws, i))(x, weights, layer)
    for (values, scales, mins), y in zip(weights, got):
        one = np.asarray(KERNEL(x, values[1], scales[1], None if mins is None else mins[1]))
        assert y.shape == one.shape
        np.testing.assert_allclose(np.asarray(y), one, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one bit width"):
        quantized_matmul_many(x, [weights[0], random_weight(rng, 8, 96, 12 - bits, BLOCK, layers=2)], layer)
