"""The Pallas TPU ragged paged attention kernel: run in the TPU interpreter on CPU against the dense oracle, and
lowered for a real TPU (Mosaic) from this CPU machine.

Every block-table entry a sequence does not own is set to a page id past the end of the cache, so the
interpreter raises on any copy of a page outside [0, cdiv(kv_len, page_size)); the NaN that rpa_cases puts
in the unused tail of each last page catches reads inside a page that are not masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.rpa_tpu import ragged_paged_attention_tpu
from tests.rpa_cases import RaggedCase, dense_attention, make_case, ragged_cases

_BAD_PAGE = 1 << 20  # no cache here has this many pages


def _fence_block_tables(case: RaggedCase, first_pages: list[int] | None = None) -> RaggedCase:
    """Point every block-table entry outside sequence i's pages [first_pages[i], cdiv(kv_len, P)) at _BAD_PAGE;
    padding sequences get no pages at all and a kv_len past the cache."""
    page_size = case.k_pages.shape[1]
    num_valid = int(case.num_seqs[0])
    for i in range(case.block_tables.shape[0]):
        if i < num_valid:
            lo, hi = (first_pages[i] if first_pages else 0), -(-int(case.kv_lens[i]) // page_size)
            case.block_tables[i, :lo] = _BAD_PAGE
            case.block_tables[i, hi:] = _BAD_PAGE
        else:
            case.block_tables[i] = _BAD_PAGE
            case.kv_lens[i] = _BAD_PAGE
    return case


def _run(case: RaggedCase, *, dtype=np.float32, **block_sizes) -> np.ndarray:
    q, k_pages, v_pages, *meta = case.args()
    fn = jax.jit(
        functools.partial(
            ragged_paged_attention_tpu,
            sm_scale=q.shape[-1] ** -0.5,
            sliding_window=case.sliding_window,
            soft_cap=case.soft_cap,
            interpret=True,
            **block_sizes,
        )
    )
    try:
        out = fn(q.astype(dtype), k_pages.astype(dtype), v_pages.astype(dtype), *meta)
        return np.asarray(out.astype(jnp.float32))
    except Exception:
        pltpu.reset_tpu_interpret_mode_state()  # the interpreter needs this after a failure inside a kernel
        raise


def _check(case: RaggedCase, out: np.ndarray, expected: np.ndarray, atol=2e-5, rtol=1e-5) -> None:
    rows = case.num_valid_rows
    assert np.all(np.isfinite(out[:rows])), "NaN/inf in valid rows: a read outside the sequence leaked"
    np.testing.assert_allclose(out[:rows], expected[:rows], atol=atol, rtol=rtol)


# Defaults (32-token query blocks, 128-token KV blocks), and small blocks: sequences split across query blocks
# and many KV blocks per sequence.
_BLOCK_SIZES = [
    {},
    {"num_queries_per_block": 16, "num_kv_pages_per_block": 1},
    {"num_queries_per_block": 16, "num_kv_pages_per_block": 2},
]


@settings(max_examples=12, deadline=None)
@given(case=ragged_cases(), block_sizes=st.sampled_from(_BLOCK_SIZES))
def test_kernel_equals_dense(case, block_sizes):
    expected = dense_attention(case)
    _check(case, _run(_fence_block_tables(case), **block_sizes), expected)


def _smollm2_story(seed: int) -> RaggedCase:
    # seq 0: a 37-token prompt in one chunk; seq 1: decode at 50 cached; seq 2: second chunk (tokens 17..24)
    return make_case(
        np.random.default_rng(seed),
        [37, 1, 8],
        [37, 50, 25],
        page_size=16,
        num_q_heads=9,
        num_kv_heads=3,
        head_dim=64,
        pad_seqs=2,
        pad_tokens=5,
    )


def test_smollm2_decode_prefill_mixed_story():
    """16-token query blocks: the prompt spans three, the decode and the chunk share one with its tail; two-page
    KV blocks: several per sequence, so the copy stream crosses blocks and sequences."""
    case = _smollm2_story(0)
    expected = dense_attention(case)
    out = _run(_fence_block_tables(case), num_queries_per_block=16, num_kv_pages_per_block=2)
    _check(case, out, expected)
    assert np.all(out[case.num_valid_rows :] == 0), "padding rows must come out 0"


def test_smollm2_story_bf16():
    case = _smollm2_story(1)
    for name in ("q", "k_pages", "v_pages"):  # the oracle sees exactly the bf16 inputs the kernel gets
        setattr(case, name, getattr(case, name).astype(ml_dtypes.bfloat16).astype(np.float32))
    expected = dense_attention(case)
    out = _run(_fence_block_tables(case), dtype=jnp.bfloat16)
    _check(case, out, expected, atol=3e-2, rtol=2e-2)
    assert np.all(out[case.num_valid_rows :] == 0)


def test_sliding_window_reads_no_page_before_the_window():
    """Pages wholly before the window of a sequence's first query row are fenced off: reading one raises."""
    window, page_size = 12, 8
    case = make_case(
        np.random.default_rng(2),
        [1, 20, 1],
        [90, 70, 13],
        page_size=page_size,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        sliding_window=window,
        soft_cap=20.0,
    )
    expected = dense_attention(case)
    first_pages = [max(0, kv - q - window + 1) // page_size for q, kv in zip(case.q_lens, case.kv_lens)]
    assert first_pages == [9, 4, 0]
    out = _run(_fence_block_tables(case, first_pages), num_queries_per_block=16, num_kv_pages_per_block=1)
    _check(case, out, expected)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "k_pages": a["k_pages"][..., :8], "v_pages": a["v_pages"][..., :8]}, "head_dim"),
        (lambda a: {**a, "q": a["q"][:, :3]}, "not a multiple of num_kv_heads"),
        (lambda a: {**a, "k_pages": a["k_pages"].astype(jnp.bfloat16)}, "share one dtype"),
        (lambda a: {**a, "kv_lens": a["kv_lens"].astype(jnp.int16)}, "kv_lens must be int32"),
        (lambda a: {**a, "query_start_loc": a["query_start_loc"][:-1]}, "query_start_loc"),
        (lambda a: {**a, "num_queries_per_block": 3}, "num_queries_per_block=3"),
        (lambda a: {**a, "num_kv_pages_per_block": 99}, "num_kv_pages_per_block=99"),
        (lambda a: {**a, "sliding_window": 0}, "sliding_window=0"),
    ],
)
def test_bad_inputs_are_clear_errors(change, match):
    case = make_case(np.random.default_rng(3), [2], [9], page_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16)
    names = ("q", "k_pages", "v_pages", "kv_lens", "block_tables", "query_start_loc", "num_seqs")
    args = change({**dict(zip(names, map(jnp.asarray, case.args()))), "sm_scale": 0.25, "interpret": True})
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention_tpu(**args)


# (num_q_heads, num_kv_heads, head_dim, page_size): SmolLM2-135M, a Llama-style GQA model, MQA.
_TPU_SHAPES = [(9, 3, 64, 16), (32, 8, 128, 16), (8, 1, 128, 32)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads_dim_page", _TPU_SHAPES, ids=["smollm2", "gqa-d128", "mqa-d128"])
@pytest.mark.parametrize(
    "options",
    [{}, {"sliding_window": 64, "soft_cap": 30.0, "num_queries_per_block": 32, "num_kv_pages_per_block": 4}],
    ids=["defaults", "window-cap-blocks"],
)
def test_lowers_for_tpu(dtype, heads_dim_page, options):
    """Pallas -> Mosaic lowering with its block-shape and tiling checks; nothing is compiled or run."""
    num_q_heads, num_kv_heads, head_dim, page_size = heads_dim_page
    num_tokens, num_pages, max_seqs, max_pages = 100, 64, 8, 16
    sds = jax.ShapeDtypeStruct
    pages = sds((num_pages, page_size, num_kv_heads, head_dim), dtype)
    args = (
        sds((num_tokens, num_q_heads, head_dim), dtype),
        pages,
        pages,
        sds((max_seqs,), jnp.int32),
        sds((max_seqs, max_pages), jnp.int32),
        sds((max_seqs + 1,), jnp.int32),
        sds((1,), jnp.int32),
    )
    fn = jax.jit(functools.partial(ragged_paged_attention_tpu, sm_scale=head_dim**-0.5, **options))
    text = fn.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text and "ragged_paged_attention_tpu" in text
