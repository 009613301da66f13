"""Trace-time input checks shared by every ragged paged attention implementation (values are the caller's
contract: checking them would need a device-to-host sync)."""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.kv_quant import head_dim_of


def check_attention_inputs(
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    query_start_loc,
    num_seqs,
    *,
    sliding_window=None,
    soft_cap=None,
    kernel_dtypes: tuple | None = None,
) -> tuple[int, int, int]:
    """Raise ValueError naming what is wrong; returns (T, num_q_heads, head_dim).

    kernel_dtypes: for a kernel, q, k_pages and v_pages must share one dtype from this tuple (the reference
    accepts any float mix and computes in f32).
    """
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"q must be [T, H, D] and k_pages [N, P, K, D]; got {q.shape} and {k_pages.shape}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    kv_head_dim = head_dim_of(k_pages)  # int8 pages carry 4 scale bytes per row
    if num_tokens == 0:
        raise ValueError("q has no rows: T must be at least 1")
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the pages ({kv_head_dim}) differ")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if kernel_dtypes is not None and (
        not q.dtype == k_pages.dtype == v_pages.dtype or jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in kernel_dtypes]
    ):
        names = ", ".join(jnp.dtype(d).name for d in kernel_dtypes)
        raise ValueError(
            f"q, k_pages and v_pages must share one dtype ({names}); got {q.dtype}, {k_pages.dtype} and {v_pages.dtype}"
        )
    s = kv_lens.shape[0] if kv_lens.ndim == 1 else -1
    if s < 1 or block_tables.ndim != 2 or block_tables.shape[0] != s or query_start_loc.shape != (s + 1,):
        raise ValueError(
            f"kv_lens must be [S] with S >= 1, block_tables [S, M] and query_start_loc [S + 1]; got "
            f"{kv_lens.shape}, {block_tables.shape} and {query_start_loc.shape}"
        )
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables has no columns: max_pages_per_seq must be at least 1")
    if num_seqs.size != 1:
        raise ValueError(f"num_seqs must hold one value (i32[1] or i32[]); got shape {num_seqs.shape}")
    named = {"kv_lens": kv_lens, "block_tables": block_tables, "query_start_loc": query_start_loc, "num_seqs": num_seqs}
    for name, a in named.items():
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32; got {a.dtype}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (or None)")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap={soft_cap} must be > 0 (or None)")
    return num_tokens, num_q_heads, head_dim
