"""Quantized matmul: y = x . w^T with int8 or 4-bit weights in blocks along K and activations quantized on the fly.

    x       f32[M, K]                   activations (any float dtype; computed in f32)
    values  int8[(L,) N, K]             int8 weights, or
            uint8[(L,) N, K // 2]       4-bit weights, two per byte: in each block of 32, byte j holds element j
                                        (low nibble) and element j + 16 (high nibble), as GGUF's Q4_0/Q4_1
    scales  f16[(L,) N, K // group]     one per group of `group` (a multiple of 32) weights of a row
    mins    f16[(L,) N, K // group]     4-bit only: weight = nibble * scale + min   (Q4_0: min = -8 * scale)
    layer   i32[] or None               values stacked over layers: use this one (the CPU kernel offsets its
                                        pointers instead of XLA copying a slice inside the layer scan)
    -> f32[M, N]

Activations are quantized per row and per block of 32 (llama.cpp's Q8_0 x Q8_1 / vLLM's dynamic W8A8):
d = amax * f32(1 / 127), q = round_half_even(x * (1 / d)), and the integer dots read 4-8x fewer weight bytes
than f32 (decode is bandwidth-bound). On CPUs without AVX-512 VNNI an int8 dot costs more instructions than f32
FMAs, so from F32_MIN_ROWS rows on (prefill, big batches: compute-bound) the weights are dequantized and x stays
f32; with VNNI (64 integer products per instruction) the integer kernels (a row-dot GEMV for few rows, a GEMM for
more) win at every M and x is always quantized.
`f32_min_rows()` says which rule holds here. The reference does exactly the same, then runs XLA's f32 dot: the
oracle of the C++ kernel, and the path on TPU and GPU until Pallas kernels replace it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.backend import resolve_backend

BLOCK = 32  # activation block; weight groups are multiples of it
F32_MIN_ROWS = 16  # without VNNI: from this many rows of x on, x stays f32 and the weights are dequantized
NEVER = 2**31 - 1


def f32_min_rows(isa: str = "auto") -> int:
    """The C++ kernel's rule (see above): from how many rows on x stays f32. NEVER on a CPU with AVX-512 VNNI
    (unless isa pins AVX2), else F32_MIN_ROWS."""
    from kernels_pallas.cpu import cpu_has_vnni

    return NEVER if isa == "auto" and cpu_has_vnni() else F32_MIN_ROWS


def quantizes_activations(m: int, backend: str = "auto", isa: str = "auto") -> bool:
    """Whether quantized_matmul quantizes an x of m rows (below the f32 rule of the path it takes), as opposed
    to dequantizing the weights and keeping x f32."""
    return m < (f32_min_rows(isa) if resolve_backend(backend) == "cpu" else F32_MIN_ROWS)


def check_inputs(x, values, scales, mins, layer) -> tuple[int, int, int, bool]:
    """Trace-time checks naming what is wrong; returns (M, K, N, four_bit)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K]; got shape {x.shape}")
    m, k = x.shape
    if values.ndim not in (2, 3) or scales.ndim != values.ndim:
        raise ValueError(
            f"values must be [(L,) N, Kv] and scales [(L,) N, G] alike; got {values.shape}, {scales.shape}"
        )
    if (values.ndim == 3) != (layer is not None):
        raise ValueError("stacked values [L, N, Kv] need a layer index, and only they take one")
    four_bit = values.dtype == jnp.uint8
    if not four_bit and values.dtype != jnp.int8:
        raise ValueError(f"values must be int8 (8-bit) or uint8 (packed 4-bit); got {values.dtype}")
    n, kv = values.shape[-2:]
    if k % BLOCK or kv != (k // 2 if four_bit else k):
        implied = kv * (2 if four_bit else 1)
        raise ValueError(
            f"x has K={k} but values {values.shape} ({values.dtype}) imply K={implied}; K must be a multiple of {BLOCK}"
        )
    g = scales.shape[-1]
    if scales.shape[:-1] != values.shape[:-1] or g < 1 or k % g or (k // g) % BLOCK:
        raise ValueError(f"scales {scales.shape} must be [(L,) N, K / group] with the group a multiple of {BLOCK}")
    if scales.dtype != jnp.float16:
        raise ValueError(f"scales must be float16; got {scales.dtype}")
    bad_mins = mins is not None and (mins.shape != scales.shape or mins.dtype != jnp.float16)
    if four_bit != (mins is not None) or bad_mins:
        raise ValueError("4-bit weights need f16 mins shaped like the scales; int8 weights take none")
    if layer is not None and (jnp.shape(layer) != () or jnp.result_type(layer) != jnp.int32):
        raise ValueError(f"layer must be an i32 scalar; got {jnp.shape(layer)} {jnp.result_type(layer)}")
    return m, k, n, four_bit


ISAS = {"auto": 0, "avx2": 1}  # the C++ kernels' `isa` attribute


def check_isa(isa: str) -> int:
    """The `isa` attribute of a C++ kernel call ("auto": the widest the CPU has; "avx2": the baseline paths)."""
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}: expected one of {sorted(ISAS)}")
    return ISAS[isa]


def quantized_matmul(
    x, values, scales, mins=None, layer=None, *, backend: str = "auto", isa: str = "auto"
) -> jax.Array:
    """x [M, K] . dequantized(values)^T -> f32[M, N]. See the module docstring for the layouts.

    isa (CPU kernel): "auto" uses the CPU's AVX-512 / AVX-512 VNNI paths where it has them; "avx2" pins the
    baseline paths."""
    isa_attr = check_isa(isa)
    m, k, n, four_bit = check_inputs(x, values, scales, mins, layer)
    if resolve_backend(backend) != "cpu":  # TPU / GPU: the reference until Pallas kernels come
        return quantized_matmul_ref(x, values, scales, mins, layer)
    from kernels_pallas.cpu import ensure_registered

    ensure_registered()
    layer_arg = jnp.zeros((), jnp.int32) if layer is None else layer
    target = "jaxserve_qmatmul_int4" if four_bit else "jaxserve_qmatmul_int8"
    args = (x.astype(jnp.float32), values, scales, *((mins,) if four_bit else ()), layer_arg)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(*args, f32_min_rows=np.int64(f32_min_rows(isa)), isa=np.int64(isa_attr))


def quantized_matmul_many(x, weights, layer=None, *, backend: str = "auto", isa: str = "auto") -> list[jax.Array]:
    """[quantized_matmul(x, *w, layer) for w in weights], weights = [(values, scales, mins), ...] of one bit width:
    on CPU one kernel call (x quantized once, the work of every weight spread over the threads together; the
    projections that share an input: q, k, v and gate, up)."""
    isa_attr = check_isa(isa)
    shapes = [check_inputs(x, v, s, m, layer) for v, s, m in weights]
    four_bit = {fb for *_, fb in shapes}
    if len(four_bit) != 1:
        raise ValueError("quantized_matmul_many takes weights of one bit width")
    if resolve_backend(backend) != "cpu" or len(weights) == 1:
        return [quantized_matmul(x, v, s, m, layer, backend=backend, isa=isa) for v, s, m in weights]
    from kernels_pallas.cpu import ensure_registered

    ensure_registered()
    four_bit = four_bit.pop()
    layer_arg = jnp.zeros((), jnp.int32) if layer is None else layer
    flat = [a for v, s, m in weights for a in ((v, s, m) if four_bit else (v, s))]
    outs = [jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32) for _, _, n, _ in shapes]
    call = jax.ffi.ffi_call("jaxserve_qmatmul_multi", outs)
    return list(
        call(
            x.astype(jnp.float32),
            layer_arg,
            *flat,
            bits=np.int64(4 if four_bit else 8),
            f32_min_rows=np.int64(f32_min_rows(isa)),
            isa=np.int64(isa_attr),
        )
    )


def absmax_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., n] floats -> int8 q [..., n], f32 d [...]: d = amax * f32(1 / 127) over the last axis (a product,
    not a division: XLA turns division by a constant into that product, and the C++ kernels must agree bit for
    bit), q = round(x * (1 / d)) (half to even, as the C++ kernels; d = 0 gives q = 0). Activations and int8 KV
    rows both use it."""
    xf = x.astype(jnp.float32)
    d = jnp.max(jnp.abs(xf), axis=-1) * np.float32(1 / 127)
    inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    return jnp.clip(jnp.round(xf * inv[..., None]), -127, 127).astype(jnp.int8), d


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32[M, K] -> int8 q [M, K], f32 d [M, K / 32]: per row and block of 32 (absmax_int8)."""
    m, k = x.shape
    q, d = absmax_int8(x.reshape(m, k // BLOCK, BLOCK))
    return q.reshape(m, k), d


def unpack_4bit(values: jax.Array) -> jax.Array:
    """uint8[..., N, K / 2] (GGUF Q4 block order) -> uint8[..., N, K] nibbles in element order."""
    *lead, n, half = values.shape
    blocks = values.reshape(*lead, n, half // 16, 16)
    lo, hi = blocks & 0x0F, blocks >> 4
    return jnp.concatenate([lo, hi], axis=-1).reshape(*lead, n, half * 2)


def dequantize(values, scales, mins=None) -> jax.Array:
    """The weights as f32[..., N, K]."""
    four_bit = mins is not None
    q = unpack_4bit(values) if four_bit else values
    *lead, n, k = q.shape
    g = scales.shape[-1]
    w = q.astype(jnp.float32).reshape(*lead, n, g, k // g) * scales.astype(jnp.float32)[..., None]
    if four_bit:
        w = w + mins.astype(jnp.float32)[..., None]
    return w.reshape(*lead, n, k)


def quantized_matmul_ref(x, values, scales, mins=None, layer=None, *, min_f32_rows: int = F32_MIN_ROWS) -> jax.Array:
    """Pure jnp: quantize x below min_f32_rows rows, dequantize the weights, f32 dot at full precision. As the
    C++ kernel's oracle it takes the kernel's rule (f32_min_rows(isa)); as the path of TPU, GPU and tensor
    parallel, F32_MIN_ROWS (f32 activations for prefill and big batches)."""
    if layer is not None:
        pick = lambda a: jax.lax.dynamic_index_in_dim(jnp.asarray(a), layer, keepdims=False)  # noqa: E731
        values, scales = pick(values), pick(scales)
        mins = None if mins is None else pick(mins)
    m, k = x.shape
    if m >= min_f32_rows:
        xf = x.astype(jnp.float32)
    else:
        q, d = quantize_activations(x)
        xf = (q.astype(jnp.float32).reshape(m, k // BLOCK, BLOCK) * d[..., None]).reshape(m, k)
    w = dequantize(values, scales, mins)
    return jnp.dot(xf, w.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
