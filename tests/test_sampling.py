"""SamplingParams validation, SamplingTensors.build, and the on-device sampler against numpy references.

Every device call uses one shape (S rows, V vocab, H history) so the sampler compiles once for the file.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampling import (
    MAX_BANNED,
    MAX_LOGPROBS,
    MAX_STOP,
    MAX_TOP_K,
    SampleRow,
    SamplerOutput,
    SamplingParams,
    SamplingTensors,
    _sort_descending,
    argmax,
    apply_penalties,
    sample,
)

S, V, H = 64, 128, 32
_sample = jax.jit(sample)
_penalize = jax.jit(apply_penalties)


def _row(step=0, seed=0, prompt=(), output=(), banned=(), **kw) -> SampleRow:
    return SampleRow(SamplingParams(**kw), seed, step, prompt, output, banned)


def _run(rows, logits) -> SamplerOutput:
    out = _sample(jnp.asarray(logits, jnp.float32), SamplingTensors.build(rows, S, H))
    return jax.tree.map(np.asarray, out)


def _logits(seed, scale=2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((S, V)) * scale).astype(np.float32)


def _log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _penalties_ref(logits, p: SamplingParams, prompt, output) -> np.ndarray:
    """vLLM v1's apply_penalties for one row, in float32 like the device."""
    x = np.asarray(logits, np.float32).copy()
    seen = np.zeros(len(x), bool)
    seen[list(prompt) + list(output)] = True
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(x)).astype(np.float32)
    rep = np.where(seen, np.float32(p.repetition_penalty), np.float32(1))
    x = x * np.where(x > 0, np.float32(1) / rep, rep)
    x = x - np.float32(p.frequency_penalty) * counts
    return x - np.float32(p.presence_penalty) * (counts > 0)


def _allowed_ref(logits, p: SamplingParams, tol=1e-5) -> set[int]:
    """Tokens temperature -> min_p -> top_k -> top_p may keep (float64, loosened by tol so rounding never
    excludes a token the device rightly keeps)."""
    x = np.asarray(logits, np.float64) / p.temperature
    order = np.argsort(-x, kind="stable")
    desc = x[order]
    keep = np.exp(desc - desc[0]) >= p.min_p - tol
    keep &= np.arange(len(x)) < (len(x) if p.top_k <= 0 else p.top_k)
    d = np.where(keep, desc, -np.inf)
    probs = np.exp(d - d[0]) / np.exp(d - d[0]).sum()
    if p.top_p < 1:
        keep &= np.cumsum(probs) - probs < p.top_p + tol
    return set(order[keep].tolist())


# -- SamplingParams -------------------------------------------------------------------------------------------


def test_defaults_are_vllms_and_hashable():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.logprobs is None and p.stop == () and p.stop_token_ids == ()
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.greedy and not p.has_penalties and SamplingParams(temperature=0).greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert {p: 1}[SamplingParams()] == 1


def test_stop_and_stop_token_ids_normalize_to_tuples():
    assert SamplingParams(stop="###").stop == ("###",)
    a = SamplingParams(stop=["a", "bc"], stop_token_ids=[3, np.int64(7)])
    b = SamplingParams(stop=("a", "bc"), stop_token_ids=(3, 7))
    assert a.stop == ("a", "bc") and a.stop_token_ids == (3, 7)
    assert type(a.stop_token_ids[1]) is int
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert SamplingParams(stop=["x"] * MAX_STOP, stop_token_ids=list(range(MAX_STOP))).stop == ("x",) * MAX_STOP


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=-1),
        dict(top_k=MAX_TOP_K),
        dict(temperature=0),
        dict(temperature=100),
        dict(top_p=1e-9),
        dict(seed=2**63 - 1),
        dict(seed=np.uint64(5)),
        dict(logprobs=0),
        dict(logprobs=MAX_LOGPROBS),
        dict(min_tokens=16),
        dict(max_tokens=None, min_tokens=1000),
        dict(n=64),
        dict(repetition_penalty=10),
        dict(presence_penalty=-2, frequency_penalty=2),
        dict(min_p=1),
        dict(temperature=np.float32(0.5)),
    ],
)
def test_edge_values_are_accepted(kw):
    SamplingParams(**kw)


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0),
        ("n", 65),
        ("n", True),
        ("n", 1.0),
        ("temperature", -0.1),
        ("temperature", 100.5),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("temperature", True),
        ("temperature", None),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", MAX_TOP_K + 1),
        ("top_k", True),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("min_p", float("nan")),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", float("-inf")),
        ("frequency_penalty", 3),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 10.5),
        ("repetition_penalty", -1),
        ("repetition_penalty", False),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", True),
        ("seed", 1.5),
        ("stop", ""),
        ("stop", [""]),
        ("stop", ["a"] * (MAX_STOP + 1)),
        ("stop", ["x" * 257]),
        ("stop", [1]),
        ("stop", b"ab"),
        ("stop", {"a"}),
        ("stop", 5),
        ("stop", ["a", None]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", list(range(MAX_STOP + 1))),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", "12"),
        ("stop_token_ids", [2**31]),
        ("stop_token_ids", 3),
        ("ignore_eos", 1),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", None),
        ("include_stop_str_in_output", 0),
        ("ignore_eos", np.bool_(True)),
        ("max_tokens", 0),
        ("max_tokens", 2**20 + 1),
        ("max_tokens", True),
        ("max_tokens", 3.0),
        ("min_tokens", -1),
        ("min_tokens", True),
        ("min_tokens", None),
        ("min_tokens", 17),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("logprobs", True),
        ("logprobs", 1.0),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match="^" + re.escape(f"SamplingParams.{field}=")):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(ValueError, match=r"^SamplingParams\.min_tokens=9: must not exceed max_tokens=8"):
        SamplingParams(max_tokens=8, min_tokens=9)


def test_error_message_does_not_echo_a_huge_value():
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["stop"] * 10_000)
    assert len(str(e.value)) < 400


# -- SamplingTensors.build --------------------------------------------------------------------------------------


def test_build_fills_rows_and_pads():
    rows = [
        _row(
            step=3,
            seed=2**40 + 5,
            prompt=[1, 2],
            output=[3],
            banned=[9, 4],
            temperature=0.5,
            top_k=7,
            top_p=0.9,
            min_p=0.1,
            repetition_penalty=1.5,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logprobs=2,
        ),
        _row(step=1, seed=7, prompt=list(range(100)), output=[5] * 50, temperature=0.0),  # no penalties: no history
    ]
    st = SamplingTensors.build(rows, 4, 8)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(st))
    np.testing.assert_allclose(st.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(st.top_k, [7, 0, 0, 0])
    np.testing.assert_allclose(st.top_p, [0.9, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(st.min_p, [0.1, 0, 0, 0], rtol=1e-6)
    assert st.seeds.dtype == np.uint32 and st.seeds.tolist() == [5, 7, 0, 0]
    np.testing.assert_array_equal(st.step, [3, 1, 0, 0])
    np.testing.assert_allclose(st.repetition, [1.5, 1, 1, 1])
    np.testing.assert_allclose(st.presence, [0.5, 0, 0, 0])
    np.testing.assert_allclose(st.frequency, [-0.5, 0, 0, 0])
    assert st.banned.shape == (4, MAX_BANNED) and st.banned[0, :3].tolist() == [9, 4, -1]
    assert (st.banned[1:] == -1).all()
    assert st.history[0].tolist() == [1, 2, 3, -1, -1, -1, -1, -1] and (st.history[1:] == -1).all()
    np.testing.assert_array_equal(st.num_prompt, [2, 0, 0, 0])
    np.testing.assert_array_equal(st.num_logprobs, [2, -1, -1, -1])


def test_build_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="num_rows"):
        SamplingTensors.build([_row()] * 3, 2, 4)
    with pytest.raises(ValueError, match="history_len"):
        SamplingTensors.build([_row(prompt=[1, 2, 3], output=[4, 5], presence_penalty=0.1)], 2, 4)
    with pytest.raises(ValueError, match="MAX_BANNED"):
        SamplingTensors.build([_row(banned=list(range(MAX_BANNED + 1)))], 2, 4)
    SamplingTensors.build([_row(prompt=[1, 2, 3], output=[4], presence_penalty=0.1)], 2, 4)  # exactly full


def test_from_params_still_serves_the_single_stream_generator():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1, seed=3, logprobs=1)]
    st = SamplingTensors.from_params(params, [0, 4], default_seed=9)
    assert st.seeds.tolist() == [9, 3] and st.step.tolist() == [0, 4] and st.history.shape == (2, 1)
    logits = _logits(0)[:2]
    out = jax.tree.map(np.asarray, _sample(jnp.asarray(logits), st))
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    with pytest.raises(ValueError, match="penalties"):
        SamplingTensors.from_params([SamplingParams(repetition_penalty=1.2)], [0])


# -- the sampler ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [1, 7, 128, 300, 49152])
def test_blocked_argmax_equals_jnp_argmax_with_ties_nan_and_inf(v):
    rng = np.random.default_rng(v)
    x = rng.integers(-3, 4, (9, v)).astype(np.float32)  # small integers: many ties for the max
    x[1] = -np.inf
    x[2, rng.integers(0, v)] = np.inf
    x[3, rng.integers(0, v, 2)] = np.nan
    x[4, -1] = 100.0  # the max in the last (padded) block
    x[5] = np.nan
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got.dtype == np.int32


def test_greedy_rows_take_the_argmax_even_beside_random_rows():
    logits = _logits(1)
    rows = [_row(step=i, seed=i, temperature=0.0 if i % 2 else 1.0, top_k=3) for i in range(S)]
    out = _run(rows, logits)
    np.testing.assert_array_equal(out.token_ids[1::2], logits.argmax(-1)[1::2])
    assert (out.token_ids[0::2] != logits.argmax(-1)[0::2]).any()  # the random rows really draw


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_degenerate_filters_are_greedy(kw):
    logits = _logits(2)
    out = _run([_row(step=i, seed=i, temperature=2.0, **kw) for i in range(S)], logits)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))


def test_padding_entries_do_not_touch_the_last_token():
    # -1 pads in banned/history must not wrap around to token V - 1.
    logits = _logits(3)
    logits[:, V - 1] = 10.0
    rows = [_row(temperature=0.0, repetition_penalty=5.0, prompt=[0], output=[1]), _row(temperature=0.0)]
    assert (_run(rows, logits).token_ids == V - 1).all()


def test_banned_ids_are_never_sampled():
    logits = _logits(4)
    order = np.argsort(-logits, axis=-1)
    banned = [order[i, :2].tolist() for i in range(S)]  # the two best tokens of each row
    third = order[:, 2]
    greedy = _run([_row(banned=banned[i], temperature=0.0) for i in range(S)], logits)
    np.testing.assert_array_equal(greedy.token_ids, third)
    top1 = _run([_row(step=i, seed=i, banned=banned[i], temperature=1.0, top_k=1) for i in range(S)], logits)
    np.testing.assert_array_equal(top1.token_ids, third)
    # Tokens 0..3 hold almost all the mass; banned, they never come out of hundreds of draws.
    skewed = np.zeros((S, V), np.float32)
    skewed[:, :4] = 12.0
    for step in range(0, 8 * S, S):
        out = _run([_row(step=step + i, seed=1, banned=[0, 1, 2, 3], temperature=1.0) for i in range(S)], skewed)
        assert (out.token_ids >= 4).all()


def _penalty_batch(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(S):
        kw = {}
        if i % 4:  # every fourth row has no penalty
            kw = dict(
                repetition_penalty=float(rng.choice([0.5, 1.0, 1.3, 2.0])),
                presence_penalty=float(rng.choice([-1.0, 0.0, 0.7])),
                frequency_penalty=float(rng.choice([-0.4, 0.0, 1.5])),
            )
        n_prompt, n_out = rng.integers(0, H // 2 + 1, size=2)
        # Few distinct ids so tokens repeat and show up in both prompt and output.
        prompt = rng.integers(0, 24, n_prompt).tolist()
        output = rng.integers(8, 32, n_out).tolist()
        rows.append(_row(prompt=prompt, output=output, temperature=0.0, **kw))
    return rows


@pytest.mark.parametrize("seed", [0, 1])
def test_penalties_match_vllm_formulas(seed):
    rows = _penalty_batch(seed)
    logits = _logits(10 + seed)
    got = np.asarray(_penalize(jnp.asarray(logits), SamplingTensors.build(rows, S, H)))
    want = np.stack(
        [_penalties_ref(logits[i], r.params, r.prompt_token_ids, r.output_token_ids) for i, r in enumerate(rows)]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[::4], logits[::4])  # rows without penalties are untouched, bit for bit
    # End to end, greedy picks the argmax of the penalized logits.
    np.testing.assert_array_equal(_run(rows, logits).token_ids, want.argmax(-1))


def test_prompt_only_tokens_get_repetition_but_not_frequency_or_presence():
    logits = np.zeros((S, V), np.float32)
    logits[0, [5, 6, 9, 11]] = [3.0, -1.0, 3.0, 1.0]
    rows = [_row(prompt=[5, 6], output=[9, 9], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=1.0)]
    got = np.asarray(_penalize(jnp.asarray(logits), SamplingTensors.build(rows, S, H)))[0]
    assert got[5] == 1.5 and got[6] == -2.0  # prompt only: repetition alone
    assert got[9] == 3.0 / 2 - 0.5 * 2 - 1.0  # output twice: repetition, frequency x2, presence
    assert got[11] == 1.0 and got[0] == 0.0  # unseen: untouched


def test_penalties_steer_greedy_choice():
    logits = np.zeros((S, V), np.float32)
    logits[:, :3] = [2.0, 1.5, 1.2]
    rows = [
        _row(temperature=0.0, output=[0], repetition_penalty=2.0),  # 2.0 -> 1.0: token 1 wins
        _row(temperature=0.0, output=[0, 0], frequency_penalty=0.5),  # 2.0 - 1.0: token 1 wins
        _row(temperature=0.0, output=[0, 1], presence_penalty=0.6),  # 1.4, 0.9 vs 1.2: token 0 still wins
        _row(temperature=0.0, prompt=[0, 1], presence_penalty=2.0),  # prompt tokens: no presence penalty
    ]
    np.testing.assert_array_equal(_run(rows, logits).token_ids[:4], [1, 1, 0, 0])


def test_min_p_never_draws_below_the_threshold():
    probs = np.full(V, 0.08 / (V - 5))
    probs[:5] = [0.3, 0.25, 0.2, 0.1, 0.07]  # min_p=0.2 keeps p >= 0.06: tokens 0..4
    logits = np.tile(np.log(probs).astype(np.float32), (S, 1))
    seen = set()
    for step in range(0, 8 * S, S):
        out = _run([_row(step=step + i, seed=11, min_p=0.2) for i in range(S)], logits)
        seen |= set(out.token_ids.tolist())
    assert seen == {0, 1, 2, 3, 4}  # ~41 of 512 draws would land outside without min_p


@pytest.mark.parametrize("seed", range(6))
def test_sampled_token_is_inside_the_filtered_set(seed):
    rng = np.random.default_rng(seed)
    rows = [
        _row(
            step=int(rng.integers(1000)),
            seed=int(rng.integers(2**40)),
            temperature=float(rng.choice([0.3, 1.0, 2.5])),
            top_k=int(rng.choice([-1, 0, 1, 3, 10, 200])),
            top_p=float(rng.choice([1.0, 0.95, 0.6, 0.2])),
            min_p=float(rng.choice([0.0, 0.05, 0.3])),
            banned=rng.integers(0, V, 3).tolist(),
        )
        for _ in range(S)
    ]
    logits = _logits(100 + seed, scale=3.0)
    out = _run(rows, logits)
    for i, r in enumerate(rows):
        row = logits[i].copy()
        row[list(r.banned_token_ids)] = -np.inf
        assert out.token_ids[i] in _allowed_ref(row, r.params), (i, r.params)


def test_draws_depend_only_on_seed_step_and_logits():
    rng = np.random.default_rng(5)
    logits = _logits(6)
    rows = [
        _row(
            step=int(rng.integers(100)),
            seed=int(rng.integers(2**63)),
            temperature=float(rng.choice([0.0, 0.8, 1.5])),
            top_p=float(rng.choice([1.0, 0.9])),
            top_k=int(rng.choice([0, 20])),
            logprobs=int(rng.choice([0, 5])),
            repetition_penalty=float(rng.choice([1.0, 1.0, 1.4])),
            prompt=[1, 2, 3],
            output=[4],
        )
        for _ in range(S)
    ]
    batch = _run(rows, logits).token_ids
    perm = rng.permutation(S)
    np.testing.assert_array_equal(_run([rows[j] for j in perm], logits[perm]).token_ids, batch[perm])
    for i in (0, 17, 63):  # alone in slot 0, beside nothing but padding
        alone = np.zeros((S, V), np.float32)
        alone[0] = logits[i]
        assert _run([rows[i]], alone).token_ids[0] == batch[i]


def test_steps_draw_from_the_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.full((S, V), -30.0, np.float32)
    logits[:, :4] = np.log(probs)
    draws = np.concatenate(
        [_run([_row(step=step + i, seed=123) for i in range(S)], logits).token_ids for step in range(0, 16 * S, S)]
    )
    assert draws.max() < 4
    freq = np.bincount(draws, minlength=4)[:4] / len(draws)
    sigma = np.sqrt(probs * (1 - probs) / len(draws))
    assert (np.abs(freq - probs) < 4 * sigma).all(), freq


def test_logprobs_come_from_the_raw_logits():
    logits = _logits(7)
    rows = [
        _row(
            step=i,
            seed=i,
            logprobs=MAX_LOGPROBS if i % 2 else None,
            temperature=0.5,
            top_k=5,
            repetition_penalty=1.5,
            output=[int(logits[i].argmax())],
            banned=[int(np.argsort(-logits[i])[1])],
        )
        for i in range(S)
    ]
    out = _run(rows, logits)
    ref = _log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(S), out.token_ids], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-ref, axis=-1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, axis=-1)[:, ::-1][:, :MAX_LOGPROBS], atol=1e-5)
    assert (np.diff(out.top_logprobs, axis=-1) <= 0).all()


def test_no_logprobs_requested_skips_the_top_list():
    logits = _logits(8)
    out = _run([_row(step=i, seed=i) for i in range(S)], logits)
    assert (out.top_ids == -1).all() and (out.top_logprobs == 0).all()
    assert (out.logprobs == 0).all() and (out.ranks == 0).all()


def test_padding_rows_are_harmless():
    # NaN logits in the padding slots: any leak across rows would show up as NaN or a wrong token.
    logits = np.full((S, V), np.nan, np.float32)
    real = _logits(9)[:3]
    logits[:3] = real
    rows = [
        _row(temperature=0.0, logprobs=3),
        _row(step=4, seed=4, top_k=1),
        _row(temperature=0.0, presence_penalty=1.0, output=[int(real[2].argmax())]),
    ]
    out = _run(rows, logits)
    want2 = _penalties_ref(real[2], rows[2].params, (), rows[2].output_token_ids).argmax()
    np.testing.assert_array_equal(out.token_ids[:3], [real[0].argmax(), real[1].argmax(), want2])
    assert np.isfinite(out.logprobs[:3]).all() and np.isfinite(out.top_logprobs[:3]).all()
    assert ((0 <= out.token_ids) & (out.token_ids < V)).all()


def test_int_key_sort_matches_a_float_sort():
    x = _logits(12, scale=50.0)
    x[0, :6] = [-np.inf, np.inf, -0.0, 0.0, np.finfo(np.float32).tiny, -np.finfo(np.float32).max]
    x[1, :] = 1.5  # all tied
    got = np.asarray(jax.jit(_sort_descending)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, -np.sort(-x, axis=-1))
    assert got.dtype == np.float32


@pytest.mark.parametrize("seed", range(3))
def test_target_logits_are_what_sample_draws_from(seed):
    """target_logits (the p a speculated token is verified against): drawing from it with each row's key gives
    exactly sample's token, over greedy and random rows, filters, bans and penalties; greedy rows are one-hot."""
    from jaxserve.sampling import row_keys, target_logits

    rng = np.random.default_rng(seed)
    rows = [
        _row(
            step=int(rng.integers(1000)),
            seed=int(rng.integers(2**40)),
            temperature=float(rng.choice([0.0, 0.3, 1.0, 2.5])),
            top_k=int(rng.choice([0, 3, 10])),
            top_p=float(rng.choice([1.0, 0.9, 0.5])),
            min_p=float(rng.choice([0.0, 0.05])),
            repetition_penalty=float(rng.choice([1.0, 1.3])),
            prompt=[1, 2, 3],
            output=[4, 5],
            banned=rng.integers(0, V, 2).tolist(),
        )
        for _ in range(S)
    ]
    logits = _logits(200 + seed, scale=3.0)
    st = SamplingTensors.build(rows, S, H)
    target = jax.jit(target_logits)(jnp.asarray(logits), st)
    drawn = jax.vmap(jax.random.categorical)(row_keys(st), target)
    np.testing.assert_array_equal(np.asarray(drawn), _run(rows, logits).token_ids)
    probs = np.asarray(jax.nn.softmax(target, axis=-1))
    greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0]
    assert greedy and np.all(probs[greedy].max(-1) == 1.0)
    for i, r in enumerate(rows):  # banned ids have probability 0
        assert probs[i, list(r.banned_token_ids)].max() == 0.0


# ---- logit_bias ---------------------------------------------------------------------------------------------------


def test_logit_bias_moves_the_draw_and_leaves_the_raw_logprobs():
    logits = _logits(40)
    top = logits.argmax(-1)
    low = logits.argmin(-1)
    rows = []
    for i in range(S):
        if i % 3 == 0:  # +100 on the least likely token: greedy and random draws both take it
            rows.append(_row(logit_bias={int(low[i]): 100.0}, temperature=0.0 if i % 2 else 1.0, seed=i, logprobs=1))
        elif i % 3 == 1:  # -100 on the argmax: greedy takes the runner-up
            rows.append(_row(logit_bias={str(top[i]): -100}, temperature=0.0, logprobs=1))
        else:  # no bias: untouched
            rows.append(_row(temperature=0.0, logprobs=1))
    out = _run(rows, logits)
    second = np.argsort(-logits, axis=-1)[:, 1]
    for i in range(S):
        want = low[i] if i % 3 == 0 else second[i] if i % 3 == 1 else top[i]
        assert out.token_ids[i] == want, i
    # logprobs are the model's own (vLLM's default): the bias is not in them
    raw = _log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, raw[np.arange(S), out.token_ids], atol=1e-4)
    assert list(out.top_ids[:, 0]) == list(top)


def test_logit_bias_fields_are_checked():
    p = SamplingParams(logit_bias={"7": 1, 3: -2.5})
    assert p.logit_bias == ((3, -2.5), (7, 1.0))  # sorted pairs: hashable
    assert SamplingParams(logit_bias=[(4, 1)]).logit_bias == ((4, 1.0),) and SamplingParams().logit_bias == ()
    for bad, words in (
        ({"x": 1}, "token id"),
        ({"-1": 1}, "token id"),
        ({5: 101}, "[-100, 100]"),
        ({5: float("nan")}, "[-100, 100]"),
        ({5: "1"}, "[-100, 100]"),
        ({i: 1 for i in range(301)}, "at most 300"),
        ("5", "map token ids"),
        ([5, 6], "map token ids"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            SamplingParams(logit_bias=bad)
