"""The engine on the real SmolLM2-135M (fp32): batching, chunked prefill, preemption and prefix hits give
token-identical greedy output; aborts return every page; seeds reproduce; nothing compiles after warm-up."""

from __future__ import annotations

import random

import pytest

from jaxserve.engine import LLMEngine
from jaxserve.llm import LLM, engine_config
from jaxserve.sampling import SamplingParams
from tests.engine_runs import run_all

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def real_engine(real_model):
    """16 sequences, 256-token steps, the pool sized automatically (capped at 16 full-length sequences)."""
    return LLMEngine(
        real_model,
        engine_config(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256, token_buckets=(1, 16, 64, 256)),
    )


def tight(real_model, pages: int, **options) -> LLMEngine:
    """16-token steps (every prompt is chunked; `options` may change that), 4 sequences, `pages` usable pages of
    16 (SmolLM2: 30 layers, 3 KV heads of 64, f32): long sequences get preempted."""
    bytes_per_page = 2 * 30 * 16 * 3 * 64 * 4
    shape = dict(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=16, token_buckets=(1, 16))
    return LLMEngine(real_model, engine_config(kv_cache_memory=(pages + 1) * bytes_per_page, **(shape | options)))


@pytest.fixture(scope="module")
def tight_engine(real_model):
    """40 pages of 16: 4 of the longest prompts overflow them together."""
    return tight(real_model, 40)


def texts(tok, n, seed=0):
    """n prompts of different lengths (8 to ~300 tokens) from a pool of real sentences."""
    words = (
        "the cat sat on a mat while the model of a language predicted every next token with care and the "
        "cache of keys and values grew page by page as the scheduler mixed prompts and decodes"
    ).split()
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        length = 8 + (i * 37) % 300
        ids = tok.encode(" ".join(rnd.choice(words) for _ in range(length)))[:length]
        out.append(ids)
    return out


def run(engine, prompts, params, tag="r"):
    """Token ids of each prompt's (first) completion, in order."""
    done = run_all(engine, prompts, params, tag)
    return [done[i].outputs[0].token_ids for i in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts16(real_engine):
    return texts(real_engine.tokenizer, 16)


@pytest.fixture(scope="module")
def alone16(real_engine, prompts16):
    return [run(real_engine, [p], GREEDY)[0] for p in prompts16]


def test_16_prompts_batched_equal_each_alone(real_engine, prompts16, alone16):
    base = real_engine.runner.compiles_since_warmup
    together = run(real_engine, prompts16, GREEDY)
    assert together == alone16
    assert real_engine.runner.compiles_since_warmup == base


def test_chunked_and_preempted_equal_uninterrupted(tight_engine, prompts16, alone16):
    idx = [15, 14, 13, 12, 11, 10]  # the longest prompts: 4 of them exceed the 40-page pool together
    before = tight_engine.scheduler.num_preemptions
    got = run(tight_engine, [prompts16[i] for i in idx], GREEDY)
    assert tight_engine.scheduler.num_preemptions > before
    assert got == [alone16[i] for i in idx]


def check_speculation_exact(engine, prompts16, alone16):
    """The 16 prompts all at once over 16-token steps (prompts chunked), 4 sequences and a tight pool (long ones
    preempted), then again on their cached pages: the same greedy tokens as each prompt alone without
    speculation; proposals were accepted, not all of them; nothing compiled after warm-up."""
    base = engine.runner.compiles_since_warmup
    assert run(engine, prompts16[::-1], GREEDY) == alone16[::-1]  # (longest first: any two of them overflow the pool)
    assert engine.scheduler.num_preemptions > 0
    hits = engine.block_manager.num_hit_tokens
    assert run(engine, prompts16[::3], GREEDY, tag="again") == alone16[::3]
    assert engine.block_manager.num_hit_tokens > hits
    st = engine.spec_stats
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens
    assert engine.runner.compiles_since_warmup == base
    return st


def test_ngram_speculation_is_exact_batched_chunked_preempted_and_on_prefix_hits(real_model, prompts16, alone16):
    engine = tight(real_model, 33, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    check_speculation_exact(engine, prompts16, alone16)


def test_draft_model_speculation_is_exact_batched_chunked_preempted_and_on_prefix_hits(real_model, prompts16, alone16):
    """The real model's own weights in int4 as its draft (a self-speculative pair, k 4): exact as above, and
    the draft agrees with the fp32 target on most proposals; its pages all come back. 64-token steps: at 16 the
    draft's sequences decode so fast that one finishes before the next has prefilled enough to overflow."""
    spec = {"method": "draft_model", "model": real_model.path, "num_speculative_tokens": 4, "quantization": "int4"}
    engine = tight(real_model, 33, max_num_batched_tokens=64, token_buckets=(1, 16, 64), speculative_config=spec)
    assert engine.proposer.model.quantization == "int4"
    st = check_speculation_exact(engine, prompts16, alone16)
    assert st.acceptance_rate > 0.5
    draft_pages = engine.proposer.block_manager
    assert draft_pages.num_free_pages == draft_pages.num_usable_pages


def test_prefix_hit_equals_miss(real_engine, prompts16, alone16):
    shared = prompts16[14]
    miss_rate = real_engine.block_manager.hit_rate
    hit = run(real_engine, [shared], GREEDY)[0]
    assert hit == alone16[14]
    assert real_engine.block_manager.hit_rate > miss_rate >= 0  # alone16 cached these pages already


def test_abort_storm_and_seeds(real_engine, prompts16):
    rnd = random.Random(3)
    sp = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=20, seed=77, ignore_eos=True)
    alone = run(real_engine, [prompts16[3]], sp)[0]
    for i, p in enumerate(prompts16):
        real_engine.add_request(f"storm{i}", p, SamplingParams(temperature=1.0, max_tokens=40, seed=i))
    steps = 0
    while real_engine.has_unfinished_requests():
        steps += 1
        for i in range(16):
            if rnd.random() < 0.08:
                real_engine.abort_request(f"storm{i}")
        real_engine.step()
    bm = real_engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    bm._check_invariants()
    others = [SamplingParams(temperature=0.7, max_tokens=30, seed=k) for k in range(5)]
    batch = run(real_engine, [prompts16[3], *prompts16[5:10]], [sp, *others])[0]
    assert batch == alone


def test_llm_api_on_the_real_model(real_engine):
    llm = LLM.from_engine(real_engine)
    outs = llm.chat(
        [
            [{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Name a primary colour."}],
        ],
        SamplingParams(temperature=0.0, max_tokens=24),
        use_tqdm=False,
    )
    assert "Paris" in outs[0].outputs[0].text
    assert outs[1].outputs[0].finish_reason in ("stop", "length") and outs[1].outputs[0].text.strip()
    stop = llm.generate(
        "The capital of France is", SamplingParams(temperature=0.0, max_tokens=24, stop=["."]), use_tqdm=False
    )[0].outputs[0]
    assert "." not in stop.text and stop.finish_reason == "stop" and stop.stop_reason == "."


def test_batch_job_on_the_real_model(real_engine, tmp_path):
    """A JSONL job (both line forms) gives the Python API's greedy text; a bad line lands in the errors file."""
    import json

    from jaxserve.batch import BatchJob, errors_path_for, recover

    question = [{"role": "user", "content": "What is the capital of France?"}]
    rows = [
        {"id": "q", "messages": question, "max_tokens": 24, "temperature": 0},
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "smollm2", "prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0},
        },
        {"id": "bad", "prompt": "x", "top_p": 2},
    ]
    inp, out = tmp_path / "in.jsonl", str(tmp_path / "out.jsonl")
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = BatchJob(real_engine, str(inp), out, progress=False).run()
    assert (summary.done, summary.errors) == (2, 1)
    results = {r.get("custom_id", r.get("id")): r for r in recover(out)}
    llm = LLM.from_engine(real_engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    assert results["q"]["text"] == llm.chat(question, greedy, use_tqdm=False)[0].outputs[0].text
    assert "Paris" in results["q"]["text"]
    expected = llm.generate("The three primary colors are", greedy, use_tqdm=False)[0].outputs[0].text
    assert results["c"]["response"]["body"]["choices"][0]["text"] == expected
    [error] = recover(errors_path_for(out), errors=True)
    assert (error["line"], error["id"], error["error"]["param"]) == (3, "bad", "top_p")
