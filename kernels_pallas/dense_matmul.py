"""Dense f32 matmul that reads one layer of stacked weights in place: y = x . w[layer].

    x       f32[M, K]
    w       f32[(L,) K, N]      weights, stacked over layers or not
    layer   i32[] or None       stacked weights: use this one
    -> f32[M, N]

Inside the layer scan XLA copies a dynamic slice of a stacked weight before its dot (SmolLM2: 14 MB per layer,
~20% of a 64-sequence decode step on CPU); the C++ kernel (kernels_pallas/cpu/matmul_f32.cc) offsets its
pointer instead. The reference is XLA's own slice and dot: the oracle in tests, and the path on TPU and GPU,
where XLA does not copy the slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.backend import resolve_backend
from kernels_pallas.quantized_matmul import check_isa


def check_inputs(x, w, layer) -> tuple[int, int, int]:
    """Trace-time checks naming what is wrong; returns (M, K, N)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K]; got shape {x.shape}")
    if w.ndim not in (2, 3):
        raise ValueError(f"w must be [(L,) K, N]; got shape {w.shape}")
    if (w.ndim == 3) != (layer is not None):
        raise ValueError("stacked weights [L, K, N] need a layer index, and only they take one")
    if w.shape[-2] != x.shape[1]:
        raise ValueError(f"x {x.shape} and w {w.shape} disagree on K")
    if layer is not None and (jnp.shape(layer) != () or jnp.result_type(layer) != jnp.int32):
        raise ValueError(f"layer must be an i32 scalar; got {jnp.shape(layer)} {jnp.result_type(layer)}")
    return x.shape[0], x.shape[1], w.shape[-1]


def kernel_supports(x, w) -> bool:
    return x.dtype == jnp.float32 and w.dtype == jnp.float32


def dense_matmul(x, w, layer=None, *, backend: str = "auto", isa: str = "auto") -> jax.Array:
    """x [M, K] . w[layer] [K, N] -> [M, N] in x's dtype. isa (CPU kernel): "avx2" pins the AVX2 tile."""
    isa_attr = check_isa(isa)
    m, _, n = check_inputs(x, w, layer)
    if resolve_backend(backend) != "cpu" or not kernel_supports(x, w):
        return dense_matmul_ref(x, w, layer)
    from kernels_pallas.cpu import ensure_registered

    ensure_registered()
    layer_arg = jnp.zeros((), jnp.int32) if layer is None else layer
    call = jax.ffi.ffi_call("jaxserve_matmul_f32", jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(x, w, layer_arg, isa=np.int64(isa_attr))


def dense_matmul_many(x, ws, layer=None, *, backend: str = "auto", isa: str = "auto") -> list[jax.Array]:
    """[dense_matmul(x, w, layer) for w in ws] in one kernel call on CPU (the projections sharing an input)."""
    isa_attr = check_isa(isa)
    shapes = [check_inputs(x, w, layer) for w in ws]
    if resolve_backend(backend) != "cpu" or not all(kernel_supports(x, w) for w in ws) or len(ws) == 1:
        return [dense_matmul(x, w, layer, backend=backend, isa=isa) for w in ws]
    from kernels_pallas.cpu import ensure_registered

    ensure_registered()
    layer_arg = jnp.zeros((), jnp.int32) if layer is None else layer
    outs = [jax.ShapeDtypeStruct((m, n), jnp.float32) for m, _, n in shapes]
    return list(jax.ffi.ffi_call("jaxserve_matmul_f32_multi", outs)(x, layer_arg, *ws, isa=np.int64(isa_attr)))


NT_MAX_ROWS = 16  # the C++ x . w^T kernel's limit; more rows go to XLA's dot (its batched GEMM is good there)


def dense_matmul_nt(x, w, *, backend: str = "auto", isa: str = "auto") -> jax.Array:
    """x [M, K] . w [N, K]^T -> f32 [M, N]: the LM head over a tied embedding [V, E]. On CPU with at most
    NT_MAX_ROWS rows the C++ kernel reads w once for all rows (XLA's dot costs ~2x at 5 rows what it does at 1);
    else XLA's dot (the reference). One row takes the kernel too (as fast as XLA's GEMV there): a row's logits
    are then the same bits at 1 row as at 16, so one stream's plain step and its speculative verification (5 or
    9 rows) pick the same argmax even at a near-tie."""
    isa_attr = check_isa(isa)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K] and w [N, K]; got {x.shape} and {w.shape}")
    m, n = x.shape[0], w.shape[0]
    if resolve_backend(backend) != "cpu" or not kernel_supports(x, w) or not 0 < m <= NT_MAX_ROWS:
        return dense_matmul_nt_ref(x, w)
    from kernels_pallas.cpu import ensure_registered

    ensure_registered()
    return jax.ffi.ffi_call("jaxserve_matmul_f32_nt", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        x, w, isa=np.int64(isa_attr)
    )


def dense_matmul_nt_ref(x, w) -> jax.Array:
    return jnp.einsum("mk,nk->mn", x, w).astype(jnp.float32)


def dense_matmul_ref(x, w, layer=None) -> jax.Array:
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)
    return x @ w
