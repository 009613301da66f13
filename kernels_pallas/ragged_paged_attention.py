"""Ragged paged attention over a paged KV cache (the KV write is in `kv_write.py`).

A ragged batch flattens the query tokens of S sequences into one axis:

    q rows:        | seq 0 (prompt chunk) | seq 1 (1 decode token) | seq 2 (chunk) | padding ... |
    query_start_loc  0                      5                        6               9            T

Sequence i owns q rows query_start_loc[i]:query_start_loc[i+1]; they are the *last* tokens of its kv_lens[i]
cached tokens (the new ones were written to the cache before attention), so the row at offset j of a chunk of
length n sits at absolute position kv_lens[i] - n + j and attends causally to cache positions <= that.
Cache position p of sequence i lives in page block_tables[i, p // page_size] at offset p % page_size.

This file holds the pure-jnp reference (the CPU path and the test oracle). The Pallas TPU and GPU kernels come
with the paged-KV issue behind the same `ragged_paged_attention` entry point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.backend import resolve_backend


def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[S]
    block_tables: jax.Array,  # i32[S, max_pages_per_seq]
    query_start_loc: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[] or i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:  # [T, num_q_heads, head_dim]
    """Attention of each query row over its own sequence's cached K/V; rows past the valid ones give 0."""
    _check_shapes(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc)
    backend = resolve_backend(backend)
    num_seqs = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
    if backend == "pallas_tpu":
        from kernels_pallas.rpa_tpu import ragged_paged_attention_tpu

        return ragged_paged_attention_tpu(
            q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
        )  # fmt: skip
    if backend == "pallas_gpu":
        from kernels_pallas.rpa_gpu import ragged_paged_attention_gpu

        return ragged_paged_attention_gpu(
            q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
        )  # fmt: skip
    return ragged_paged_attention_ref(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        query_start_loc,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )


def _check_shapes(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc) -> None:
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"q must be [T, H, D] and k_pages [N, P, K, D]; got {q.shape} and {k_pages.shape}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_pages.shape[2]
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the pages ({k_pages.shape[3]}) differ")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    s = kv_lens.shape[0]
    if block_tables.ndim != 2 or block_tables.shape[0] != s or query_start_loc.shape != (s + 1,):
        raise ValueError(
            f"with kv_lens [{s}], block_tables must be [{s}, M] and query_start_loc [{s + 1}]; "
            f"got {block_tables.shape} and {query_start_loc.shape}"
        )


def ragged_paged_attention_ref(
    q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs, *, sm_scale, sliding_window=None,
    soft_cap=None,
):
    """Pure-jnp reference: gather each sequence's pages, masked softmax of every row against every sequence.

    Cost is O(T * S * max_pages * page_size): fine for the reference and for one sequence at a time; the
    kernels visit only the pages each sequence owns.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots, max_pages = block_tables.shape
    group = num_q_heads // num_kv_heads
    kv_capacity = max_pages * page_size
    num_seqs = jnp.reshape(num_seqs, ())

    # [S, L, K, D]: each sequence's cache in position order. Slots past kv_len are zeroed so that garbage
    # (or NaN padding in tests) in unused page tails cannot leak through 0 * NaN.
    kpos = jnp.arange(kv_capacity, dtype=jnp.int32)
    in_seq = kpos[None, :] < kv_lens[:, None]  # [S, L]
    k = k_pages[block_tables].reshape(num_slots, kv_capacity, num_kv_heads, head_dim)
    v = v_pages[block_tables].reshape(num_slots, kv_capacity, num_kv_heads, head_dim)
    k = jnp.where(in_seq[:, :, None, None], k.astype(jnp.float32), 0.0)
    v = jnp.where(in_seq[:, :, None, None], v.astype(jnp.float32), 0.0)

    # Which sequence each query row belongs to, and its absolute position.
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start_loc[1:], rows, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, num_slots - 1)
    qpos = kv_lens[seq] - (query_start_loc[seq + 1] - rows)  # [T]
    valid_row = rows < query_start_loc[num_seqs]

    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("tkgd,slkd->tkgsl", qg, k) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    own_seq = seq[:, None] == jnp.arange(num_slots, dtype=jnp.int32)[None, :]  # [T, S]
    causal = kpos[None, :] <= qpos[:, None]  # [T, L]
    if sliding_window is not None:
        causal &= kpos[None, :] > qpos[:, None] - sliding_window
    mask = own_seq[:, :, None] & causal[:, None, :] & valid_row[:, None, None]  # [T, S, L]
    mask = mask[:, None, None, :, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=(-2, -1), keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=(-2, -1))  # [T, K, G]
    out = jnp.einsum("tkgsl,slkd->tkgd", probs, v) / jnp.maximum(denom, 1e-30)[..., None]
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
