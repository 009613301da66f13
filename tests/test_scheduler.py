"""Scheduler stories: pure host code, exact tokens per step, page counts, preemption order."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxserve.config import SchedulerConfig
from jaxserve.kv_cache.block_manager import BlockManager
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import QueueFullError, Scheduler

EOS = 2


def make(num_pages=64, page_size=4, prefix=True, **cfg):
    cfg = {"max_num_batched_tokens": 16, "max_num_seqs": 8, "max_model_len": 64, **cfg}
    bm = BlockManager(num_pages, page_size, model_id="m", enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(**cfg), bm), bm


def req(rid, n_prompt, max_tokens=8, priority=0, arrival=0.0, base=100, **params):
    prompt = [base + i for i in range(n_prompt)]
    params.setdefault("max_tokens", max_tokens)
    return Request(
        rid, prompt, SamplingParams(**params), max_tokens, eos_token_ids=(EOS,), priority=priority, arrival_time=arrival
    )


def run_step(s, token=7):
    out = s.schedule()
    plan = [(x.request.request_id, x.start, x.num_tokens, x.samples) for x in out.scheduled]
    updates = s.update(out, [[token] if x.samples else None for x in out.scheduled])
    return plan, out, updates


def test_host_modules_never_import_jax():
    code = (
        "import sys; import jaxserve.scheduler, jaxserve.request, jaxserve.sampling_params, "
        "jaxserve.kv_cache.block_manager, jaxserve.detokenizer; "
        "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decodes_first_then_chunked_prompt_shares_the_step():
    s, bm = make()
    s.add_request(req("a", 3))
    plan, *_ = run_step(s)
    assert plan == [("a", 0, 3, True)]
    s.add_request(req("b", 40))  # longer than the 16-token budget: chunked
    plan, *_ = run_step(s)
    assert plan == [("a", 3, 1, True), ("b", 0, 15, False)]
    plan, *_ = run_step(s)
    assert plan == [("a", 4, 1, True), ("b", 15, 15, False)]
    plan, *_ = run_step(s)
    assert plan == [("a", 5, 1, True), ("b", 30, 10, True)]  # the chunk that catches up samples
    plan, *_ = run_step(s)
    assert plan == [("a", 6, 1, True), ("b", 40, 1, True)]
    bm._check_invariants()


def test_budget_and_sequence_cap():
    s, _ = make(max_num_seqs=2)
    for i in range(4):
        s.add_request(req(f"r{i}", 2, base=10 * i))
    plan, out, _ = run_step(s)
    assert [p[0] for p in plan] == ["r0", "r1"] and out.num_batched_tokens == 4
    assert [r.request_id for r in s.waiting] == ["r2", "r3"]


def test_stop_conditions_free_pages():
    s, bm = make()
    s.add_request(req("len", 3, max_tokens=2))
    s.add_request(req("eos", 3, base=200))
    s.add_request(req("stopid", 3, base=300, stop_token_ids=[9]))
    s.add_request(req("min", 3, base=400, min_tokens=2))
    plan, out, updates = run_step(s, token=EOS)
    finished = {u.request.request_id: u.request.status for u in updates if u.finished}
    # EOS ends "eos" and "len" (not ignore_eos); "min" must reach min_tokens first
    assert finished == {
        "len": RequestStatus.FINISHED_STOPPED,
        "eos": RequestStatus.FINISHED_STOPPED,
        "stopid": RequestStatus.FINISHED_STOPPED,
    }
    assert s.requests.keys() == {"min"}
    _, _, updates = run_step(s, token=9)  # not a stop id of "min"; 2 tokens = min_tokens reached
    assert not updates[0].finished
    _, _, updates = run_step(s, token=EOS)
    assert updates[0].finished and updates[0].request.status is RequestStatus.FINISHED_STOPPED
    assert bm.num_free_pages == bm.num_usable_pages


def test_length_limit_and_stop_token_reason():
    s, _ = make()
    r = req("x", 3, max_tokens=3, stop_token_ids=[9])
    s.add_request(r)
    for _ in range(2):
        run_step(s)
    _, _, updates = run_step(s, token=9)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 9
    r2 = req("y", 3, max_tokens=3)
    s.add_request(r2)
    for _ in range(3):
        run_step(s)
    assert r2.status is RequestStatus.FINISHED_LENGTH and r2.output_token_ids == [7, 7, 7]


def test_preempts_lowest_priority_newest_and_resumes_by_recompute():
    # 6 usable pages of 4 tokens; three 8-token prompts take 2 pages each, then every decode past 12 needs more.
    s, bm = make(num_pages=7, prefix=False, max_num_batched_tokens=32, max_model_len=24)
    for i, name in enumerate(["old", "mid", "new"]):
        s.add_request(req(name, 8, max_tokens=12, arrival=float(i), base=100 * i))
    story = []
    while s.requests:
        plan, out, _ = run_step(s)
        story.append((plan, out.preempted))
        bm._check_invariants()
    decode = lambda name, start: (name, start, 1, True)  # noqa: E731
    assert story[0] == ([("old", 0, 8, True), ("mid", 0, 8, True), ("new", 0, 8, True)], [])
    # "old" needs a 3rd page: the newest ("new") is preempted; "mid" gets the page it frees
    assert story[1] == ([decode("old", 8), decode("mid", 8)], ["new"])
    # at 12 tokens both need a 4th page: now "mid" is the newest running one
    assert story[5] == ([decode("old", 12)], ["mid"])
    assert story[11] == ([decode("old", 18)], [])  # "old" finishes: 12 tokens
    # "mid" resumes: its prompt and its 5 outputs recomputed in one chunk, and it samples right away
    assert story[12] == ([("mid", 0, 13, True)], [])
    assert story[19] == ([("new", 0, 9, True)], [])  # "new" had 1 output when it was preempted
    assert len(story) == 30 and bm.num_free_pages == bm.num_usable_pages
    assert s.num_preemptions == 2


def test_priority_orders_admission_and_victims():
    s, bm = make(num_pages=5, prefix=False, max_model_len=16)
    s.add_request(req("low", 8, priority=5, arrival=0.0, base=0))
    s.add_request(req("high", 8, priority=-1, arrival=1.0, base=100))
    plan, *_ = run_step(s)
    assert [p[0] for p in plan] == ["high", "low"]  # lower value first, though it came later
    plan, out, _ = run_step(s)
    assert out.preempted == ["low"] and [p[0] for p in plan] == ["high"]


def test_prefix_cache_hit_skips_cached_pages():
    s, bm = make()
    s.add_request(req("a", 10, max_tokens=1))
    run_step(s)  # 10 tokens: 2 full pages cached; "a" finishes (max_tokens 1)
    s.add_request(req("b", 10, max_tokens=1))
    plan, *_ = run_step(s)
    assert plan == [("b", 8, 2, True)]
    assert s.requests == {} and (bm.num_queried_tokens, bm.num_hit_tokens) == (20, 8)


def test_a_lookup_retried_while_memory_is_short_counts_once():
    s, bm = make(num_pages=4, max_model_len=12)  # 3 usable pages of 4 tokens
    s.add_request(req("a", 8, max_tokens=3))
    s.add_request(req("b", 8, max_tokens=3, base=300))
    for _ in range(3):  # "b" waits for pages; its prefix lookup is retried every step
        run_step(s)
    assert s.requests["b"].status is RequestStatus.WAITING and bm.num_queried_tokens == 8
    while s.requests:
        run_step(s)
    assert bm.num_queried_tokens == 16


def test_abort_frees_everything_and_queue_bound():
    s, bm = make(max_waiting_requests=2)
    s.add_request(req("a", 5))
    s.add_request(req("b", 5, base=200))
    with pytest.raises(QueueFullError):
        s.add_request(req("c", 5, base=300))
    run_step(s)
    s.add_request(req("c", 5, base=300))
    assert s.finish_request("a", RequestStatus.FINISHED_ABORTED).status is RequestStatus.FINISHED_ABORTED
    assert s.finish_request("c", RequestStatus.FINISHED_ABORTED) is not None
    assert s.finish_request("nope", RequestStatus.FINISHED_ABORTED) is None
    s.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert bm.num_free_pages == bm.num_usable_pages and not s.running and not s.waiting


def test_a_context_larger_than_the_pages_is_refused():
    with pytest.raises(ValueError, match="max_model_len=64 exceeds the 12 tokens"):
        make(num_pages=4)


def test_rejects_prompt_at_context_end_and_duplicate_ids():
    s, _ = make(max_model_len=16)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("a", 16))
    s.add_request(req("a", 4))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("a", 4))


def test_context_end_finishes_with_length():
    s, _ = make(max_model_len=8)
    r = req("a", 6, max_tokens=100)
    s.add_request(r)
    run_step(s)
    run_step(s)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 8


@pytest.mark.parametrize(
    "field,value",
    [("max_num_seqs", 0), ("max_num_batched_tokens", True), ("max_model_len", 2**40), ("max_waiting_requests", "9")],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SchedulerConfig.{field}"):
        SchedulerConfig(**{field: value})


def test_random_story_keeps_invariants():
    """Many requests, random aborts, tight pages: bookkeeping stays exact and every page comes back."""
    import random

    rnd = random.Random(0)
    s, bm = make(num_pages=20, max_num_batched_tokens=16, max_num_seqs=6, max_model_len=48)
    alive = []
    for step in range(400):
        if rnd.random() < 0.3 and len(s.waiting) < 50:
            rid = f"r{step}"
            s.add_request(
                req(
                    rid,
                    rnd.randint(1, 30),
                    max_tokens=rnd.randint(1, 15),
                    base=rnd.choice([0, 50]),
                    priority=rnd.randint(0, 2),
                    arrival=float(step),
                )
            )
            alive.append(rid)
        if alive and rnd.random() < 0.1:
            s.finish_request(alive.pop(rnd.randrange(len(alive))), RequestStatus.FINISHED_ABORTED)
        run_step(s, token=rnd.randint(3, 50))
        bm._check_invariants()
        for r in s.running:
            assert len(bm.block_table(r.request_id)) * bm.page_size >= r.num_computed_tokens
    while s.requests:
        run_step(s, token=5)
    assert bm.num_free_pages == bm.num_usable_pages
    assert s.num_preemptions > 0


# ---- proposals (speculative decoding) -----------------------------------------------------------------------


def sched(budget, pages):
    return make(num_pages=pages, max_num_batched_tokens=budget, max_num_seqs=min(8, budget))[0]


def _decoding(s, rid="a", n_prompt=5, **kw):
    """A request past its prompt: it has sampled one token and decodes from here."""
    s.add_request(req(rid, n_prompt, **kw))
    while not s.requests[rid].output_token_ids:
        run_step(s)
    return s.requests[rid]


def test_proposals_are_scheduled_after_the_last_token_and_verified():
    s = sched(budget=16, pages=32)
    a = _decoding(s, max_tokens=20)
    a.spec_token_ids = [11, 12, 13]
    out = s.schedule()
    (item,) = out.scheduled
    assert (item.start, item.num_tokens, item.spec_token_ids, item.samples) == (5, 4, [11, 12, 13], True)
    assert item.token_ids == [7, 11, 12, 13]  # the last sampled token, then the proposals
    (u,) = s.update(out, [[11, 12, 9]])  # two accepted, then the step's own token
    assert u.new_token_ids == [11, 12, 9] and a.output_token_ids == [7, 11, 12, 9]
    assert a.num_computed_tokens == a.num_tokens - 1 == 8  # KV of the real token and the accepted proposals only
    assert a.spec_token_ids == []  # proposals are per step
    with pytest.raises(ValueError):  # what a step emits must follow its proposals
        a.spec_token_ids = [1, 2]
        bad = s.schedule()
        s.update(bad, [[3, 4]])


def test_proposals_fit_the_budget_the_context_and_max_tokens():
    s = sched(budget=3, pages=32)
    a = _decoding(s, max_tokens=20)
    a.spec_token_ids = [1, 2, 3, 4, 5]
    (item,) = s.schedule().scheduled
    assert item.spec_token_ids == [1, 2] and item.num_tokens == 3  # budget 3: the token and two proposals
    s2 = sched(budget=16, pages=32)
    b = _decoding(s2, max_tokens=3)  # one token out, two left: at most one proposal (the step adds one more)
    b.spec_token_ids = [1, 2, 3]
    (item,) = s2.schedule().scheduled
    assert item.spec_token_ids == [1]


def test_a_stop_inside_an_accepted_run_ends_it_there():
    s = sched(budget=16, pages=32)
    a = _decoding(s, max_tokens=20, stop_token_ids=[12])
    a.spec_token_ids = [11, 12, 13]
    out = s.schedule()
    (u,) = s.update(out, [[11, 12, 13, 14]])  # all accepted, but 12 is a stop id
    assert u.finished and u.new_token_ids == [11, 12] and a.output_token_ids == [7, 11, 12]
    assert a.status is RequestStatus.FINISHED_STOPPED and a.request_id not in s.requests
