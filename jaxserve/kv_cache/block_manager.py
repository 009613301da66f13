"""Host-side KV page manager: free list, ref counts, prefix cache by chained hashes, LRU eviction.

Pure Python, never imports jax: the scheduler asks it for pages and hands the device step plain
block tables of ints. The vocabulary is vLLM v1's (`kv_cache_manager.py`, `block_pool.py`); the
prefix cache is nano-vllm's chained hash over full pages, with a token check on every hit.

The life of a usable page (page 0 is the null page: block-table padding, never handed out):

                 allocate_slots
   free list ----------------------> referenced (ref >= 1)
       ^                              |    |    ^    ^
       +-- free: ref -> 0, uncached --+    |    |    |
                                           |    |    |
                 free: ref -> 0, cached    v    |    |
                               evictable LRU ---+    |  prefix hit: allocate_slots(computed_pages)
                      (ref 0, still hashed) ---------+  evict the oldest when the free list is empty

`cache_full_pages` enters a referenced full page into the hash table; only eviction removes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence

NULL_PAGE = 0


def hash_page(parent: bytes | None, model_id: str, token_ids: Sequence[int]) -> bytes:
    """sha256(parent || model_id || token ids as little-endian uint32): a full page's prefix-cache key.

    `parent` is the previous page's hash (None for a request's first page), so a key names the whole
    prefix up to and including this page, not just the page's own tokens.
    """
    try:
        packed = struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as e:
        raise ValueError(f"token_ids: every token id must be an int in [0, 2**32) ({e})") from None
    return hashlib.sha256((parent or b"") + model_id.encode() + packed).digest()


def salt_root(salt: str | None) -> bytes | None:
    """The parent of a salted request's first page (None unsalted): requests share cached pages only when they
    bring the same salt, so a tenant's prompts cannot be probed through another's hits (vLLM's cache_salt)."""
    return None if not salt else hashlib.sha256(b"jaxserve cache salt\0" + salt.encode()).digest()


@dataclasses.dataclass(frozen=True)
class _CachedPage:
    hash: bytes
    parent: bytes | None  # the previous page's hash: lets a hit check the whole chain, not one page
    token_ids: tuple[int, ...]  # checked on every hit, so a hash collision can never return wrong KV


@dataclasses.dataclass
class _Request:
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_cached_pages: int = 0  # leading full pages already hashed (cache_full_pages resumes here)
    last_hash: bytes | None = None  # hash of page num_cached_pages - 1: the chain continues from it


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class BlockManager:
    """Owns the page ids [0, num_pages) of one KV cache: who references which page, which are cached.

    Page 0 is reserved as the null page (the device step pads block tables with it), so
    `num_pages - 1` pages are usable. A request's block table grows through `allocate_slots`, its
    full pages enter the prefix cache through `cache_full_pages`, and `free` drops its references.
    The caller keeps `num_computed_tokens`; this class keeps pages and ref counts.
    """

    def __init__(self, num_pages: int, page_size: int, *, model_id: str = "", enable_prefix_caching: bool = True):
        if not _is_int(num_pages) or num_pages < 2:
            raise ValueError(f"num_pages={num_pages!r}: need an int >= 2 (page 0 is the reserved null page)")
        if not _is_int(page_size) or page_size < 1:
            raise ValueError(f"page_size={page_size!r}: need an int >= 1")
        if not isinstance(model_id, str):
            raise ValueError(f"model_id={model_id!r}: need a str")
        self.num_pages = num_pages
        self.page_size = page_size
        self.model_id = model_id
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._free: deque[int] = deque(range(1, num_pages))  # unreferenced, uncached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached; oldest first
        self._ref_count = [0] * num_pages
        self._cached: dict[int, _CachedPage] = {}  # page -> what it holds
        self._hash_to_page: dict[bytes, int] = {}
        self._requests: dict[str, _Request] = {}
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of those, tokens found cached
        self.num_evictions = 0

    # ---- derived quantities -------------------------------------------------------------------

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now: the free list plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of usable pages referenced by at least one request."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit tokens / queried tokens (0.0 before any query)."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def block_table(self, request_id: str) -> list[int]:
        return list(self._get(request_id).block_table)

    # ---- the API the scheduler drives ---------------------------------------------------------

    def get_computed_pages(
        self, request_id: str, token_ids: Sequence[int], *, record: bool = True, salt: str | None = None
    ) -> tuple[list[int], int]:
        """The longest run of cached full pages that prefixes `token_ids`, and the tokens they hold.

        At least one token is always left to compute (the caller needs its logits), so a prompt
        cached to its last token loses its last page from the hit. The pages are not referenced yet:
        pass them to `allocate_slots` before anything else allocates, or they may be evicted. With
        record=False the lookup is left out of `hit_rate` (the caller records it with `record_lookup` once the
        request is actually admitted, so a lookup retried every step while memory is short counts once).
        """
        _check_request_id(request_id)
        if request_id in self._requests:
            raise ValueError(
                f"request_id={request_id!r} already owns pages; look up a prefix before its first allocate_slots"
            )
        if not self.enable_prefix_caching:
            return [], 0
        ps, pages, parent = self.page_size, [], salt_root(salt)
        for i in range(max(0, (len(token_ids) - 1) // ps)):  # (n - 1) // ps: never the whole prompt
            chunk = tuple(token_ids[i * ps : (i + 1) * ps])
            h = hash_page(parent, self.model_id, chunk)
            page = self._hash_to_page.get(h)
            if page is None:
                break
            entry = self._cached[page]
            if entry.token_ids != chunk or entry.parent != parent:
                break  # a hash collision: a miss, never someone else's KV
            pages.append(page)
            parent = h
        if record:
            self.record_lookup(len(token_ids), len(pages) * ps)
        return pages, len(pages) * ps

    def record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        self.num_queried_tokens += num_queried_tokens
        self.num_hit_tokens += num_hit_tokens

    def allocate_slots(
        self,
        request_id: str,
        num_tokens_total: int,
        computed_pages: Sequence[int] | None = None,
        *,
        salt: str | None = None,
    ) -> list[int] | None:
        """Make `request_id` own enough pages for `num_tokens_total` tokens; return the new page ids.

        The first call may pass `computed_pages` (a hit from `get_computed_pages` with the same `salt`) to adopt
        them; `salt` (first call only) starts the request's hash chain.
        Returns None, changing nothing, when there are not enough free pages: the caller preempts.
        """
        _check_request_id(request_id)
        if not _is_int(num_tokens_total) or num_tokens_total < 0:
            raise ValueError(f"num_tokens_total={num_tokens_total!r}: need an int >= 0")
        computed = list(computed_pages or ())
        req = self._requests.get(request_id)
        if computed:
            if req is not None:
                raise ValueError(f"computed_pages: only on the first allocate_slots of request_id={request_id!r}")
            self._check_prefix_chain(computed, salt_root(salt))
            if num_tokens_total < len(computed) * self.page_size:
                raise ValueError(
                    f"num_tokens_total={num_tokens_total} is fewer than the {len(computed)} computed_pages hold"
                )
        num_owned = len(req.block_table) if req else 0
        num_new = max(0, -(-num_tokens_total // self.page_size) - num_owned - len(computed))
        # Adopted pages that sit in the LRU are counted in num_free_pages but must not be evicted here.
        num_revived = sum(1 for p in computed if self._ref_count[p] == 0)
        if num_new > self.num_free_pages - num_revived:
            return None
        if req is None:
            req = self._requests[request_id] = _Request(last_hash=salt_root(salt))
        for page in computed:
            if self._ref_count[page] == 0:
                del self._evictable[page]
            self._ref_count[page] += 1
        if computed:
            req.block_table.extend(computed)
            req.num_cached_pages, req.last_hash = len(computed), self._cached[computed[-1]].hash
        new_pages = [self._take_free_page() for _ in range(num_new)]
        for page in new_pages:
            self._ref_count[page] = 1
        req.block_table.extend(new_pages)
        return new_pages

    def cache_full_pages(self, request_id: str, token_ids: Sequence[int]) -> None:
        """Enter the request's newly full pages into the prefix cache. Idempotent.

        `token_ids` are the request's tokens whose KV is computed. If another request cached the
        same prefix first, its page stays the cached one and this request's copy stays private.
        """
        req = self._get(request_id)
        num_full = len(token_ids) // self.page_size
        if num_full > len(req.block_table):
            raise ValueError(
                f"token_ids: {len(token_ids)} tokens fill {num_full} pages, "
                f"but request_id={request_id!r} owns {len(req.block_table)}"
            )
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        for i in range(req.num_cached_pages, num_full):
            chunk = tuple(token_ids[i * ps : (i + 1) * ps])
            h = hash_page(req.last_hash, self.model_id, chunk)
            if h not in self._hash_to_page:
                page = req.block_table[i]
                self._hash_to_page[h] = page
                self._cached[page] = _CachedPage(h, req.last_hash, chunk)
            req.last_hash = h
            req.num_cached_pages = i + 1

    def free(self, request_id: str) -> None:
        """Drop the request's references. Tail pages are released first, so they are evicted first
        (a later prompt is likelier to share the head of this one than its tail)."""
        req = self._get(request_id)
        del self._requests[request_id]
        for page in reversed(req.block_table):
            self._ref_count[page] -= 1
            if self._ref_count[page] == 0:
                if page in self._cached:
                    self._evictable[page] = None  # most recently used end
                else:
                    self._free.append(page)

    # ---- internals ----------------------------------------------------------------------------

    def _get(self, request_id: str) -> _Request:
        _check_request_id(request_id)
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"request_id={request_id!r}: unknown (never allocated, or already freed)")
        return req

    def _take_free_page(self) -> int:
        if self._free:
            return self._free.popleft()
        page, _ = self._evictable.popitem(last=False)  # least recently freed
        del self._hash_to_page[self._cached.pop(page).hash]
        self.num_evictions += 1
        return page

    def _check_prefix_chain(self, pages: list[int], parent: bytes | None) -> None:
        for page in pages:
            entry = self._cached.get(page) if _is_int(page) else None
            if entry is None:
                raise ValueError(f"computed_pages: page {page!r} is not cached (evicted since get_computed_pages?)")
            if entry.parent != parent:
                raise ValueError(f"computed_pages: page {page!r} does not continue the prefix chain")
            parent = entry.hash

    def _check_invariants(self) -> None:
        """Raise AssertionError if the page bookkeeping is inconsistent (for tests)."""

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise AssertionError(what)

        refs = [0] * self.num_pages
        for rid, req in self._requests.items():
            need(len(set(req.block_table)) == len(req.block_table), f"{rid}: a page twice in one block table")
            need(req.num_cached_pages <= len(req.block_table), f"{rid}: num_cached_pages past its table")
            for page in req.block_table:
                refs[page] += 1
        need(refs == self._ref_count, "ref counts differ from the block tables")
        free, evictable = set(self._free), set(self._evictable)
        need(len(free) == len(self._free), "a page twice in the free list")
        need(NULL_PAGE not in free | evictable and refs[NULL_PAGE] == 0, "the null page was handed out")
        for page in range(1, self.num_pages):
            states = (page in free) + (page in evictable) + (refs[page] > 0)
            need(states == 1, f"page {page} is in {states} of free / evictable / referenced")
        need(not free & self._cached.keys(), "a free-list page is still cached")
        need(evictable <= self._cached.keys(), "an evictable page is not cached")
        need(len(self._hash_to_page) == len(self._cached), "hash table and page records differ in size")
        for h, page in self._hash_to_page.items():
            entry = self._cached.get(page)
            need(entry is not None and entry.hash == h, f"hash entry for page {page} has no matching record")
            need(len(entry.token_ids) == self.page_size, f"cached page {page} is not full")
            rehash = hash_page(entry.parent, self.model_id, entry.token_ids)
            need(rehash == h, f"page {page}: stored tokens do not match its hash")


def _check_request_id(request_id) -> None:
    if not isinstance(request_id, str):
        raise ValueError(f"request_id={request_id!r}: need a str")
