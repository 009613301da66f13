"""KV cache: the host-side page manager and the device page pool."""

from jaxserve.kv_cache.block_manager import BlockManager, hash_page

__all__ = ["BlockManager", "hash_page"]
