"""Speculative decoding in the engine, on a tiny random-weight model: with proposals verified in the ragged step
the output is token-identical to plain decoding, greedy and seeded (row j draws with plain decoding's key, bans
and penalty history), batched, chunked, preempted and with prefix hits; proposals that are all right or all
wrong change nothing but the step count; a stop inside an accepted run ends it there; nothing compiles after
warm-up; the distribution of unseeded draws is unchanged (chi-square), while an acceptance that is wrong on
purpose is caught by the same test."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from jaxserve.engine import LLMEngine
from jaxserve.llm import engine_config
from jaxserve.sampling import SamplingParams
from tests.engine_runs import run_all
from tests.tiny_models import TINY, bytes_per_page

PAGE = 8
# disable_by_batch_size None: speculation at every batch size (the default turns it off at 8 running sequences)
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
    "disable_by_batch_size": None,
}


def make(model, spec=None, *, small=False):
    """Budget 32 tokens and 8 sequences with pages to spare, or (small) budget 8, 4 sequences and 17 pages:
    prompts are chunked and long sequences preempt each other."""
    size = (
        dict(max_num_seqs=4, max_num_batched_tokens=8, kv_cache_memory=18 * bytes_per_page(PAGE), token_buckets=(8,))
        if small
        else dict(
            max_num_seqs=8, max_num_batched_tokens=32, kv_cache_memory=64 * bytes_per_page(PAGE), token_buckets=(8, 32)
        )
    )
    return LLMEngine(model, engine_config(max_model_len=128, page_size=PAGE, speculative_config=spec, **size))


@pytest.fixture(scope="module")
def plain(tiny_model):
    return make(tiny_model)


@pytest.fixture(scope="module")
def spec(tiny_model):
    return make(tiny_model, NGRAM)


@pytest.fixture(scope="module")
def spec_small(tiny_model):
    return make(tiny_model, NGRAM, small=True)


def prompts(n, seed=0, lo=3, hi=60):
    """Random prompts, each with a stretch repeated (a lookup hit for the n-gram proposer)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rnd.randrange(3, TINY.vocab_size) for _ in range(rnd.randint(lo, hi))]
        out.append(p + p[: rnd.randint(2, 8)])
    return out


def token_lists(outs):
    return [outs[i].outputs[0].token_ids for i in range(len(outs))]


class Oracle:
    """Proposes the continuation a plain run produced (right: every proposal accepted) or, `wrong`, a token
    that is never it (every proposal rejected)."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], wrong: bool = False):
        self.k = 4
        self.continuations = continuations
        self.wrong = wrong

    def propose(self, token_ids):
        for prompt, cont in self.continuations.items():
            n = len(prompt)
            if tuple(token_ids[:n]) == prompt and len(token_ids) - n <= len(cont):
                ahead = cont[len(token_ids) - n : len(token_ids) - n + self.k]
                return [(t + 1) % TINY.vocab_size for t in ahead] if self.wrong else ahead
        return []


def stats(engine):
    s = engine.spec_stats
    return s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens


def test_greedy_batched_chunked_preempted_and_prefix_hits_equal_plain(plain, spec, spec_small):
    ps = prompts(8)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = token_lists(run_all(plain, ps, greedy))
    compiles = spec.runner.compiles_since_warmup  # (a process-wide counter: taken once all three exist)
    before = stats(spec)
    assert token_lists(run_all(spec, ps, greedy)) == want
    drafts, proposed, accepted = (a - b for a, b in zip(stats(spec), before))
    assert drafts > 0 and 0 < accepted < proposed  # speculation really ran, and both outcomes happened
    hits = spec.block_manager.num_hit_tokens
    assert token_lists(run_all(spec, ps, greedy, prefix="again")) == want  # the prompts' pages now hit
    assert spec.block_manager.num_hit_tokens > hits
    preempted = spec_small.scheduler.num_preemptions
    assert token_lists(run_all(spec_small, ps, greedy)) == want  # budget 8: chunked, 17 pages: preempted
    assert spec_small.scheduler.num_preemptions > preempted
    assert spec.runner.compiles_since_warmup == compiles  # nothing compiled with speculation on


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=7, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(temperature=0.0, max_tokens=30, presence_penalty=0.5, min_tokens=12, logprobs=3),
    ],
    ids=["seeded", "filters", "penalties", "greedy_min_tokens_logprobs"],
)
def test_seeded_sampling_and_every_row_setting_equal_plain(plain, spec, params):
    """Row j draws exactly as plain decoding's step j: so right proposals are all accepted and the tokens, their
    logprobs and the finish are the same (penalties see the proposals before each row; min_tokens bans apply by
    the row's own step)."""
    ps = prompts(4, seed=1)
    want = run_all(plain, ps, params)
    cont = {tuple(p): want[i].outputs[0].token_ids for i, p in enumerate(ps)}
    saved = spec.proposer
    try:
        spec.proposer = Oracle(cont)
        before = stats(spec)
        got = run_all(spec, ps, params)
        drafts, proposed, accepted = (a - b for a, b in zip(stats(spec), before))
        assert proposed > 0 and accepted == proposed  # every right proposal accepted
        spec.proposer = Oracle(cont, wrong=True)
        before = stats(spec)
        wrong = run_all(spec, ps, params)
        drafts, proposed, accepted = (a - b for a, b in zip(stats(spec), before))
        assert proposed > 0 and accepted == 0
    finally:
        spec.proposer = saved
    for outs in (got, wrong):
        for i in range(len(ps)):
            a, b = want[i].outputs[0], outs[i].outputs[0]
            assert (b.token_ids, b.finish_reason, b.text) == (a.token_ids, a.finish_reason, a.text)
            if params.logprobs is not None:
                assert [sorted(d) for d in b.logprobs] == [sorted(d) for d in a.logprobs]
                np.testing.assert_allclose(
                    [d[t].logprob for d, t in zip(b.logprobs, b.token_ids)],
                    [d[t].logprob for d, t in zip(a.logprobs, a.token_ids)],
                    atol=1e-5,
                )


def test_all_right_proposals_take_fewer_steps(plain, spec):
    ps = prompts(1, seed=2)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    steps = plain.num_steps
    want = run_all(plain, ps, greedy)
    plain_steps = plain.num_steps - steps
    saved = spec.proposer
    try:
        spec.proposer = Oracle({tuple(ps[0]): want[0].outputs[0].token_ids})
        steps = spec.num_steps
        got = run_all(spec, ps, greedy)
    finally:
        spec.proposer = saved
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    # prefill steps, then 5 tokens a step (4 accepted proposals and the bonus) instead of one
    assert spec.num_steps - steps <= plain_steps - 40 + 8 + 1, (spec.num_steps - steps, plain_steps)
    m = got[0].metrics
    assert m.num_draft_tokens > 0 and m.num_accepted_tokens == m.num_draft_tokens and m.acceptance_rate == 1.0


def test_a_stop_inside_an_accepted_run_ends_it_there(plain, spec):
    """Stop token ids, EOS and stop strings inside a run of accepted proposals end the sequence at that token:
    the tokens proposed after it never reach the output."""
    ps = prompts(3, seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    free = run_all(plain, ps, greedy)
    stop_ids = [free[i].outputs[0].token_ids[9] for i in range(3)]  # each sequence's 10th token stops it
    stop_texts = [plain.tokenizer.decode(free[i].outputs[0].token_ids[5:8]) for i in range(3)]
    params = [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[t]) for t in stop_ids]
    params += [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[t]) for t in stop_texts]
    want = run_all(plain, ps + ps, params)
    cont = {tuple(p): free[i].outputs[0].token_ids for i, p in enumerate(ps)}
    saved = spec.proposer
    try:
        spec.proposer = Oracle(cont)
        got = run_all(spec, ps + ps, params)
    finally:
        spec.proposer = saved
    for i in range(6):
        a, b = want[i].outputs[0], got[i].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (
            a.token_ids,
            a.text,
            a.finish_reason,
            a.stop_reason,
        )
        assert len(b.token_ids) < 40


def test_unseeded_draws_keep_their_distribution_and_a_wrong_acceptance_is_caught(plain, spec, monkeypatch):
    """Chi-square (two samples) over many unseeded draws of a token that speculation verifies: with proposals
    its distribution is plain decoding's; an acceptance that always takes the proposal (wrong on purpose) fails
    the same test."""
    prompt = prompts(1, seed=5)[0]
    params = SamplingParams(temperature=1.5, max_tokens=3, ignore_eos=True)
    n = 240

    def draws(engine, proposer=None):  # the second output token: verified against the proposal
        saved = engine.proposer
        engine.proposer = proposer or saved
        try:
            outs = run_all(engine, [prompt] * n, params, prefix="d")
        finally:
            engine.proposer = saved
        return np.array([outs[i].outputs[0].token_ids[1] for i in range(n)])

    base = draws(plain)
    counts = np.bincount(base, minlength=TINY.vocab_size)
    top = np.argsort(-counts)[:5]  # the five likeliest second tokens and "the rest" are the bins

    class Fixed:  # proposes the likeliest second token after any first one
        def propose(self, token_ids):
            return [int(top[0])] * 4 if len(token_ids) == len(prompt) + 1 else []

    def pvalue(sample):
        table = [[(x == t).sum() for t in top] + [(~np.isin(x, top)).sum()] for x in (base, sample)]
        return chi2_contingency(np.array(table)).pvalue

    before = stats(spec)
    assert pvalue(draws(spec, Fixed())) > 1e-3
    drafts, proposed, accepted = (a - b for a, b in zip(stats(spec), before))
    # most requests verified one proposal (not those decoding while 8 others did: the step's 8 sampler rows were
    # theirs); some were accepted, some not
    assert n // 2 < drafts <= n and 0 < accepted < proposed
    original = LLMEngine._count_accepted

    def always(self, item, drawn):  # wrong on purpose: every proposal accepted, whatever the draw
        original(self, item, drawn)
        drawn[: len(item.spec_token_ids)] = item.spec_token_ids
        return len(item.spec_token_ids)

    monkeypatch.setattr(LLMEngine, "_count_accepted", always)
    assert pvalue(draws(spec, Fixed())) < 1e-3


# ---- the draft-model proposer (jaxserve.draft) --------------------------------------------------------------


def draft_spec(path, quantization, k=3):
    return {
        "method": "draft_model",
        "model": path,
        "num_speculative_tokens": k,
        "quantization": quantization,
        "disable_by_batch_size": None,
    }


@pytest.fixture(scope="module")
def drafts(tiny_model):
    """The target's own weights as the draft (every proposal must be accepted), int8 (most), and int8 with the
    small budget (prompts chunked, sequences preempted)."""
    return {
        "self": make(tiny_model, draft_spec(tiny_model.path, "none")),
        "int8": make(tiny_model, draft_spec(tiny_model.path, "int8")),
        "int8_small": make(tiny_model, draft_spec(tiny_model.path, "int8"), small=True),
    }


def test_a_draft_model_is_exact_batched_chunked_preempted_and_on_prefix_hits(plain, drafts):
    ps = prompts(8, seed=6)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = token_lists(run_all(plain, ps, greedy))
    compiles = {name: e.runner.compiles_since_warmup for name, e in drafts.items()}
    for name, engine in drafts.items():
        before, rounds = stats(engine), engine.proposer.num_rounds
        preempted, hits = engine.scheduler.num_preemptions, engine.block_manager.num_hit_tokens
        assert token_lists(run_all(engine, ps, greedy)) == want, name
        if name != "int8_small":
            assert token_lists(run_all(engine, ps, greedy, prefix="again")) == want, name  # prefix hits
            assert engine.block_manager.num_hit_tokens > hits
        else:
            assert engine.scheduler.num_preemptions > preempted
        drafts_run, proposed, accepted = (a - b for a, b in zip(stats(engine), before))
        assert engine.proposer.num_rounds > rounds and drafts_run > 0 and proposed > 0, name
        if name == "self":  # the draft is the target: its KV bookkeeping is right only if it never diverges
            assert accepted == proposed
        else:  # int8 noise flips some of the draft's argmaxes: most, not all, proposals accepted
            assert proposed // 2 < accepted < proposed, (name, proposed, accepted)
        assert engine.runner.compiles_since_warmup == compiles[name]  # nothing compiled with the draft on
        assert not engine.proposer._fed  # every finished sequence's draft pages were given back
        bm = engine.proposer.block_manager
        assert bm.num_free_pages == bm.num_usable_pages


def test_seeded_sampling_with_a_draft_equals_plain(plain, drafts):
    ps = prompts(4, seed=7)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=30, ignore_eos=True)
    want = run_all(plain, ps, params)
    got = run_all(drafts["int8"], ps, params)
    for i in range(len(ps)):
        assert got[i].outputs[0].token_ids == want[i].outputs[0].token_ids
        assert got[i].metrics.num_draft_tokens > 0


def test_unseeded_draws_with_a_draft_keep_their_distribution(plain, drafts):
    """Chi-square over many unseeded draws of a token verified against the draft's proposals."""
    prompt = prompts(1, seed=8)[0]
    params = SamplingParams(temperature=1.5, max_tokens=3, ignore_eos=True)
    n = 240
    base, got = (
        np.array([o.outputs[0].token_ids[1] for o in run_all(e, [prompt] * n, params, prefix="u").values()])
        for e in (plain, drafts["int8"])
    )
    top = np.argsort(-np.bincount(base, minlength=TINY.vocab_size))[:5]
    table = [[(x == t).sum() for t in top] + [(~np.isin(x, top)).sum()] for x in (base, got)]
    assert chi2_contingency(np.array(table)).pvalue > 1e-3


def test_a_draft_with_another_vocabulary_is_refused_at_start(tiny_model, tmp_path):
    import dataclasses

    from jaxserve.draft import DraftMismatchError
    from tests.tiny_models import random_arrays, write_gguf

    other = dataclasses.replace(TINY, vocab_size=264)
    path = tmp_path / "other.gguf"
    write_gguf(path, other, random_arrays(other, seed=1))
    with pytest.raises(DraftMismatchError, match="vocabulary of 264 tokens, the target's has 260"):
        make(tiny_model, draft_spec(str(path), "none"))


def test_default_buckets_hold_one_streams_verification():
    """Speculation's default buckets: the powers of two and k + 1 (one stream verifying k proposals runs in a
    bucket of its own size, not the next power of two); explicit token_buckets are the user's."""
    from jaxserve.engine import verify_buckets

    assert verify_buckets(engine_config(max_model_len=128, max_num_batched_tokens=64), 4) == (1, 2, 4, 5, 8, 16, 32, 64)
    assert verify_buckets(engine_config(max_model_len=128, max_num_batched_tokens=64), 3) == (1, 2, 4, 8, 16, 32, 64)
    assert verify_buckets(engine_config(max_model_len=128, max_num_batched_tokens=4, max_num_seqs=4), 4) == (1, 2, 4)


def test_speculation_switches_off_at_the_default_batch_size(spec, monkeypatch):
    """The default disable_by_batch_size (8): no proposals for a step after which 8 sequences run, proposals
    again once fewer do (the same engine, its config swapped for the default's)."""
    import dataclasses

    from jaxserve.spec_decode import DEFAULT_DISABLE_BY_BATCH_SIZE, SpeculativeConfig

    default = SpeculativeConfig.parse({k: v for k, v in NGRAM.items() if k != "disable_by_batch_size"})
    assert default.disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE == 8
    monkeypatch.setattr(spec, "config", dataclasses.replace(spec.config, speculative_config=default))
    rnd = random.Random(4)
    for i, p in enumerate(prompts(12, seed=4, hi=12)):  # short: 8 fit the pool together
        n = rnd.randint(15, 30)
        spec.add_request(f"off{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    full = proposing = 0  # steps after which 8 sequences run; steps after which proposals were made
    while spec.has_unfinished_requests():
        spec.step()
        running = spec.scheduler.running
        proposed = any(r.spec_token_ids for r in running)
        assert not (proposed and len(running) >= 8), len(running)
        full += len(running) >= 8
        proposing += proposed
    assert full > 0 and proposing > 0
