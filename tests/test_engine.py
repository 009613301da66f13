"""The engine on a tiny random-weight model: batching, chunking, preemption and prefix hits change nothing in the
output; aborts give every page back; seeds, stop strings, n, logprobs, min_tokens; AsyncEngine and LLM."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import numpy as np
import pytest

from jaxserve.async_engine import AsyncEngine
from jaxserve.engine import LLMEngine, PromptTooLongError
from jaxserve.llm import LLM, engine_config
from jaxserve.sampling import SamplingParams
from tests.engine_runs import run_all as run
from tests.engine_runs import run_to_end
from tests.tiny_models import TINY, bytes_per_page

PAGE = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    """Budget 32 tokens, 8 sequences, pages to spare."""
    return LLMEngine(
        tiny_model,
        engine_config(
            max_model_len=128,
            max_num_seqs=8,
            max_num_batched_tokens=32,
            page_size=PAGE,
            kv_cache_memory=64 * bytes_per_page(PAGE),
            token_buckets=(8, 32),
        ),
    )


@pytest.fixture(scope="module")
def small_engine(tiny_model):
    """Budget 8 tokens (prompts are chunked), 4 sequences, 17 usable pages: too few for 4 long sequences."""
    return LLMEngine(
        tiny_model,
        engine_config(
            max_model_len=128,
            max_num_seqs=4,
            max_num_batched_tokens=8,
            page_size=PAGE,
            kv_cache_memory=18 * bytes_per_page(PAGE),
            token_buckets=(8,),
        ),
    )


def prompts(n, seed=0, lo=3, hi=60):
    rnd = random.Random(seed)
    return [[rnd.randrange(3, TINY.vocab_size) for _ in range(rnd.randint(lo, hi))] for _ in range(n)]


def tokens(outs):
    return [outs[i].outputs[0].token_ids for i in range(len(outs))]


def test_batched_equals_sequential(engine):
    ps = prompts(8)
    together = tokens(run(engine, ps, GREEDY))
    alone = [tokens(run(engine, [p], GREEDY))[0] for p in ps]
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_chunked_prefill_and_preemption_change_nothing(engine, small_engine):
    ps = prompts(6, seed=1, lo=30, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = tokens(run(engine, ps, params))
    before = small_engine.scheduler.num_preemptions
    chunked = tokens(run(small_engine, ps, params))  # 8-token steps; 4 x ~90 tokens > 17 pages of 8
    assert small_engine.scheduler.num_preemptions > before
    assert chunked == reference


def test_prefix_cache_hit_equals_miss(engine):
    p = prompts(1, seed=2, lo=40, hi=40)[0]
    miss = run(engine, [p], GREEDY)[0]
    hit = run(engine, [p], GREEDY)[0]
    assert hit.num_cached_tokens == 32 and miss.num_cached_tokens < 32  # 4 full pages of 8, last token recomputed
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    assert engine.block_manager.hit_rate > 0


def test_cache_salt_separates_the_prefix_cache(engine):
    """Issue 15 item 5: a salted request hits only pages cached under its own salt (never the unsalted pool or
    another salt's), so usage.cached_tokens says nothing about other tenants' prompts; the output is the same."""
    p = prompts(1, seed=21, lo=40, hi=40)[0]

    def one(salt):
        engine.add_request("salted", p, GREEDY, cache_salt=salt)
        return run_to_end(engine)["salted"]

    plain = one(None)
    assert one(None).num_cached_tokens == 32  # the unsalted pool hits
    assert one("tenant-a").num_cached_tokens == 0  # not the unsalted pool's pages
    assert one("tenant-b").num_cached_tokens == 0  # nor another salt's
    again = one("tenant-a")
    assert again.num_cached_tokens == 32 and again.outputs[0].token_ids == plain.outputs[0].token_ids
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    bm._check_invariants()
    with pytest.raises(ValueError, match="cache_salt"):
        engine.add_request("bad-salt", p, GREEDY, cache_salt="")


def test_abort_storm_returns_every_page(engine):
    rnd = random.Random(5)
    ps = prompts(30, seed=5)
    live = set()
    for i, p in enumerate(ps):
        engine.add_request(f"storm{i}", p, SamplingParams(temperature=0.8, max_tokens=rnd.randint(1, 40), seed=i))
        live.add(f"storm{i}")
    while engine.has_unfinished_requests():
        for rid in [r for r in live if rnd.random() < 0.15]:
            out = engine.abort_request(rid)
            assert out is None or (out.finished and out.outputs[0].finish_reason in ("abort", "length"))
            live.discard(rid)
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages and not engine.scheduler.running
    bm._check_invariants()
    p = prompts(1, seed=6)[0]  # still serving, and still right
    assert tokens(run(engine, [p], GREEDY)) == tokens(run(engine, [p], GREEDY))


def test_same_seed_same_text_alone_and_in_a_batch(engine):
    ps = prompts(5, seed=7)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    others = [SamplingParams(temperature=0.7, max_tokens=20, seed=k, ignore_eos=True) for k in range(4)]
    alone = run(engine, [ps[0]], sp)[0].outputs[0]
    batch = run(engine, ps, [sp, *others])[0].outputs[0]
    assert alone.token_ids == batch.token_ids and alone.text == batch.text
    unseeded = [
        run(engine, [ps[0]], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True))[0] for _ in range(2)
    ]
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_logit_bias_steers_the_real_step_batched_with_plain_requests(engine):
    ps = prompts(3, seed=21)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain = run(engine, ps, greedy)
    first = plain[1].outputs[0].token_ids[0]
    forced = dataclasses.replace(greedy, logit_bias={77: 100})
    avoid = dataclasses.replace(greedy, logit_bias={first: -100})
    out = run(engine, ps, [greedy, avoid, forced])  # one batch: a row's bias touches no other row
    assert out[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert out[1].outputs[0].token_ids[0] != first
    assert out[2].outputs[0].token_ids == [77] * 6
    with pytest.raises(ValueError, match=r"logit_bias: token ids out of the vocabulary \[0, 260\)"):
        engine.add_request("bias-oov", ps[0], dataclasses.replace(greedy, logit_bias={260: 1}))
    assert not engine.has_unfinished_requests()


def test_nothing_compiles_after_warmup(engine):
    base = engine.runner.compiles_since_warmup
    ps = prompts(10, seed=8, lo=1, hi=100)
    mixed = [
        SamplingParams(
            temperature=t,
            top_k=k,
            min_p=0.05 * (i % 2),
            presence_penalty=0.5 * (i % 3),
            repetition_penalty=1.0 + 0.2 * (i % 2),
            logprobs=(i % 4) or None,
            max_tokens=5 + i,
            seed=i,
        )
        for i, (t, k) in enumerate([(0.0, 0), (1.0, 5)] * 5)
    ]
    run(engine, ps, mixed)
    assert engine.runner.compiles_since_warmup == base  # process-wide counter: other engines compiled earlier


def test_token_history_is_built_only_for_steps_with_penalties(engine, monkeypatch):
    from jaxserve import model_runner

    built = []
    real = model_runner.SamplingTensors.build

    def build(rows, num_rows, history_len):
        built.append(history_len)
        return real(rows, num_rows, history_len)

    monkeypatch.setattr(model_runner.SamplingTensors, "build", staticmethod(build))
    plain = run(engine, prompts(2, seed=3), [SamplingParams(temperature=0.0, max_tokens=4)] * 2)
    assert built and set(built) == {1}  # no penalty: a [S, 1] stub, the device's -1 block stands in
    built.clear()
    penalized = run(
        engine,
        prompts(2, seed=3),
        [SamplingParams(temperature=0.0, max_tokens=4, presence_penalty=1.5, repetition_penalty=1.3)] * 2,
    )
    assert set(built) == {engine.runner.max_model_len}
    assert tokens(plain) != tokens(penalized)  # the history is read, and used


def test_stop_strings_cut_the_text_and_never_leak(engine):
    p = prompts(1, seed=9)[0]
    base = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = base.text
    stop = text[10:13]
    assert len(stop) == 3 and stop not in text[:12]
    engine.add_request("s", p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop, "\x00\x00"]))
    deltas, last = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            last = out
    assert "".join(deltas) == last.outputs[0].text == text[: text.index(stop)]
    assert last.outputs[0].finish_reason == "stop" and last.outputs[0].stop_reason == stop
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages


def test_n_logprobs_min_tokens_and_stop_token_ids(engine):
    p = prompts(1, seed=10)[0]
    out = run(engine, [p], SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=5, logprobs=3, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    for o in out.outputs:
        assert len(o.logprobs) == 10
        for tok, entry in zip(o.token_ids, o.logprobs):
            assert tok in entry and len(entry) >= 3
            top = sorted(entry.values(), key=lambda lp: lp.rank)
            assert top[0].rank == 1 and all(a.logprob >= b.logprob for a, b in zip(top, top[1:]))
        assert o.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(o.token_ids, o.logprobs)))
    first = run(engine, [p], GREEDY)[0].outputs[0].token_ids[0]
    stopped = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[first]))[0].outputs[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop" and stopped.stop_reason == first
    held = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[first], min_tokens=1))[
        0
    ].outputs[0]
    assert held.token_ids[0] != first


def test_bad_requests_are_refused_and_nothing_is_queued(engine):
    with pytest.raises(PromptTooLongError, match="max_model_len=128"):
        engine.add_request("long", [5] * 128, GREEDY)
    with pytest.raises(ValueError, match="prompt: token ids out of range"):
        engine.add_request("oov", [TINY.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="priority"):
        engine.add_request("prio", [5], GREEDY, priority=True)
    with pytest.raises(ValueError, match="priority: -3: this server schedules in arrival order") as e:
        engine.add_request("prio", [5], GREEDY, priority=-3)  # fcfs (the default): no client jumps the queue
    assert e.value.field == "priority"
    many_eos = SamplingParams(min_tokens=4, stop_token_ids=list(range(10, 26)))
    with pytest.MonkeyPatch.context() as m:  # a model with 20 EOS ids: 16 stop ids + 20 do not fit the 32 bans
        m.setattr(engine.tokenizer, "eos_token_ids", tuple(range(30, 50)))
        with pytest.raises(ValueError, match="stop_token_ids: 16 stop token ids and this model's 20 EOS ids"):
            engine.add_request("bans", [5], many_eos)
        engine.add_request("bans-ok", [5], dataclasses.replace(many_eos, ignore_eos=True, max_tokens=5))
        assert len(run_to_end(engine)["bans-ok"].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="every element must be an int"):
        engine.add_request("float", [5, 6.7], GREEDY)
    assert not engine.has_unfinished_requests()
    engine.add_request("0_x", [5], GREEDY)  # n > 1 names its sequences "{k}_{id}": a clash is refused whole
    with pytest.raises(ValueError, match="'0_x' is already in use"):
        engine.add_request("x", [5], SamplingParams(n=2, max_tokens=2))
    assert engine.num_unfinished_requests == 1 and len(engine.scheduler.waiting) == 1
    engine.abort_request("0_x")
    assert not engine.has_unfinished_requests()
    out = run(engine, [[5] * 120], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].finish_reason == "length"  # the context's end


def test_llm_api_keeps_order_and_text(engine):
    llm = LLM.from_engine(engine)
    outs = llm.generate(["hello", {"prompt": "abc"}, {"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello", "abc", None]
    assert outs[2].prompt_token_ids == [5, 6, 7]
    tok = engine.tokenizer
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "length" and c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    chat = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    assert chat[0].prompt.startswith("<|im_start|>user\nhi")
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        llm.generate(["ok", 3.5], GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_async_engine_streams_and_aborts(engine):
    ps = prompts(3, seed=11)
    want = tokens(run(engine, ps, GREEDY, prefix="ref"))  # the same prompts through the sync engine
    # (the loop thread starts only now: started first, it could step the engine while the run above steps it,
    # two steps donating the same KV buffers: "Buffer has been deleted or donated", seen once in a suite run)
    aeng = AsyncEngine(engine)

    async def consume(i, p, abort_after=None):
        deltas, last = [], None
        async for out in aeng.generate(p, GREEDY, request_id=f"a{i}"):
            deltas.append(out.outputs[0].delta_token_ids)
            last = out
            if abort_after is not None and len(deltas) == abort_after:
                await aeng.abort(f"a{i}")
        return [t for d in deltas for t in d], last

    async def main():
        return await asyncio.gather(consume(0, ps[0]), consume(1, ps[1], abort_after=3), consume(2, ps[2]))

    try:
        (t0, o0), (t1, o1), (t2, o2) = asyncio.run(main())
        assert t0 == want[0] and t2 == want[2] and o0.finished and o2.outputs[0].finish_reason == "length"
        assert o1.outputs[0].finish_reason == "abort" and t1 == want[1][: len(t1)] and len(t1) < 12

        async def bad():
            async for _ in aeng.generate([], GREEDY):
                pass

        with pytest.raises(ValueError, match="empty"):
            asyncio.run(bad())
    finally:
        aeng.shutdown()
    assert engine.block_manager.num_free_pages == engine.block_manager.num_usable_pages
    assert not engine.has_unfinished_requests()


def test_logprobs_match_the_model(engine):
    """The reported logprob of a greedy token is log_softmax of the step's logits (checked on the first token
    against the engine's own teacher-forced logits of the prompt)."""
    p = prompts(1, seed=12)[0]
    out = run(engine, [p], SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))[0].outputs[0]
    logits = engine.prompt_logits(p)[-1].astype(np.float64)
    ref = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    entry = out.logprobs[0]
    for tok, lp in entry.items():
        assert lp.logprob == pytest.approx(ref[tok], abs=1e-4)
        assert lp.rank == 1 + int(np.sum(ref > ref[tok]))


def test_the_priority_policy_orders_by_the_requests_priorities(tiny_model):
    """--scheduling-policy priority: one sequence a step, the later but more urgent request runs first."""
    engine = LLMEngine(
        tiny_model,
        engine_config(
            max_model_len=128,
            max_num_seqs=1,
            max_num_batched_tokens=8,
            page_size=PAGE,
            token_buckets=(8,),
            scheduling_policy="priority",
        ),
    )
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("late", [5, 6], params, priority=5)
    engine.add_request("urgent", [7, 8], params, priority=-1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "late"]
