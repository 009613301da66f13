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
from kernels_pallas.checks import check_attention_inputs


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
    backend = resolve_backend(backend)
    num_seqs = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
    check_attention_inputs(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs,
                           sliding_window=sliding_window, soft_cap=soft_cap)  # fmt: skip
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


def ragged_paged_attention_ref(
    q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs, *, sm_scale, sliding_window=None,
    soft_cap=None, kv_block_tokens: int = 64,
):
    """Pure-jnp reference: every query row walks its own sequence's pages with an online softmax.

    Each loop step gathers the next `kv_block_tokens` worth of pages for every row ([T, block, K, D]), so work
    and memory follow T x (pages actually in use), not T x S x pages, and the loop stops at the longest valid
    sequence rather than at the block table's width. Slots a row may not see (past its position, outside the
    sliding window, padding) are zeroed before use, so garbage or NaN there cannot leak through 0 * NaN.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots, max_pages = block_tables.shape
    group = num_q_heads // num_kv_heads
    pages_per_step = max(1, kv_block_tokens // page_size)
    block = pages_per_step * page_size
    num_seqs = jnp.reshape(num_seqs, ())

    # Which sequence each query row belongs to, and its absolute position.
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start_loc[1:], rows, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, num_slots - 1)
    valid = rows < query_start_loc[num_seqs]
    kv_len = jnp.where(valid, kv_lens[seq], 0)  # [T]
    qpos = kv_len - (query_start_loc[seq + 1] - rows)  # [T]
    tables = jnp.pad(block_tables[seq], ((0, 0), (0, -max_pages % pages_per_step)))  # [T, M'] page ids per row
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale

    def step(j, carry):
        m, l, acc = carry  # [T, K, G], [T, K, G], [T, K, G, D]
        pages = jax.lax.dynamic_slice_in_dim(tables, j * pages_per_step, pages_per_step, axis=1)  # [T, bp]
        kpos = j * block + jnp.arange(block, dtype=jnp.int32)  # [B]
        ok = (kpos[None, :] <= qpos[:, None]) & valid[:, None]  # [T, B]
        if sliding_window is not None:
            ok &= kpos[None, :] > qpos[:, None] - sliding_window
        okk = ok[:, :, None, None]
        k = jnp.where(okk, k_pages[pages].reshape(num_tokens, block, num_kv_heads, head_dim).astype(jnp.float32), 0)
        v = jnp.where(okk, v_pages[pages].reshape(num_tokens, block, num_kv_heads, head_dim).astype(jnp.float32), 0)
        s = jnp.einsum("tkgd,tbkd->tkgb", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(ok[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen nothing yet
        p = jnp.where(ok[:, None, None, :], jnp.exp(s - m_safe[..., None]), 0.0)
        correction = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        l = l * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("tkgb,tbkd->tkgd", p, v)
        return m_new, l, acc

    shape = (num_tokens, num_kv_heads, group)
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, head_dim)))
    num_steps = (jnp.max(kv_len) + block - 1) // block
    _, l, acc = jax.lax.fori_loop(0, num_steps, step, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
