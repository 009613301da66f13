"""BlockManager: stories with exact page ids (vLLM-style), then a random-operations state machine."""

from __future__ import annotations

import copy
import hashlib
import struct
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jaxserve.kv_cache import BlockManager, hash_page
from jaxserve.kv_cache import block_manager as bm_module


def state(bm: BlockManager) -> dict:
    """Everything the manager holds, for "nothing changed" assertions."""
    return copy.deepcopy(vars(bm))


def run_prompt(bm: BlockManager, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    """Look up, adopt the hit, allocate the rest, 'compute' the prompt and cache its full pages."""
    pages, num_cached = bm.get_computed_pages(rid, prompt)
    new = bm.allocate_slots(rid, len(prompt), pages)
    assert new is not None
    bm.cache_full_pages(rid, prompt)
    bm._check_invariants()
    return pages, num_cached


# ---- allocation stories ------------------------------------------------------------------------


def test_allocate_append_free_story():
    bm = BlockManager(num_pages=8, page_size=4)  # usable pages 1..7
    assert (bm.num_usable_pages, bm.num_free_pages, bm.usage) == (7, 7, 0.0)

    assert bm.allocate_slots("a", 10) == [1, 2, 3]
    assert bm.block_table("a") == [1, 2, 3]
    assert bm.allocate_slots("a", 12) == []  # still fits in 3 pages
    assert bm.allocate_slots("a", 13) == [4]  # decode crosses a page boundary
    assert bm.allocate_slots("a", 5) == []  # never shrinks
    assert bm.block_table("a") == [1, 2, 3, 4]
    assert bm.allocate_slots("b", 5) == [5, 6]
    assert bm.num_free_pages == 1 and bm.usage == pytest.approx(6 / 7)
    bm._check_invariants()

    bm.free("a")  # tail first: the free list becomes [7, 4, 3, 2, 1]
    assert bm.num_free_pages == 5
    assert bm.allocate_slots("c", 8) == [7, 4]
    assert bm.allocate_slots("d", 0) == [] and bm.block_table("d") == []
    bm._check_invariants()
    for rid in ("b", "c", "d"):
        bm.free(rid)
    assert bm.num_free_pages == 7 and bm.usage == 0.0
    bm._check_invariants()


def test_all_or_nothing_failure_changes_nothing():
    bm = BlockManager(num_pages=6, page_size=4)  # 5 usable
    assert bm.allocate_slots("a", 8) == [1, 2]
    assert bm.allocate_slots("b", 8) == [3, 4]
    before = state(bm)
    assert bm.allocate_slots("b", 17) is None  # needs 3 more, 1 free
    assert bm.allocate_slots("c", 9) is None  # a new request that does not fit is not created
    assert state(bm) == before
    with pytest.raises(ValueError, match="request_id"):
        bm.block_table("c")
    assert bm.allocate_slots("b", 12) == [5]  # what does fit still works
    bm._check_invariants()


def test_null_page_is_never_handed_out():
    bm = BlockManager(num_pages=5, page_size=1)
    pages = [bm.allocate_slots(f"r{i}", 1)[0] for i in range(4)]
    assert sorted(pages) == [1, 2, 3, 4]
    assert bm.allocate_slots("r5", 1) is None
    assert bm.usage == 1.0


def test_misuse_raises_clear_value_errors():
    with pytest.raises(ValueError, match="page_size"):
        BlockManager(num_pages=4, page_size=0)
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(num_pages=1, page_size=4)
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(num_pages=4.0, page_size=4)
    bm = BlockManager(num_pages=8, page_size=2)
    with pytest.raises(ValueError, match="num_tokens_total"):
        bm.allocate_slots("a", -1)
    with pytest.raises(ValueError, match="request_id"):
        bm.allocate_slots(7, 2)
    for call in (bm.free, bm.block_table, lambda rid: bm.cache_full_pages(rid, [1, 2])):
        with pytest.raises(ValueError, match="request_id='nope'"):
            call("nope")
    run_prompt(bm, "a", [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="token_ids"):
        bm.cache_full_pages("a", [1, 2, 3, 4, 5, 6, 7, 8])  # 4 full pages, owns 3
    with pytest.raises(ValueError, match="computed_pages"):
        bm.allocate_slots("a", 9, [1])  # only on a request's first call
    with pytest.raises(ValueError, match="request_id"):
        bm.get_computed_pages("a", [1, 2, 3])  # already owns pages
    with pytest.raises(ValueError, match="token_ids"):
        bm.get_computed_pages("b", [1, -2, 3])
    with pytest.raises(ValueError, match="computed_pages"):
        bm.allocate_slots("b", 9, [2])  # page 2 is cached, but not the start of a chain
    with pytest.raises(ValueError, match="computed_pages"):
        bm.allocate_slots("b", 9, [3])  # page 3 is the partial, uncached last page
    with pytest.raises(ValueError, match="num_tokens_total"):
        bm.allocate_slots("b", 3, [1, 2])
    bm._check_invariants()


def test_double_free_raises_and_leaves_state_intact():
    bm = BlockManager(num_pages=6, page_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")
    before = state(bm)
    with pytest.raises(ValueError, match="request_id='a'"):
        bm.free("a")
    assert state(bm) == before
    bm._check_invariants()
    assert bm.num_free_pages == 5


# ---- prefix caching ----------------------------------------------------------------------------


def test_hash_is_chained_sha256_of_model_id_and_uint32_tokens():
    packed = struct.pack("<3I", 1, 2, 70000)
    assert hash_page(None, "m", [1, 2, 70000]) == hashlib.sha256(b"m" + packed).digest()
    parent = hash_page(None, "m", [9])
    assert hash_page(parent, "m", [1, 2, 70000]) == hashlib.sha256(parent + b"m" + packed).digest()
    assert hash_page(None, "m", [1, 2]) != hash_page(None, "other", [1, 2])


def test_prefix_hit_shares_full_pages_and_never_the_partial_one():
    bm = BlockManager(num_pages=16, page_size=4)
    prompt = list(range(10))  # 2 full pages + 2 tokens
    assert run_prompt(bm, "a", prompt) == ([], 0)
    assert bm.block_table("a") == [1, 2, 3]

    pages, num_cached = bm.get_computed_pages("b", prompt)
    assert (pages, num_cached) == ([1, 2], 8)
    assert bm.allocate_slots("b", len(prompt), pages) == [4]  # the partial page is b's own
    assert bm.block_table("b") == [1, 2, 4]
    bm.cache_full_pages("b", prompt)
    assert bm.hit_rate == pytest.approx(8 / 20) and bm.hit_rate > 0
    bm._check_invariants()

    bm.free("a")  # page 1 and 2 are still b's: only page 3 is released
    assert bm.num_free_pages == 16 - 1 - 3
    assert bm.get_computed_pages("c", prompt) == ([1, 2], 8)


def test_one_token_difference_splits_the_page_but_shares_those_before():
    bm = BlockManager(num_pages=16, page_size=4)
    prompt = list(range(13))  # 3 full pages + 1
    run_prompt(bm, "a", prompt)
    assert bm.block_table("a") == [1, 2, 3, 4]

    in_page_1 = prompt.copy()
    in_page_1[5] = 99
    assert bm.get_computed_pages("b", in_page_1) == ([1], 4)
    in_page_0 = prompt.copy()
    in_page_0[0] = 99
    assert bm.get_computed_pages("c", in_page_0) == ([], 0)
    # Same page content at another position is another prefix: the chain, not the page, is the key.
    assert bm.get_computed_pages("d", prompt[4:8] + prompt[4:8] + [0]) == ([], 0)


def test_whole_prompt_cached_leaves_a_token_to_compute():
    bm = BlockManager(num_pages=16, page_size=4)
    prompt = list(range(8))  # exactly 2 full pages
    run_prompt(bm, "a", prompt)
    pages, num_cached = bm.get_computed_pages("b", prompt)
    assert (pages, num_cached) == ([1], 4)
    assert num_cached < len(prompt)
    assert bm.get_computed_pages("c", prompt[:4]) == ([], 0)  # one full page: nothing to reuse
    assert bm.get_computed_pages("e", prompt + [8]) == ([1, 2], 8)
    assert bm.get_computed_pages("f", []) == ([], 0)


def test_cache_full_pages_is_idempotent_and_continues_the_chain():
    bm = BlockManager(num_pages=16, page_size=2)
    tokens = [5, 6, 7]
    assert bm.allocate_slots("a", 3) == [1, 2]
    bm.cache_full_pages("a", tokens)
    before = state(bm)
    bm.cache_full_pages("a", tokens)
    bm.cache_full_pages("a", tokens[:2])
    assert state(bm) == before
    tokens += [8, 9]  # decode fills page 2 and starts page 3
    assert bm.allocate_slots("a", 5) == [3]
    bm.cache_full_pages("a", tokens)
    bm._check_invariants()
    assert bm.get_computed_pages("b", tokens) == ([1, 2], 4)


def test_collision_safe_even_with_a_constant_hash(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_page", lambda parent, model_id, token_ids: b"same")
    bm = BlockManager(num_pages=8, page_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])
    assert bm.get_computed_pages("b", [1, 2, 3, 4, 5]) == ([1], 2)  # page 2 collided: left uncached
    assert bm.get_computed_pages("c", [7, 8, 3, 4, 5]) == ([], 0)  # hash "hits", tokens do not
    bm._check_invariants()


def test_duplicate_content_keeps_the_first_cached_page():
    bm = BlockManager(num_pages=8, page_size=2)
    assert bm.allocate_slots("a", 3) == [1, 2]
    assert bm.allocate_slots("b", 3) == [3, 4]  # b started before a cached anything
    bm.cache_full_pages("a", [1, 2, 3])
    bm.cache_full_pages("b", [1, 2, 3])
    bm._check_invariants()
    bm.free("b")  # page 3 holds the same prefix but is not the cached one: straight to the free list
    assert bm.num_free_pages == 5 and bm.num_evictions == 0
    assert bm.get_computed_pages("c", [1, 2, 3]) == ([1], 2)


def test_prefix_caching_disabled():
    bm = BlockManager(num_pages=6, page_size=2, enable_prefix_caching=False)
    run_prompt(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")
    assert bm.get_computed_pages("b", [1, 2, 3, 4, 5]) == ([], 0)
    assert bm.hit_rate == 0.0 and bm.num_queried_tokens == 0
    assert bm.allocate_slots("b", 10) == [4, 5, 3, 2, 1]  # all on the free list, no evictions
    assert bm.num_evictions == 0


# ---- LRU eviction ------------------------------------------------------------------------------


def test_lru_evicts_least_recently_freed_and_a_hit_revives():
    bm = BlockManager(num_pages=5, page_size=2)  # usable 1..4
    run_prompt(bm, "a", [10, 11, 12, 13])
    run_prompt(bm, "b", [20, 21, 22, 23])
    assert (bm.block_table("a"), bm.block_table("b")) == ([1, 2], [3, 4])
    bm.free("a")  # LRU: 2, 1 (tail first)
    bm.free("b")  # LRU: 2, 1, 4, 3
    assert bm.num_free_pages == 4 and bm.usage == 0.0

    assert bm.allocate_slots("c", 2) == [2]  # free list empty: evict a's tail
    assert bm.num_evictions == 1
    assert bm.get_computed_pages("a2", [10, 11, 12, 13, 14]) == ([1], 2)  # a's head survived

    pages, num_cached = bm.get_computed_pages("d", [20, 21, 22, 23, 24])
    assert (pages, num_cached) == ([3, 4], 4)
    # d revives 3 and 4 out of the LRU, so the one new page must come from evicting page 1.
    assert bm.allocate_slots("d", 5, pages) == [1]
    assert bm.block_table("d") == [3, 4, 1] and bm.num_evictions == 2
    assert bm.num_free_pages == 0 and bm.usage == 1.0
    bm._check_invariants()
    assert bm.get_computed_pages("e", [10, 11, 12]) == ([], 0)  # page 1 now holds d's KV

    bm.free("c")  # uncached -> free list
    bm.free("d")  # page 1 is unhashed -> free list; LRU: 4, 3 (revived ones go to the young end)
    assert bm.allocate_slots("f", 8) == [2, 1, 4, 3]
    assert bm.num_evictions == 4
    bm._check_invariants()


def test_revived_pages_are_not_counted_as_free_for_the_same_request():
    bm = BlockManager(num_pages=5, page_size=2)
    run_prompt(bm, "a", [1, 2, 3, 4])
    bm.free("a")  # LRU: 2, 1; free list: 3, 4
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 5 pages: adopt 2, need 3 new, only 2 truly free
    pages, _ = bm.get_computed_pages("b", prompt)
    assert pages == [1, 2]
    before = state(bm)
    assert bm.allocate_slots("b", len(prompt), pages) is None
    assert state(bm) == before
    assert bm.allocate_slots("b", 8, pages) == [3, 4]
    bm._check_invariants()


def test_stale_hit_raises_instead_of_adopting_an_evicted_page():
    bm = BlockManager(num_pages=3, page_size=2)
    run_prompt(bm, "a", [1, 2, 3])
    bm.free("a")  # free list: 2; LRU: 1
    pages, _ = bm.get_computed_pages("b", [1, 2, 3])
    assert pages == [1]
    assert bm.allocate_slots("x", 4) == [2, 1]  # evicts page 1 between lookup and adoption
    with pytest.raises(ValueError, match="computed_pages"):
        bm.allocate_slots("b", 3, pages)
    bm._check_invariants()


def test_host_side_module_does_not_import_jax_or_numpy():
    code = (
        "import sys, jaxserve.kv_cache\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy'))\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- random operations -------------------------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random new-request / lookup / compute / decode / free sequences over a tiny pool.

    Besides the manager's own invariants, the machine keeps an independent model of what KV each
    physical page holds (which token at which slot, written as requests 'compute'), so every prefix
    hit is checked against the real page contents, and no write ever lands in a shared page.
    """

    @initialize(num_pages=st.integers(4, 16), page_size=st.integers(2, 4))
    def setup(self, num_pages, page_size):
        self.bm = BlockManager(num_pages, page_size, model_id="tiny")
        self.ps = page_size
        self.live: dict[str, dict] = {}  # rid -> {"tokens": [...], "computed": int}
        self.freed: list[str] = []
        self.contents: dict[int, list] = {}  # page -> token written at each slot (None: unwritten)
        self.next_id = 0

    def _prompt(self, data):
        """A cut of one of two shared 'system prompts' plus a random tail, so prefix hits are common."""
        base = data.draw(st.sampled_from([[0, 1, 2] * self.ps, [1] * (3 * self.ps)]))
        head = base[: data.draw(st.integers(0, len(base)))]
        tail = data.draw(st.lists(st.integers(0, 2), min_size=0 if head else 1, max_size=self.ps + 1))
        return head + tail

    @rule(data=st.data(), probe_only=st.booleans(), whole_prefill=st.booleans())
    def new_request(self, data, probe_only, whole_prefill):
        prompt = self._prompt(data)
        rid = f"r{self.next_id}"
        self.next_id += 1
        pages, num_cached = self.bm.get_computed_pages(rid, prompt)
        assert num_cached == len(pages) * self.ps and num_cached < len(prompt)
        for i, page in enumerate(pages):  # the pages really hold this prompt's KV
            assert self.contents[page] == prompt[i * self.ps : (i + 1) * self.ps]
        if probe_only:
            return
        before = state(self.bm)
        new = self.bm.allocate_slots(rid, len(prompt), pages)
        if new is None:
            assert state(self.bm) == before
            return
        self._fresh(new)
        assert self.bm.block_table(rid) == pages + new
        self.live[rid] = {"tokens": prompt, "computed": num_cached}
        if whole_prefill:
            self._compute(rid, len(prompt))

    @rule(data=st.data(), n=st.integers(1, 8))
    def compute(self, data, n):
        if self.live:
            self._compute(data.draw(st.sampled_from(sorted(self.live))), n)

    def _compute(self, rid, n):
        """Write the next n tokens' KV (a prompt chunk), then cache the newly full pages."""
        req = self.live[rid]
        table = self.bm.block_table(rid)
        end = min(len(req["tokens"]), req["computed"] + n)
        for pos in range(req["computed"], end):
            page = table[pos // self.ps]
            assert all(page not in self.bm.block_table(o) for o in self.live if o != rid), "write to a shared page"
            self.contents[page][pos % self.ps] = req["tokens"][pos]
        req["computed"] = end
        self.bm.cache_full_pages(rid, req["tokens"][:end])

    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token):
        """A sampled token joins a fully computed request; it needs a slot (none: preempt = free)."""
        done = sorted(r for r, v in self.live.items() if v["computed"] == len(v["tokens"]))
        if not done:
            return
        rid = data.draw(st.sampled_from(done))
        req = self.live[rid]
        before = state(self.bm)
        new = self.bm.allocate_slots(rid, len(req["tokens"]) + 1)
        if new is None:
            assert state(self.bm) == before
            self._free(rid)
            return
        self._fresh(new)
        req["tokens"].append(token)
        assert len(self.bm.block_table(rid)) == -(-len(req["tokens"]) // self.ps)

    @rule(data=st.data(), again=st.booleans())
    def free(self, data, again):
        """Free a live request, or free an already freed one again (must raise, change nothing)."""
        if self.live and not (again and self.freed):
            self._free(data.draw(st.sampled_from(sorted(self.live))))
        elif self.freed:
            rid = data.draw(st.sampled_from(self.freed))
            before = state(self.bm)
            with pytest.raises(ValueError, match="request_id"):
                self.bm.free(rid)
            assert state(self.bm) == before

    def _fresh(self, pages):
        for page in pages:  # a newly handed-out page holds nothing valid yet
            self.contents[page] = [None] * self.ps

    def _free(self, rid):
        self.bm.free(rid)
        del self.live[rid]
        self.freed.append(rid)

    @invariant()
    def consistent(self):
        if hasattr(self, "bm"):
            self.bm._check_invariants()
            referenced = {p for rid in self.live for p in self.bm.block_table(rid)}
            assert self.bm.num_free_pages == self.bm.num_usable_pages - len(referenced)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for rid in list(self.live):
            self._free(rid)
        self.bm._check_invariants()
        assert self.bm.num_free_pages == self.bm.num_usable_pages  # nothing leaked
        assert self.bm.usage == 0.0


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_manager_random_operations = BlockManagerMachine.TestCase
