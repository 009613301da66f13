"""Pallas KV write: scatter each new token's K/V row into its cache slot, in place (the cache is aliased).

    slot_mapping[t] = page * page_size + offset   ->   k_pages[page, offset] = k[t]    (slot < 0: padding, skipped)

TPU: slot ids are scalar-prefetched to SMEM; each token's [num_kv_heads, head_dim] row is DMA'd from VMEM
straight into its page in HBM (the pages never leave HBM). GPU (Triton): one program per token stores the row
through a masked pointer (Triton blocks are powers of two, so the row is padded and masked). The reference is
`write_kv_ref` below (an XLA scatter), the path on CPU. int8 pages (kv_cache_dtype="int8") take the rows quantized
first (kernels_pallas/kv_quant.py: int8 values and their f32 scale in one row), on the reference path only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.backend import resolve_backend
from kernels_pallas.kv_quant import is_int8_pages, quantize_rows


def _check(k_pages, v_pages, k, v, slot_mapping) -> None:
    if k_pages.shape != v_pages.shape or k.shape != v.shape:
        raise ValueError(f"K/V shapes differ: pages {k_pages.shape} vs {v_pages.shape}, rows {k.shape} vs {v.shape}")
    if is_int8_pages(k_pages):
        raise ValueError(
            "the Pallas KV write takes float pages; int8 KV pages (kv_cache_dtype='int8') run on CPU "
            "until the accelerator issue brings int8 Pallas kernels"
        )
    if k.ndim != 3 or k.shape[1:] != k_pages.shape[2:]:
        raise ValueError(f"rows {k.shape} must be [T, num_kv_heads, head_dim] matching pages {k_pages.shape}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be i32[{k.shape[0]}], got {slot_mapping.dtype}{slot_mapping.shape}")


def write_kv(
    k_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # i32[T]
    *,
    backend: str = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Write each token's K/V to its slot; returns the new (k_pages, v_pages). Donate the pages to write in place."""
    backend = resolve_backend(backend)
    if backend == "pallas_tpu":
        return write_kv_tpu(k_pages, v_pages, k, v, slot_mapping, interpret=interpret)
    if backend == "pallas_gpu":
        return write_kv_gpu(k_pages, v_pages, k, v, slot_mapping, interpret=interpret)
    return write_kv_ref(k_pages, v_pages, k, v, slot_mapping)


def write_kv_ref(
    k_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: jax.Array,  # [num_pages, page_size, num_kv_heads, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # i32[T]: page * page_size + offset; negative for padding rows (dropped)
) -> tuple[jax.Array, jax.Array]:
    """Scatter each token's new K/V into its cache slot (reference; in place under donation).

    Indexes pages as [page, offset] rather than reshaping to a flat slot axis: inside a layer scan a reshaped
    carry makes XLA copy the whole cache every layer.
    """
    num_pages, page_size = k_pages.shape[:2]
    page = jnp.where(slot_mapping < 0, num_pages, slot_mapping // page_size)  # out of range -> dropped
    offset = slot_mapping % page_size
    if is_int8_pages(k_pages):  # each row quantized with its own scale (kernels_pallas/kv_quant.py)
        k, v = quantize_rows(k), quantize_rows(v)
    k_pages = k_pages.at[page, offset].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, offset].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


# -- TPU ----------------------------------------------------------------------------------------------------


def _tpu_kernel(slots_ref, k_ref, v_ref, k_hbm_in, v_hbm_in, k_hbm, v_hbm, sems, *, page_size):
    # slots_ref: i32[T] (SMEM); k_ref, v_ref: [1, K, D] (VMEM, this token); k_hbm, v_hbm: [N, P, K, D] (HBM)
    del k_hbm_in, v_hbm_in  # aliased to k_hbm, v_hbm
    t = pl.program_id(0)
    slot = slots_ref[t]

    @pl.when(slot >= 0)
    def _():
        from jax.experimental.pallas import tpu as pltpu

        # lax.div/rem (truncating) rather than // and %: floor division lowers through `sign`, whose Mosaic
        # rule asks for the TPU generation (unknown when lowering from a CPU host); slot >= 0 here anyway.
        page, offset = jax.lax.div(slot, page_size), jax.lax.rem(slot, page_size)
        copy_k = pltpu.make_async_copy(k_ref.at[0], k_hbm.at[page, offset], sems.at[0])
        copy_v = pltpu.make_async_copy(v_ref.at[0], v_hbm.at[page, offset], sems.at[1])
        copy_k.start()
        copy_v.start()
        copy_k.wait()
        copy_v.wait()


def write_kv_tpu(k_pages, v_pages, k, v, slot_mapping, *, interpret: bool = False):
    """k_pages, v_pages: [N, P, K, D]; k, v: [T, K, D]; slot_mapping: i32[T] -> new (k_pages, v_pages)."""
    from jax.experimental.pallas import tpu as pltpu

    _check(k_pages, v_pages, k, v, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    row = pl.BlockSpec((1, num_kv_heads, head_dim), lambda t, slots: (t, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(_tpu_kernel, page_size=k_pages.shape[1])
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(num_tokens,),
            in_specs=[row, row, hbm, hbm],
            out_specs=[hbm, hbm],
            scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)] * 2,
        # operand indices count the scalar-prefetch argument: (slots, k, v, k_pages, v_pages)
        input_output_aliases={3: 0, 4: 1},
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    k_out, v_out = call(slot_mapping, k.astype(k_pages.dtype), v.astype(v_pages.dtype), k_pages, v_pages)
    return k_out, v_out


# -- GPU (Triton) ---------------------------------------------------------------------------------------------


def _gpu_kernel(slots_ref, k_ref, v_ref, k_in, v_in, k_out, v_out, *, row_block, row_size):
    # slots_ref: i32[T]; k_ref, v_ref: [T, K*D]; k_out, v_out: [N*P, K*D] (aliased to k_in, v_in)
    from jax.experimental.pallas import triton as plgpu

    del k_in, v_in
    t = pl.program_id(0)
    slot = slots_ref[t]
    cols = jnp.arange(row_block)
    mask = (cols < row_size) & (slot >= 0)
    dst = jnp.maximum(slot, 0)
    k_row = plgpu.load(k_ref.at[t, pl.ds(0, row_block)], mask=cols < row_size, other=0.0)
    v_row = plgpu.load(v_ref.at[t, pl.ds(0, row_block)], mask=cols < row_size, other=0.0)
    plgpu.store(k_out.at[dst, pl.ds(0, row_block)], k_row, mask=mask)
    plgpu.store(v_out.at[dst, pl.ds(0, row_block)], v_row, mask=mask)


def write_kv_gpu(k_pages, v_pages, k, v, slot_mapping, *, interpret: bool = False):
    """k_pages, v_pages: [N, P, K, D]; k, v: [T, K, D]; slot_mapping: i32[T] -> new (k_pages, v_pages)."""
    from jax.experimental.pallas import triton as plgpu

    _check(k_pages, v_pages, k, v, slot_mapping)
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    row_size = num_kv_heads * head_dim
    row_block = pl.next_power_of_2(row_size)
    flat = (num_pages * page_size, row_size)
    kernel = functools.partial(_gpu_kernel, row_block=row_block, row_size=row_size)
    call = pl.pallas_call(  # no block specs: every program sees the whole arrays (global memory)
        kernel,
        grid=(num_tokens,),
        out_shape=[jax.ShapeDtypeStruct(flat, k_pages.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),  # selects the Triton lowering
    )
    k_out, v_out = call(
        slot_mapping,
        k.reshape(num_tokens, row_size).astype(k_pages.dtype),
        v.reshape(num_tokens, row_size).astype(v_pages.dtype),
        k_pages.reshape(flat),
        v_pages.reshape(flat),
    )
    return k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)
