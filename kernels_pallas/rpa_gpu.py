"""Ragged paged attention as a Pallas GPU (Triton) kernel; same semantics as `ragged_paged_attention_ref`.

Work split. The query rows of each sequence are cut into blocks of `block_q` rows; one program handles one
block for one KV head, i.e. the block's rows times the `group` q heads that share that KV head, as the rows
of one MMA tile (GQA packing: K/V are read once for the whole group):

    q rows (flattened):  | seq 0: 37 rows           | seq 1: 1 | seq 2: 8 | padding |
    blocks (block_q=16): | b0    | b1    | b2 (5)   | b3 (1)   | b4 (8)   |  idle programs b5..  -> no-op
    tile rows of b0:     [row 0 head 0, row 0 head 1, row 0 head 2, (pad head), row 1 head 0, ...]

The grid is (program block, kv head) with a static number of blocks, T // block_q + min(S, T), which bounds
sum_i cdiv(q_len_i, block_q); the wrapper maps each block to (sequence, block within the sequence) with a
cumsum + searchsorted over S entries, and blocks past the real ones exit at once.

Each program runs flash-decoding style online softmax (fp32 m / l / acc) over blocks of
`pages_per_block * page_size` keys, from the first page its rows can see (sliding window) up to its last
row's position (causal), with a `fori_loop` of dynamic trip count. K/V rows are gathered key by key through
the block table straight from the [num_pages, page_size, num_kv_heads, head_dim] cache: no transposed copy.
Loads past kv_len are masked (other=0) and scores outside causal / window / kv_len are set to -inf, so
nothing outside a sequence's pages is ever read and garbage cannot leak. Output rows that no program owns
(padding past query_start_loc[num_seqs]) stay at the zeros the output buffer starts from (one memset of
T * num_q_heads * head_dim per call, small next to the K/V reads).

Triton wants power-of-two tiles of at least 16 for tl.dot: the group and head_dim are padded inside the
kernel with masked lanes, and the tile has max(16, block_q * group_pad) rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.checks import check_attention_inputs

# Finite start for the running max: with scores of -inf for masked keys, exp2(-inf - m) = 0 and a row that
# sees no key in a block never computes exp2(-inf - -inf) = NaN.
_M_INIT = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_TARGET_TILE_ROWS = 64  # default block_q packs about this many (row, q head) pairs per MMA tile
_TARGET_BLOCK_K = 64  # default keys per loop step


def _rpa_kernel(
    # metadata (the Triton backend has no scalar prefetch: these are plain inputs)
    prog_seq_ref,  # i32[NB]: sequence of each program block; S for idle blocks
    prog_qblock_ref,  # i32[NB]: index of the block among its sequence's query blocks
    kv_lens_ref,  # i32[S]
    block_tables_ref,  # i32[S, max_pages_per_seq]
    query_start_loc_ref,  # i32[S + 1]
    # inputs
    q_ref,  # [T, num_q_heads, head_dim]
    k_pages_ref,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages_ref,  # [num_pages, page_size, num_kv_heads, head_dim]
    o_init_ref,  # [T, num_q_heads, head_dim]: zeros, aliased to o_ref
    # outputs
    o_ref,  # [T, num_q_heads, head_dim]
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    block_q: int,
    group: int,
    group_pad: int,
    tile_rows: int,
    head_dim_pad: int,
    block_k: int,
):
    del o_init_ref  # only there to start the output at zero
    num_slots = kv_lens_ref.shape[0]
    head_dim = q_ref.shape[2]
    page_size = k_pages_ref.shape[1]
    b, kv_head = pl.program_id(0), pl.program_id(1)
    seq = prog_seq_ref[b]

    @pl.when(seq < num_slots)
    def _():
        kv_len = kv_lens_ref[seq]
        q_start = query_start_loc_ref[seq]
        q_len = query_start_loc_ref[seq + 1] - q_start
        j0 = prog_qblock_ref[b] * block_q  # first row of this block, counted within the sequence
        n_rows = jnp.minimum(block_q, q_len - j0)
        first_pos = kv_len - q_len + j0  # absolute position of the block's first row

        # Tile lane i is (row i // group_pad, q head kv_head * group + i % group_pad); pad lanes are masked.
        lane = jnp.arange(tile_rows, dtype=jnp.int32)
        qi, g = lane // group_pad, lane % group_pad
        row_ok = (qi < n_rows) & (g < group)
        tok = (q_start + j0 + qi)[:, None]  # [M, 1]
        head = (kv_head * group + g)[:, None]  # [M, 1]
        qpos = first_pos + qi  # [M]
        d = jnp.arange(head_dim_pad, dtype=jnp.int32)[None, :]  # [1, Dp]
        q_mask = row_ok[:, None] & (d < head_dim)
        q = plgpu.load(q_ref.at[tok, head, d], mask=q_mask, other=0)  # [M, Dp]

        # Keys [lo, hi) can be seen by some row of the block; start at lo's page.
        hi = first_pos + n_rows
        lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
        k_start = (lo // page_size) * page_size
        num_steps = pl.cdiv(hi - k_start, block_k)

        def step(it, carry):
            acc, m, l = carry
            kpos = k_start + it * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [Bk]
            in_seq = kpos < kv_len  # guards every read: pages past cdiv(kv_len, page_size) are never touched
            # kpos >= 0, so truncating lax.div / lax.rem equal // and % without the sign fix-up ops
            page = plgpu.load(block_tables_ref.at[seq, lax.div(kpos, page_size)], mask=in_seq, other=0)
            kv_idx = (page[:, None], lax.rem(kpos, page_size)[:, None], kv_head, d)
            kv_mask = in_seq[:, None] & (d < head_dim)
            k = plgpu.load(k_pages_ref.at[kv_idx], mask=kv_mask, other=0)  # [Bk, Dp]
            v = plgpu.load(v_pages_ref.at[kv_idx], mask=kv_mask, other=0)  # [Bk, Dp]

            s = plgpu.dot(q, k, trans_b=True)  # [M, Bk] fp32
            if soft_cap is None:
                s = s * (sm_scale * _LOG2E)  # base-2 domain: exp2 below
            else:
                s = soft_cap * jnp.tanh(s * (sm_scale / soft_cap)) * _LOG2E
            visible = in_seq[None, :] & (kpos[None, :] <= qpos[:, None])
            if sliding_window is not None:
                visible &= kpos[None, :] > qpos[:, None] - sliding_window
            s = jnp.where(visible, s, -jnp.inf)

            m_new = jnp.maximum(m, s.max(axis=-1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            l_new = alpha * l + p.sum(axis=-1)
            acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
            return acc, m_new, l_new

        acc = jnp.zeros((tile_rows, head_dim_pad), jnp.float32)
        m = jnp.full((tile_rows,), _M_INIT, jnp.float32)
        l = jnp.zeros((tile_rows,), jnp.float32)
        acc, m, l = lax.fori_loop(0, num_steps, step, (acc, m, l))
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # l == 0 only for masked lanes (or kv_len < q_len)
        plgpu.store(o_ref.at[tok, head, d], out.astype(o_ref.dtype), mask=q_mask)


def ragged_paged_attention_gpu(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[S]
    block_tables: jax.Array,  # i32[S, max_pages_per_seq]
    query_start_loc: jax.Array,  # i32[S + 1]
    num_seqs: jax.Array,  # i32[1] (or i32[])
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:  # [T, num_q_heads, head_dim], q.dtype
    """Attention of each query row over its own sequence's cached K/V; rows past the valid ones give 0.

    Run-time preconditions (not checked: they would need a device-to-host sync): query_start_loc is
    non-decreasing, kv_lens[i] >= its query rows, block-table entries of live pages are < num_pages.
    """
    num_tokens, num_q_heads, head_dim = check_attention_inputs(
        q,
        k_pages,
        v_pages,
        kv_lens,
        block_tables,
        query_start_loc,
        num_seqs,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        kernel_dtypes=(jnp.float32, jnp.bfloat16, jnp.float16),
    )
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots = kv_lens.shape[0]
    group = num_q_heads // num_kv_heads
    group_pad = pl.next_power_of_2(group)
    if block_q is None:
        block_q = max(1, _TARGET_TILE_ROWS // group_pad)
    if pages_per_block is None:
        pages_per_block = max(1, _TARGET_BLOCK_K // page_size)
    block_k = pages_per_block * page_size
    if block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q={block_q} must be a power of two")
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(
            f"pages_per_block * page_size = {pages_per_block} * {page_size} = {block_k} keys per step must be "
            "a power of two >= 16 (Triton tile)"
        )
    tile_rows = max(16, block_q * group_pad)
    head_dim_pad = max(16, pl.next_power_of_2(head_dim))

    # Program block -> (sequence, block within the sequence). Sequences past num_seqs own no rows.
    num_blocks = num_tokens // block_q + min(num_slots, num_tokens)
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    q_lens = jnp.where(slot < jnp.reshape(num_seqs, ()), q_lens, 0)
    seq_blocks = pl.cdiv(q_lens, block_q)  # [S]
    blocks_end = jnp.cumsum(seq_blocks).astype(jnp.int32)  # [S]
    prog = jnp.arange(num_blocks, dtype=jnp.int32)
    prog_seq = jnp.searchsorted(blocks_end, prog, side="right").astype(jnp.int32)  # [NB]; S when idle
    blocks_start = (blocks_end - seq_blocks)[jnp.minimum(prog_seq, num_slots - 1)]
    prog_qblock = prog - blocks_start  # [NB]

    kernel = functools.partial(
        _rpa_kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        block_q=block_q,
        group=group,
        group_pad=group_pad,
        tile_rows=tile_rows,
        head_dim_pad=head_dim_pad,
        block_k=block_k,
    )
    # Every ref is the whole array (no BlockSpecs): the kernel does its own gathers through the block table.
    operands = (
        prog_seq,
        prog_qblock,
        kv_lens.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        query_start_loc.astype(jnp.int32),
        q,
        k_pages,
        v_pages,
        jnp.zeros_like(q),
    )
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={len(operands) - 1: 0},
        compiler_params=plgpu.CompilerParams(
            num_warps=4 if num_warps is None else num_warps, num_stages=2 if num_stages is None else num_stages
        ),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(*operands)
