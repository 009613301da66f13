"""KV cache: the host-side page manager (the device page pool joins it later)."""

from jaxserve.kv_cache.block_manager import BlockManager, hash_page

__all__ = ["BlockManager", "hash_page"]
