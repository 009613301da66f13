"""int8 KV pages: each (token, KV head) row holds its head_dim int8 values and, beside them, its f32 scale.

    float pages  [..., num_kv_heads, head_dim]        f32 / bf16
    int8 pages   [..., num_kv_heads, head_dim + 4]    int8: values q (head_dim), then the 4 bytes of an f32 scale
                                                      (value = q * scale, scale = amax / 127 of the row)

Keeping the scale in the row keeps one buffer each for K and V (donation, sharding by KV head, the multi-host
broadcast and the block manager see no new arrays), and a page's bytes stay contiguous for the CPU kernel. In
the same memory the pool holds 4 * head_dim / (head_dim + 4) times the tokens of f32 (3.76x at head_dim 64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.quantized_matmul import absmax_int8

SCALE_BYTES = 4


def is_int8_pages(pages) -> bool:
    return jnp.dtype(pages.dtype) == jnp.int8


def row_width(head_dim: int, dtype) -> int:
    """The last dimension of a page for this KV dtype."""
    return head_dim + SCALE_BYTES if jnp.dtype(dtype) == jnp.int8 else head_dim


def head_dim_of(pages) -> int:
    return pages.shape[-1] - SCALE_BYTES if is_int8_pages(pages) else pages.shape[-1]


def quantize_rows(x: jax.Array) -> jax.Array:
    """[..., D] floats -> int8 [..., D + 4]: per row, scale = amax / 127, q = round(x / scale)."""
    q, scale = absmax_int8(x)
    scale_bytes = jax.lax.bitcast_convert_type(scale, jnp.int8)  # [..., 4]
    return jnp.concatenate([q, scale_bytes], axis=-1)


def dequantize_rows(rows: jax.Array) -> jax.Array:
    """int8 [..., D + 4] -> f32 [..., D]."""
    scale = jax.lax.bitcast_convert_type(rows[..., -SCALE_BYTES:], jnp.float32)  # [...]
    return rows[..., :-SCALE_BYTES].astype(jnp.float32) * scale[..., None]


def read_rows(pages: jax.Array, *index) -> jax.Array:
    """pages[index] as f32 rows [..., D], dequantized when the pages are int8."""
    x = pages[index]
    return dequantize_rows(x) if is_int8_pages(pages) else x.astype(jnp.float32)
