"""Ragged paged attention on CPU: our C++ kernel (kernels_pallas/cpu/attention.cc) through XLA FFI.

Same signature and semantics as `ragged_paged_attention_ref` (its oracle in tests): f32 q, f32 or int8 pages
(kernels_pallas/kv_quant.py: dequantized as read), head_dim a multiple of 8. Anything else (bf16) is refused here;
the dispatcher (kernels_pallas.ragged_paged_attention, backend "cpu") sends it to the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.quantized_matmul import check_isa


def cpu_kernel_supports(q, k_pages) -> bool:
    pages_ok = k_pages.dtype in (jnp.float32, jnp.int8)
    return q.dtype == jnp.float32 and pages_ok and q.shape[-1] % 8 == 0


def ragged_paged_attention_cpu(
    q: jax.Array,  # f32[T, num_q_heads, head_dim]
    k_pages: jax.Array,  # f32[num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # f32[num_pages, page_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[S]
    block_tables: jax.Array,  # i32[S, max_pages_per_seq]
    query_start_loc: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    isa: str = "auto",  # "auto": AVX-512 where the CPU has it (head_dim 16..128); "avx2": the baseline kernel
) -> jax.Array:  # f32[T, num_q_heads, head_dim]
    if not cpu_kernel_supports(q, k_pages):
        raise ValueError(
            f"ragged_paged_attention_cpu takes f32 q with f32 or int8 pages and head_dim a multiple of "
            f"8; got q {q.dtype} {q.shape}, pages {k_pages.dtype} (kernels_pallas.ragged_paged_attention "
            f"runs the reference for those)"
        )
    from kernels_pallas.cpu import ensure_registered

    isa_attr = check_isa(isa)
    ensure_registered()
    call = jax.ffi.ffi_call("jaxserve_ragged_paged_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        query_start_loc,
        jnp.reshape(num_seqs, (1,)),
        sm_scale=np.float32(sm_scale),
        sliding_window=np.int64(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0),
        isa=np.int64(isa_attr),
    )
