"""The device page pool plan: sizing from a byte budget or a fraction of free memory, and its buffers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import CacheConfig
from jaxserve.kv_cache.pool import allocate_kv_cache, plan_kv_pool
from tests.tiny_models import TINY


def test_plan_from_byte_budget():
    # TINY: 2 layers, 2 kv heads, head_dim 16 -> one 16-token page of K and V in fp32 = 2*2*16*2*16*4 bytes
    page_bytes = 2 * 2 * 16 * 2 * 16 * 4
    plan = plan_kv_pool(CacheConfig(kv_cache_memory=10 * page_bytes + 5), TINY, jnp.float32)
    assert plan.num_pages == 10 and plan.bytes_per_page == page_bytes
    assert plan.num_tokens == 9 * 16
    assert "10 pages x 16 tokens" in plan.describe()


def test_dtype_follows_model_or_flag():
    assert plan_kv_pool(CacheConfig(kv_cache_memory=1 << 20), TINY, jnp.bfloat16).dtype == "bfloat16"
    plan = plan_kv_pool(CacheConfig(kv_cache_memory=1 << 20, kv_cache_dtype="bfloat16"), TINY, jnp.float32)
    assert plan.dtype == "bfloat16"
    assert plan.num_pages == (1 << 20) // plan.bytes_per_page


def test_plan_from_free_memory_fraction():
    plan = plan_kv_pool(CacheConfig(kv_cache_memory_fraction=0.01), TINY, jnp.float32)
    assert plan.num_pages >= 2 and "free" in plan.budget_source


def test_too_small_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 are needed"):
        plan_kv_pool(CacheConfig(kv_cache_memory=100), TINY, jnp.float32)


def test_allocate_matches_plan():
    plan = plan_kv_pool(CacheConfig(kv_cache_memory=1 << 16, page_size=8), TINY, jnp.float32)
    cache = allocate_kv_cache(plan, TINY)
    assert cache.k.shape == (TINY.num_layers, plan.num_pages, 8, TINY.num_kv_heads, TINY.head_dim)
    assert cache.k.dtype == jnp.float32 and cache.v.shape == cache.k.shape
    assert cache.k.unsafe_buffer_pointer() != cache.v.unsafe_buffer_pointer()


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"page_size": 0}, "page_size"),
        ({"page_size": 12}, "page_size"),
        ({"kv_cache_dtype": "int3"}, "kv_cache_dtype"),
        ({"kv_cache_memory": -5}, "kv_cache_memory"),
        ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction"),
    ],
)
def test_cache_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"CacheConfig.{field}="):
        CacheConfig(**kw)


@pytest.mark.parametrize(
    "shape,dtype",
    [((3, 5, 7), jnp.int8), ((1000,), jnp.bfloat16), ((4, 1000, 1027), jnp.float32), ((2, 300, 16, 3, 68), jnp.int8)],
)
def test_lazy_zeros_are_zero_where_memory_was_used_before(shape, dtype):
    """kernels_pallas.zeros on CPU (the C++ call that hands pages back with madvise, memset at the unaligned
    ends and for buffers under two pages): zeros like jnp.zeros even where the allocator reuses memory just
    filled with other values, for sizes under a page, off page boundaries, and several dtypes."""
    import jax

    from kernels_pallas.zeros import zeros

    fill = jax.jit(lambda a: a + jnp.asarray(7, a.dtype), donate_argnums=0)
    assert "jaxserve_lazy_zeros" in jax.jit(lambda: zeros(shape, dtype)).lower().as_text()
    for _ in range(3):
        used = fill(jnp.zeros(shape, dtype))  # memory full of 7s, freed for the next allocation
        del used
        z = zeros(shape, dtype)
        assert z.shape == shape and z.dtype == dtype
        assert not np.asarray(z.astype(jnp.float32)).any()


def test_kv_pool_reads_zeros_at_both_ends():
    """A 1 GiB pool from the lazy zeros (nothing written at allocation): its first and last pages read zero."""
    plan = plan_kv_pool(CacheConfig(kv_cache_memory=1 << 30, page_size=16), TINY, jnp.float32)
    cache = allocate_kv_cache(plan, TINY)
    assert not np.asarray(cache.v[:, -3:]).any() and not np.asarray(cache.k[:, :3]).any()
