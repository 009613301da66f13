"""Device-side state the model forward reads and writes: the paged KV cache and one ragged batch's metadata.

Both are plain pytrees of arrays; the host side (scheduler, block manager) fills the metadata with ints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer K and V pages, separate buffers so each can be donated."""

    k: jax.Array  # [num_layers, num_pages, page_size, num_kv_heads, head_dim] (int8: head_dim + 4, kv_quant.py)
    v: jax.Array  # [num_layers, num_pages, page_size, num_kv_heads, head_dim]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype) -> "KVCache":
        from kernels_pallas.kv_quant import row_width

        shape = (num_layers, num_pages, page_size, num_kv_heads, row_width(head_dim, dtype))
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Where a ragged batch's tokens go in the cache and what each sequence attends to (vLLM's names)."""

    slot_mapping: jax.Array  # i32[T]: page * page_size + offset of each token's new K/V; -1 for padding
    query_start_loc: jax.Array  # i32[S + 1]: sequence i owns token rows [query_start_loc[i], query_start_loc[i+1])
    kv_lens: jax.Array  # i32[S]: tokens in the cache for each sequence, this step's included
    block_tables: jax.Array  # i32[S, max_pages_per_seq]: page ids of each sequence in order
    num_seqs: jax.Array  # i32[]: valid sequences; the rest are padding
