"""The device page pool: how many KV pages fit the memory budget, and the zeroed K/V buffers themselves."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import CacheConfig
from kernels_pallas.kv_quant import row_width
from kernels_pallas.zeros import zeros
from models.cache import KVCache
from models.config import LlamaConfig

MAX_SLOTS = 2**31 - 1  # slot ids (page * page_size + offset) are int32


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    num_pages: int  # page 0 included: the block manager keeps it as the null page
    page_size: int
    dtype: str
    bytes_per_page: int  # K and V of one page, all layers
    budget_bytes: int
    budget_source: str
    head_dim: int  # values per row (tokens_vs_float32 compares row widths)

    @property
    def num_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    def describe(self) -> str:
        what = self.dtype
        if self.dtype == "int8":
            what = (
                f"int8 with an f32 scale per token and KV head ({self.tokens_vs_float32:.2f}x the tokens float32 "
                f"holds in the same memory)"
            )
        return (
            f"KV cache: {self.num_pages} pages x {self.page_size} tokens ({self.num_tokens} usable tokens), "
            f"{what}, {self.total_bytes / 2**20:.1f} MiB of a {self.budget_bytes / 2**20:.1f} MiB budget "
            f"({self.budget_source})"
        )

    @property
    def tokens_vs_float32(self) -> float:
        """Tokens per byte relative to float32 pages (int8: 4 * head_dim / (head_dim + 4))."""
        return 4 * self.head_dim / (row_width(self.head_dim, self.dtype) * jnp.dtype(self.dtype).itemsize)


def free_device_memory(device: jax.Device) -> tuple[int, str]:
    """Bytes the device can still allocate, and where that number came from."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{device.platform} memory_stats"
    try:  # CPU: the host's available memory
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host MemAvailable"
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host free pages"


def plan_kv_pool(
    cache: CacheConfig,
    model: LlamaConfig,
    model_dtype,
    device: jax.Device | None = None,
    *,
    reserve_bytes: int = 0,
    max_tokens: int | None = None,
    kv_shards: int = 1,
) -> PoolPlan:
    """Pages for the KV cache: `kv_cache_memory` if given, else a fraction of the memory the device has free
    (weights already loaded) after `reserve_bytes` (the compiled step's scratch); at most `max_tokens` tokens."""
    dtype = jnp.dtype(model_dtype if cache.kv_cache_dtype == "auto" else cache.kv_cache_dtype)
    # kv_shards: devices the KV heads are split over; the budget is per device, so a page costs 1/kv_shards.
    row = row_width(model.head_dim, dtype)  # int8 rows carry their f32 scale
    bytes_per_page = 2 * model.num_layers * cache.page_size * model.num_kv_heads * row * dtype.itemsize // kv_shards
    if cache.kv_cache_memory is not None:
        budget, source = cache.kv_cache_memory, "kv_cache_memory"
    else:
        free, where = free_device_memory(device or jax.devices()[0])
        budget = int(max(0, free - reserve_bytes) * cache.kv_cache_memory_fraction)
        source = f"{cache.kv_cache_memory_fraction:g} of {free / 2**30:.1f} GiB free ({where})"
        if reserve_bytes:
            source += f" less {reserve_bytes / 2**20:.0f} MiB for the compiled step"
    num_pages = min(budget // bytes_per_page, MAX_SLOTS // cache.page_size)
    if max_tokens is not None and num_pages > 1 + -(-max_tokens // cache.page_size):
        num_pages = 1 + -(-max_tokens // cache.page_size)
        source += f"; capped at {max_tokens} tokens (more would never be used)"
    if num_pages < 2:
        raise ValueError(
            f"KV cache budget of {budget} bytes ({source}) holds {num_pages} page(s) of {bytes_per_page} bytes; "
            f"at least 2 are needed (raise kv_cache_memory or lower page_size)"
        )
    return PoolPlan(int(num_pages), cache.page_size, dtype.name, bytes_per_page, budget, source, model.head_dim)


def allocate_kv_cache(plan: PoolPlan, model: LlamaConfig, sharding=None, *, backend: str = "auto") -> KVCache:
    """Zeroed K and V pages as two separate buffers (each donated to the step on its own). On CPU the zeros are
    the kernel's own zero-fill-on-demand pages (kernels_pallas.zeros): nothing is written at start-up, and
    memory is touched as the pages are first used."""
    width = row_width(model.head_dim, plan.dtype)  # int8 rows carry their f32 scale
    shape = (model.num_layers, plan.num_pages, plan.page_size, model.num_kv_heads, width)
    return KVCache(
        zeros(shape, plan.dtype, sharding, backend=backend), zeros(shape, plan.dtype, sharding, backend=backend)
    )


__all__ = ["PoolPlan", "allocate_kv_cache", "free_device_memory", "plan_kv_pool"]
