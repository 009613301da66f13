"""Engine settings as frozen dataclasses, validated once; CLI flags and server options map onto them."""

from __future__ import annotations

import dataclasses

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
MAX_PAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    page_size: tokens per page. kv_cache_dtype: "auto" follows the model's dtype.
    kv_cache_memory: bytes for K and V pages of all layers; None -> kv_cache_memory_fraction of the memory the
    device has free after the weights (the engine issue refines this with the compiled step's own needs).
    """

    page_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"CacheConfig.page_size={self.page_size!r} must be an integer in [1, {MAX_PAGE_SIZE}]")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"CacheConfig.page_size={self.page_size} must be a power of two")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"CacheConfig.kv_cache_dtype={self.kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory <= 0):
            raise ValueError(f"CacheConfig.kv_cache_memory={self.kv_cache_memory!r} must be a positive number of bytes")
        if not 0 < self.kv_cache_memory_fraction <= 0.95:
            raise ValueError(
                f"CacheConfig.kv_cache_memory_fraction={self.kv_cache_memory_fraction!r} must be in (0, 0.95]"
            )
