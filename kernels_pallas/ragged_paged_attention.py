"""Ragged paged attention over a paged KV cache (the KV write is in `kv_write.py`).

A ragged batch flattens the query tokens of S sequences into one axis:

    q rows:        | seq 0 (prompt chunk) | seq 1 (1 decode token) | seq 2 (chunk) | padding ... |
    query_start_loc  0                      5                        6               9            T

Sequence i owns q rows query_start_loc[i]:query_start_loc[i+1]; they are the *last* tokens of its kv_lens[i]
cached tokens (the new ones were written to the cache before attention), so the row at offset j of a chunk of
length n sits at absolute position kv_lens[i] - n + j and attends causally to cache positions <= that.
Cache position p of sequence i lives in page block_tables[i, p // page_size] at offset p % page_size.

Pages are float, or int8 rows with their f32 scale in the last 4 bytes (kv_cache_dtype="int8",
kernels_pallas/kv_quant.py), dequantized as they are read.

This file holds the pure-jnp reference (the test oracle, and the path wherever no kernel applies). The Pallas TPU
and GPU kernels (rpa_tpu.py, rpa_gpu.py; float pages only) and the C++ CPU kernel (cpu_attention.py; f32 queries,
f32 or int8 pages: the default on CPU) sit behind the same `ragged_paged_attention` entry point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.backend import resolve_backend
from kernels_pallas.checks import check_attention_inputs
from kernels_pallas.kv_quant import is_int8_pages, read_rows


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
    check_attention_inputs(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        query_start_loc,
        num_seqs,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    if backend in ("pallas_tpu", "pallas_gpu") and is_int8_pages(k_pages):
        raise ValueError(
            f"backend={backend!r} takes float KV pages; int8 pages (kv_cache_dtype='int8') run on CPU "
            f"(backend 'cpu' or 'reference') until the accelerator issue brings int8 Pallas kernels"
        )
    if backend == "pallas_tpu":
        from kernels_pallas.rpa_tpu import ragged_paged_attention_tpu

        return ragged_paged_attention_tpu(
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
            interpret=interpret,
        )
    if backend == "cpu":
        from kernels_pallas.cpu_attention import cpu_kernel_supports, ragged_paged_attention_cpu

        if cpu_kernel_supports(q, k_pages):  # what it does not take (bf16) runs the reference below
            return ragged_paged_attention_cpu(
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
    if backend == "pallas_gpu":
        from kernels_pallas.rpa_gpu import ragged_paged_attention_gpu

        return ragged_paged_attention_gpu(
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
            interpret=interpret,
        )
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
    q,
    k_pages,
    v_pages,
    kv_lens,
    block_tables,
    query_start_loc,
    num_seqs,
    *,
    sm_scale,
    sliding_window=None,
    soft_cap=None,
    kv_block_tokens: int = 64,
    row_block: int = 32,
    sub_block: int = 8,
):
    """Pure-jnp reference in two parts, merged by online softmax (the CPU path and the test oracle):

      in-step:  each row over this step's tokens of its own sequence (causal): one dense masked product over
                the T rows, so a prompt chunk costs matmuls, not a page walk per row;
      history:  each row over its sequence's tokens cached before this step (positions < kv_len - q_len),
                walking pages in blocks of `kv_block_tokens` for `row_block` rows at a time; each row block walks
                only as far as its own longest history, so blocks of fresh prompts do no work at all.

        row block 0 (decodes)        : history ####################  + in-step #
        row block 1 (fresh prompt)   : history (none)                  + in-step ########
        row block 2 (later chunk)    : history ##########              + in-step ########

    Slots a row may not see (past its position, outside the sliding window, padding) are zeroed before use, so
    garbage or NaN there cannot leak through 0 * NaN. Work is T x T for the in-step part (CPU budgets are small;
    the Pallas kernels serve big steps) plus rows x history for the walk.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots, max_pages = block_tables.shape
    group = num_q_heads // num_kv_heads
    num_seqs = jnp.reshape(num_seqs, ())

    # Which sequence each query row belongs to, its absolute position, and how much it has cached from before.
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(query_start_loc[1:], rows, side="right").astype(jnp.int32), num_slots - 1)
    valid = rows < query_start_loc[num_seqs]
    kv_len = jnp.where(valid, kv_lens[seq], 0)  # [T]
    qpos = kv_len - (query_start_loc[seq + 1] - rows)  # [T]
    hist = jnp.where(valid, kv_len - (query_start_loc[seq + 1] - query_start_loc[seq]), 0)  # [T]
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale

    def scores(s, ok):  # raw scores [..., B] -> soft-capped, -inf where `ok` (broadcastable) is False
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        return jnp.where(ok, s, -jnp.inf)

    # ---- in-step: the rows' own K/V, read back from the pages they were just written to ----------------------
    page = block_tables[seq, jnp.clip(qpos, 0) // page_size]
    okr = valid[:, None, None]
    k_new = jnp.where(okr, read_rows(k_pages, page, jnp.clip(qpos, 0) % page_size), 0)  # [T, K, D]
    v_new = jnp.where(okr, read_rows(v_pages, page, jnp.clip(qpos, 0) % page_size), 0)
    # Row t sees rows [first row of its sequence, t]. `first` comes from a cumulative max, which XLA materializes:
    # a mask built from `seq` (a searchsorted result) got fused into every element of the [K, G, T, T] passes
    # below and recomputed there, 5x slower at T = 512.
    starts = query_start_loc[:-1]
    first = jax.lax.cummax(jnp.zeros(num_tokens, jnp.int32).at[starts].max(starts, mode="drop"))  # [T]
    ok = (rows[None, :] >= first[:, None]) & (rows[None, :] <= rows[:, None]) & valid[:, None]
    if sliding_window is not None:
        ok &= rows[None, :] > rows[:, None] - sliding_window  # same sequence: positions differ as rows do
    qh = qg.transpose(1, 2, 0, 3)  # [K, G, T, D]
    # Head-major [K, G, T, T]: XLA:CPU runs this layout ~4x faster than [T, K, G, T] (no strided transposes).
    s = scores(jnp.einsum("kgtd,ukd->kgtu", qh, k_new), ok[None, None])
    m_in = s.max(-1)  # [K, G, T]; finite for every valid row: it sees at least itself
    m_in_safe = jnp.where(jnp.isfinite(m_in), m_in, 0.0)
    p = jnp.exp(s - m_in_safe[..., None])  # masked scores are -inf: exp gives exactly 0
    l_in = p.sum(-1).transpose(2, 0, 1)  # [T, K, G]
    acc_in = jnp.einsum("kgtu,ukd->kgtd", p, v_new).transpose(2, 0, 1, 3)  # [T, K, G, D]
    m_in = m_in.transpose(2, 0, 1)

    # ---- history: a page walk per block of rows -----------------------------------------------------------
    pages_per_step = max(1, kv_block_tokens // page_size)
    block = pages_per_step * page_size
    rb = min(row_block, num_tokens)
    sub = min(sub_block, rb) if rb % min(sub_block, rb) == 0 else rb
    pad_rows = -num_tokens % rb
    tables = jnp.pad(block_tables, ((0, 0), (0, -max_pages % pages_per_step)))  # [S, M']
    seq_p, qpos_p, hist_p = (jnp.pad(x, (0, pad_rows)) for x in (seq, qpos, hist))
    qg_p = jnp.pad(qg, ((0, pad_rows), (0, 0), (0, 0), (0, 0)))
    shape = (num_tokens + pad_rows, num_kv_heads, group)
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, head_dim)))

    def online(m, l, acc, raw, ok, weigh):
        """One kv block of an online softmax: raw scores [..., B] under `ok`; `weigh(p)` is p @ V."""
        sb = scores(raw, ok)
        m_new = jnp.maximum(m, sb.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen nothing yet
        pb = jnp.exp(sb - m_safe[..., None])  # masked scores are -inf: exactly 0
        corr = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
        return m_new, l * corr + pb.sum(-1), acc * corr[..., None] + weigh(pb)

    def kv_mask(j, b_qpos, b_hist):
        kpos = j * block + jnp.arange(block, dtype=jnp.int32)  # [B]
        okb = kpos[None, :] < b_hist[:, None]  # [n, B]
        if sliding_window is not None:
            okb &= kpos[None, :] > b_qpos[:, None] - sliding_window
        return kpos, okb

    def walk_rows(b_seq, b_qpos, b_hist, b_q):
        """Rows of different sequences (decodes): each reads its own pages. -> m, l [n, K, G], acc [n, K, G, D]"""
        n = b_q.shape[0]
        b_tables = tables[b_seq]

        def kv_step(j, c):
            _, okb = kv_mask(j, b_qpos, b_hist)
            pg = jax.lax.dynamic_slice_in_dim(b_tables, j * pages_per_step, pages_per_step, axis=1)  # [n, bp]
            # Unseen slots' scores are replaced by -inf, so K needs no zeroing; V does (0 * NaN would leak).
            k = read_rows(k_pages, pg).reshape(n, block, num_kv_heads, head_dim)
            v = jnp.where(okb[:, :, None, None], read_rows(v_pages, pg).reshape(n, block, num_kv_heads, head_dim), 0)
            raw = jnp.einsum("tkgd,tbkd->tkgb", b_q, k)
            return online(*c, raw, okb[:, None, None, :], lambda p: jnp.einsum("tkgb,tbkd->tkgd", p, v))

        init = (
            jnp.full((n, num_kv_heads, group), -jnp.inf),
            jnp.zeros((n, num_kv_heads, group)),
            jnp.zeros((n, num_kv_heads, group, head_dim)),
        )
        return jax.lax.fori_loop(0, (jnp.max(b_hist) + block - 1) // block, kv_step, init)

    def walk_one_sequence(s0, b_qpos, b_hist, b_q):
        """Rows whose history is all sequence s0's (a prompt chunk after its first): its pages are read once per
        kv step and multiplied densely, head-major ([K, G, n, B] runs far faster on XLA:CPU than [n, K, G, B])."""
        n = b_q.shape[0]
        qh = b_q.transpose(1, 2, 0, 3)  # [K, G, n, D]

        def kv_step(j, c):
            kpos, okb = kv_mask(j, b_qpos, b_hist)
            pg = jax.lax.dynamic_slice_in_dim(tables[s0], j * pages_per_step, pages_per_step)  # [bp]
            k = read_rows(k_pages, pg).reshape(block, num_kv_heads, head_dim)
            okv = (kpos < jnp.max(b_hist))[:, None, None]
            v = jnp.where(okv, read_rows(v_pages, pg).reshape(block, num_kv_heads, head_dim), 0)
            raw = jnp.einsum("kgtd,bkd->kgtb", qh, k)
            return online(*c, raw, okb[None, None], lambda p: jnp.einsum("kgtb,bkd->kgtd", p, v))

        init = (
            jnp.full((num_kv_heads, group, n), -jnp.inf),
            jnp.zeros((num_kv_heads, group, n)),
            jnp.zeros((num_kv_heads, group, n, head_dim)),
        )
        m, l, acc = jax.lax.fori_loop(0, (jnp.max(b_hist) + block - 1) // block, kv_step, init)
        return m.transpose(2, 0, 1), l.transpose(2, 0, 1), acc.transpose(2, 0, 1, 3)

    def row_step(r, carry):
        m_all, l_all, acc_all = carry
        sl = lambda x, i, n: jax.lax.dynamic_slice_in_dim(x, i, n)  # noqa: E731
        base = r * rb
        b_seq, b_hist = sl(seq_p, base, rb), sl(hist_p, base, rb)
        s0 = b_seq[jnp.argmax(b_hist)]

        def one_sequence():  # a prompt chunk after its first: all rb rows share the pages
            return walk_one_sequence(s0, sl(qpos_p, base, rb), b_hist, sl(qg_p, base, rb))

        def per_row():  # decodes of many sequences: sub-blocks, each walking only as far as its own rows need
            def sub_step(i, c):
                at = base + i * sub
                part = walk_rows(sl(seq_p, at, sub), sl(qpos_p, at, sub), sl(hist_p, at, sub), sl(qg_p, at, sub))
                return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, i * sub, 0) for x, y in zip(c, part))

            z = (
                jnp.full((rb, num_kv_heads, group), -jnp.inf),
                jnp.zeros((rb, num_kv_heads, group)),
                jnp.zeros((rb, num_kv_heads, group, head_dim)),
            )
            return jax.lax.fori_loop(0, rb // sub, sub_step, z)

        shared = jnp.all((b_hist == 0) | (b_seq == s0))
        m, l, acc = jax.lax.cond(shared, one_sequence, per_row)
        put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, base, 0)  # noqa: E731
        return put(m_all, m), put(l_all, l), put(acc_all, acc)

    m_h, l_h, acc_h = jax.lax.fori_loop(0, (num_tokens + pad_rows) // rb, row_step, init)
    m_h, l_h, acc_h = m_h[:num_tokens], l_h[:num_tokens], acc_h[:num_tokens]

    # ---- merge the two softmax partials -------------------------------------------------------------------
    m = jnp.maximum(m_in, m_h)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    c_in = jnp.where(jnp.isfinite(m_in), jnp.exp(m_in - m_safe), 0.0)
    c_h = jnp.where(jnp.isfinite(m_h), jnp.exp(m_h - m_safe), 0.0)
    l = l_in * c_in + l_h * c_h
    acc = acc_in * c_in[..., None] + acc_h * c_h[..., None]
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
