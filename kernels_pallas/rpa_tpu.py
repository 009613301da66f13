"""Ragged paged attention as a Pallas TPU kernel, with the semantics of `ragged_paged_attention_ref`.

The wrapper regroups q by KV head, so one grid step owns one KV head and one block of Tq query tokens as a
plain 2-D tile of R = Tq * G rows (G = q heads per KV head), and nothing is reshaped inside the kernel:

    q [T, H, D] -> [K, T_pad * G, D]    row r of query block b: token b * Tq + r // G, q head k * G + r % G
    grid = (K, T_pad / Tq)              both "parallel": each step sets up and finishes its own state

A step visits, in order, the sequences whose query rows meet its block, and for each one the KV blocks
(`num_kv_pages_per_block` pages) those rows need: from the page holding the first key inside the sliding
window of the sequence's first row in the block, to the page holding its last row in the block (keys past
that are causally masked for every row of the block). The (sequence, KV block) pairs form one stream, copied
HBM -> VMEM page by page into two slots, so that the copy of the next pair overlaps the compute of this one:

    HBM    k_pages[block_tables[seq, page], :, kv_head, :]         only pages < cdiv(kv_len, page_size)
              | page i of the block -> rows i*P:(i+1)*P of the slot (async copy, DMA semaphore per slot)
    VMEM   k_buf[slot] [pages_per_block * P, D]                    slot alternates 0, 1 along the stream
              | s = q @ k.T, masked to this sequence's rows, causal, window; online softmax
    VMEM   m, l f32[R, 128] (lanes equal), acc f32[R, D]  ->  out = acc / l, and 0 where l == 0

Rows past query_start_loc[num_seqs] belong to no visited sequence: l stays 0 and they come out 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.checks import check_attention_inputs

# A finite "minus infinity" for the running max: rows no key has reached keep m = _NEG and l = 0, and
# exp(_NEG - _NEG) = 1 is harmless where exp(-inf - -inf) would be NaN.
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
_LANES = 128
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_DEFAULT_QUERIES_PER_BLOCK = 32
_DEFAULT_KEYS_PER_BLOCK = 128


def ragged_paged_attention_tpu(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[S]
    block_tables: jax.Array,  # i32[S, max_pages_per_seq]
    query_start_loc: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
) -> jax.Array:  # [T, num_q_heads, head_dim], q.dtype
    """Attention of each query row over its own sequence's cached K/V; rows past the valid ones give 0.

    `interpret=True` runs the kernel in Pallas' TPU interpreter on CPU, which emulates the async copies and
    DMA semaphores. Block sizes default to up to 32 query tokens and up to 128 cached tokens (whole pages).
    """
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
        kernel_dtypes=_DTYPES,
    )
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    tq, pages_per_block = _block_sizes(q, group, page_size, max_pages, num_queries_per_block, num_kv_pages_per_block)
    num_q_blocks = pl.cdiv(num_tokens, tq)
    t_pad = num_q_blocks * tq

    # [K, T_pad * G, D]: q head k * G + g of token t is row t * G + g of KV head k.
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qg = jnp.pad(qg, ((0, 0), (0, t_pad - num_tokens), (0, 0), (0, 0)))
    qg = qg.reshape(num_kv_heads, t_pad * group, head_dim)

    # The sequences whose rows meet query block b are [seq_lo[b], seq_hi[b]) (the kernel clips to num_seqs).
    block_start = jnp.arange(num_q_blocks, dtype=jnp.int32)[:, None] * tq
    seq_lo = jnp.sum(query_start_loc[None, 1:] <= block_start, axis=1, dtype=jnp.int32)  # i32[num_q_blocks]
    seq_hi = jnp.sum(query_start_loc[None, :-1] < block_start + tq, axis=1, dtype=jnp.int32)  # i32[num_q_blocks]

    rows = tq * group
    kv_rows = pages_per_block * page_size
    q_spec = pl.BlockSpec((pl.Squeezed(), rows, head_dim), lambda h, b, *_: (h, b, 0))
    kernel = functools.partial(
        _rpa_kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        group=group,
        page_size=page_size,
        pages_per_block=pages_per_block,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(num_kv_heads, num_q_blocks),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, kv_rows, head_dim), k_pages.dtype),  # k_buf
                pltpu.VMEM((2, kv_rows, head_dim), v_pages.dtype),  # v_buf
                pltpu.SemaphoreType.DMA((2,)),  # one per slot, shared by the slot's K and V page copies
                pltpu.VMEM((rows, _LANES), jnp.float32),  # m: running max
                pltpu.VMEM((rows, _LANES), jnp.float32),  # l: running softmax denominator
                pltpu.VMEM((rows, head_dim), jnp.float32),  # acc: running numerator
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="ragged_paged_attention_tpu",
    )(kv_lens, block_tables, query_start_loc, jnp.reshape(num_seqs, (1,)), seq_lo, seq_hi, qg, k_pages, v_pages)
    out = out.reshape(num_kv_heads, t_pad, group, head_dim)[:, :num_tokens]
    return out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)


def _block_sizes(q, group, page_size, max_pages, num_queries_per_block, num_kv_pages_per_block) -> tuple[int, int]:
    """(query tokens per block, pages per KV block), defaulted or checked against Mosaic's tiling."""
    # The q/out tile [Tq * G, D] must fill whole sublane tiles: 8 rows of 32-bit values, 16 of bf16.
    sublanes = 8 * (4 // jnp.dtype(q.dtype).itemsize)
    if num_queries_per_block is None:
        tq = min(_DEFAULT_QUERIES_PER_BLOCK, pl.cdiv(q.shape[0], 16) * 16)  # multiple of 16: fits any G
    else:
        tq = num_queries_per_block
        if tq <= 0 or (tq * group) % sublanes:
            raise ValueError(
                f"num_queries_per_block={tq} times the q heads per KV head ({group}) must be a positive multiple "
                f"of {sublanes} for {jnp.dtype(q.dtype).name}"
            )
    if num_kv_pages_per_block is None:
        pages_per_block = max(1, min(max_pages, _DEFAULT_KEYS_PER_BLOCK // page_size))
    else:
        pages_per_block = num_kv_pages_per_block
        if not 0 < pages_per_block <= max_pages:
            raise ValueError(f"num_kv_pages_per_block={pages_per_block} must be in [1, {max_pages}]")
    return tq, pages_per_block


class _Span(NamedTuple):
    """What one sequence contributes to one query block (scalars)."""

    q_start: jax.Array  # its rows are tokens q_start:q_end; token t sits at position kv_len - (q_end - t)
    q_end: jax.Array
    kv_len: jax.Array
    first_page: jax.Array  # pages first_page:end_page of its block table hold every key the block's rows see
    end_page: jax.Array
    num_blocks: jax.Array  # KV blocks of pages_per_block pages covering them; 0 if no rows in the block


def _rpa_kernel(
    # Scalar prefetch (SMEM)
    kv_lens_ref,  # i32[S]
    block_tables_ref,  # i32[S, max_pages_per_seq]
    query_start_loc_ref,  # i32[S + 1]
    num_seqs_ref,  # i32[1]
    seq_lo_ref,  # i32[num_q_blocks]: first sequence with rows in the query block
    seq_hi_ref,  # i32[num_q_blocks]: one past the last (not yet clipped to num_seqs)
    # Inputs
    q_ref,  # [R, D] (VMEM): the rows of this KV head and query block, R = Tq * G
    k_hbm,  # [num_pages, page_size, K, D] (HBM)
    v_hbm,  # [num_pages, page_size, K, D] (HBM)
    # Outputs
    o_ref,  # [R, D] (VMEM)
    # Scratch
    k_buf,  # [2, pages_per_block * page_size, D] (VMEM)
    v_buf,  # [2, pages_per_block * page_size, D] (VMEM)
    sems,  # DMA semaphores [2]
    m_ref,  # f32[R, 128]
    l_ref,  # f32[R, 128]
    acc_ref,  # f32[R, D]
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    page_size: int,
    pages_per_block: int,
):
    head, q_blk = pl.program_id(0), pl.program_id(1)
    tq = q_ref.shape[0] // group
    max_pages = block_tables_ref.shape[1]
    t0 = q_blk * tq  # the block's first token
    seq_lo = seq_lo_ref[q_blk]
    seq_hi = jnp.minimum(seq_hi_ref[q_blk], num_seqs_ref[0])

    def span(seq) -> _Span:
        q_start, q_end, kv_len = query_start_loc_ref[seq], query_start_loc_ref[seq + 1], kv_lens_ref[seq]
        row_lo, row_hi = jnp.maximum(q_start, t0), jnp.minimum(q_end, t0 + tq)
        first_key = 0
        if sliding_window is not None:  # the first key the window of the first row in the block sees
            first_key = jnp.maximum(kv_len - (q_end - row_lo) - sliding_window + 1, 0)
        end_key = kv_len - (q_end - row_hi)  # one past the last row's position (<= kv_len)
        first_page = lax.div(first_key, page_size)  # first_key >= 0: truncation is floor
        end_page = jnp.minimum(pl.cdiv(jnp.maximum(end_key, 0), page_size), max_pages)
        num_blocks = pl.cdiv(jnp.maximum(end_page - first_page, 0), pages_per_block)
        return _Span(q_start, q_end, kv_len, first_page, end_page, jnp.where(row_hi > row_lo, num_blocks, 0))

    def skip_empty(seq):
        """The first sequence >= seq that reads at least one page, or seq_hi."""

        def empty(s):  # the cond keeps span from reading past the valid sequences
            return lax.cond(s < seq_hi, lambda: span(s).num_blocks, lambda: jnp.int32(1)) == 0

        return lax.while_loop(empty, lambda s: s + 1, seq)

    def page_copies(seq, kv_blk, slot):
        """[(needed, K copy, V copy)] for the pages of one KV block; pages past end_page are not copied."""
        sp = span(seq)
        copies = []
        for i in range(pages_per_block):
            page = sp.first_page + kv_blk * pages_per_block + i
            physical = block_tables_ref[seq, jnp.minimum(page, max_pages - 1)]
            dst = pl.ds(i * page_size, page_size)
            k_copy = pltpu.make_async_copy(k_hbm.at[physical, :, head, :], k_buf.at[slot, dst, :], sems.at[slot])
            v_copy = pltpu.make_async_copy(v_hbm.at[physical, :, head, :], v_buf.at[slot, dst, :], sems.at[slot])
            copies.append((page < sp.end_page, k_copy, v_copy))
        return copies

    def start(seq, kv_blk, slot):
        for needed, k_copy, v_copy in page_copies(seq, kv_blk, slot):

            @pl.when(needed)
            def _():
                k_copy.start()
                v_copy.start()

    def wait(seq, kv_blk, slot):
        for needed, k_copy, v_copy in page_copies(seq, kv_blk, slot):

            @pl.when(needed)
            def _():
                k_copy.wait()
                v_copy.wait()

    def attend(seq, kv_blk, slot):
        """One online-softmax step of the block's rows of `seq` over the KV block in `slot`."""
        sp = span(seq)
        first_key = (sp.first_page + kv_blk * pages_per_block) * page_size
        k, v = k_buf[slot], v_buf[slot]  # [kv_rows, D]
        # Keys past kv_len (the tail of the last page) or past end_page (slots not copied this time: stale or
        # uninitialised) get probability 0, but 0 * NaN is NaN in p @ v: zero V there.
        key = first_key + lax.broadcasted_iota(jnp.int32, v.shape, 0)
        v = jnp.where(key < jnp.minimum(sp.end_page * page_size, sp.kv_len), v, jnp.zeros_like(v))

        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * sm_scale  # [R, kv_rows]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        # Row r is token t0 + r // G at position qbase + r // G; column c is the key at first_key + c. With
        # x = key - qbase, "x <= r // G" is "x * G <= r" and "x + W > r // G" is "r < (x + W) * G": no vector
        # integer division.
        r = lax.broadcasted_iota(jnp.int32, s.shape, 0)
        qbase = sp.kv_len - sp.q_end + t0
        x_g = (first_key - qbase + lax.broadcasted_iota(jnp.int32, s.shape, 1)) * group
        mask = (r >= (sp.q_start - t0) * group) & (r < (sp.q_end - t0) * group) & (x_g <= r)
        if sliding_window is not None:
            mask &= r < x_g + sliding_window * group

        m_prev = m_ref[...]  # [R, 128], all lanes equal
        m_next = jnp.maximum(m_prev, jnp.max(jnp.where(mask, s, _NEG), axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)  # rows of other sequences: all 0
        alpha = jnp.exp(m_prev - m_next)
        m_ref[...] = m_next
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    first_seq = skip_empty(seq_lo)

    @pl.when(first_seq < seq_hi)
    def _():
        start(first_seq, 0, 0)

    def step(state):
        seq, kv_blk, slot = state
        # Prefetch the stream's next (sequence, KV block) into the other slot, then compute this one.
        next_seq, next_blk = lax.cond(
            kv_blk + 1 < span(seq).num_blocks,
            lambda: (seq, kv_blk + 1),
            lambda: (skip_empty(seq + 1), jnp.int32(0)),
        )

        @pl.when(next_seq < seq_hi)
        def _():
            start(next_seq, next_blk, 1 - slot)

        wait(seq, kv_blk, slot)
        attend(seq, kv_blk, slot)
        return next_seq, next_blk, 1 - slot

    lax.while_loop(lambda state: state[0] < seq_hi, step, (first_seq, jnp.int32(0), jnp.int32(0)))

    l = l_ref[...][:, :1]
    o_ref[...] = (acc_ref[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)
