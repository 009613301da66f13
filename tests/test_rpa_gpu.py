"""The Pallas GPU (Triton) ragged paged attention kernel: interpreted on CPU against dense attention, and lowered
for CUDA from this CPU machine (the Triton lowering catches tile-shape and dtype errors without a GPU).

Interpret mode costs ~0.4 ms per program, more per loop step: cases stay tiny.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.rpa_gpu import ragged_paged_attention_gpu
from tests.rpa_cases import dense_attention, make_case, ragged_cases


def _run(case, dtype=jnp.float32, **kw):
    d = case.q.shape[-1]
    fn = jax.jit(
        lambda *a: ragged_paged_attention_gpu(
            *a, sm_scale=d**-0.5, sliding_window=case.sliding_window, soft_cap=case.soft_cap, interpret=True, **kw
        )
    )
    q, k, v, *meta = case.args()
    return np.asarray(fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), *meta).astype(jnp.float32))


def _check(case, out, atol=2e-5, rtol=1e-5):
    rows = case.num_valid_rows
    assert np.all(np.isfinite(out[:rows])), "NaN/inf in valid rows: a read outside the sequence leaked"
    np.testing.assert_allclose(out[:rows], dense_attention(case)[:rows], atol=atol, rtol=rtol)


@settings(max_examples=15, deadline=None)
@given(case=ragged_cases(), block_q=st.sampled_from([None, 1, 4]), small_block_k=st.booleans())
def test_kernel_equals_dense(case, block_q, small_block_k):
    # small_block_k: 16 keys per step, so the online softmax runs over several steps (and page boundaries)
    page_size = case.k_pages.shape[1]
    ppb = max(1, 16 // page_size) if small_block_k else None
    out = _run(case, block_q=block_q, pages_per_block=ppb)
    _check(case, out)
    assert np.all(out[case.num_valid_rows :] == 0), "padding rows must be 0"


def test_smollm2_mixed_decode_prefill_story():
    # SmolLM2 heads (9 q / 3 kv, head_dim 64), page 16. seq 0: a 37-token prompt in one chunk, five blocks of
    # 8 rows; seq 1: decode at 50 cached; seq 2: a second chunk (tokens 17..24). Two padding sequences and
    # five padding rows of real (finite) q data: those rows must come out exactly 0.
    case = make_case(
        np.random.default_rng(0),
        [37, 1, 8],
        [37, 50, 25],
        page_size=16,
        num_q_heads=9,
        num_kv_heads=3,
        head_dim=64,
        pad_seqs=2,
        pad_tokens=5,
    )
    out = _run(case, block_q=8)
    _check(case, out)
    assert np.all(out[case.num_valid_rows :] == 0)


def test_sequences_past_num_seqs_give_zero():
    # three filled slots but num_seqs = 2: the third slot's rows are padding even though its metadata is real.
    # head_dim 24 also runs the padded (masked) head_dim lanes.
    case = make_case(
        np.random.default_rng(2), [3, 2, 4], [10, 7, 12], page_size=8, num_q_heads=4, num_kv_heads=4, head_dim=24
    )
    case.num_seqs = np.array([2], np.int32)
    out = _run(case)
    _check(case, out)
    assert case.num_valid_rows == 5 and np.all(out[5:] == 0)


def test_window_soft_cap_head_dim_128_story():
    # head_dim 128, GQA 2:1, a 30-row chunk ending mid-page at 45 cached with a 20-token window: the first
    # pages are skipped, steps of one 16-key page, rows in a block see different key ranges.
    case = make_case(
        np.random.default_rng(3),
        [30, 1, 1],
        [45, 70, 9],
        page_size=16,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=128,
        sliding_window=20,
        soft_cap=30.0,
    )
    _check(case, _run(case, block_q=8, pages_per_block=1))


def test_bf16_story():
    # bf16 inputs: P is cast to bf16 for the P @ V MMA, as on the GPU; fp32 accumulation keeps the error small
    case = make_case(
        np.random.default_rng(4), [20, 1], [33, 17], page_size=8, num_q_heads=9, num_kv_heads=3, head_dim=64
    )
    case.q, case.k_pages, case.v_pages = (
        np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (case.q, case.k_pages, case.v_pages)
    )  # the oracle sees the same rounded inputs
    _check(case, _run(case, dtype=jnp.bfloat16, block_q=4), atol=3e-2, rtol=3e-2)


def _lower_for_cuda(dtype, num_q_heads, num_kv_heads, head_dim, **kw) -> str:
    t, s, num_pages, page_size, max_pages = 64, 4, 40, 16, 8
    args = (
        jax.ShapeDtypeStruct((t, num_q_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((num_pages, page_size, num_kv_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((num_pages, page_size, num_kv_heads, head_dim), dtype),
        jax.ShapeDtypeStruct((s,), jnp.int32),
        jax.ShapeDtypeStruct((s, max_pages), jnp.int32),
        jax.ShapeDtypeStruct((s + 1,), jnp.int32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )
    fn = jax.jit(lambda *a: ragged_paged_attention_gpu(*a, sm_scale=head_dim**-0.5, **kw))
    return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "heads,kw",
    [
        ((9, 3, 64), {}),  # SmolLM2
        ((9, 3, 64), {"sliding_window": 32, "soft_cap": 30.0, "block_q": 4, "pages_per_block": 1}),
        ((32, 8, 128), {}),  # Llama-3-8B-like
        ((8, 1, 128), {"num_warps": 8, "num_stages": 3}),  # MQA
        ((4, 4, 80), {}),  # head_dim not a power of two: padded lanes in the kernel
    ],
    ids=["smollm2", "smollm2-window-cap", "d128-gqa", "d128-mqa", "d80-mha"],
)
def test_lowers_for_cuda(dtype, heads, kw):
    text = _lower_for_cuda(dtype, *heads, **kw)
    assert "__gpu$xla.gpu.triton" in text and "ragged_paged_attention_gpu" in text


@pytest.mark.parametrize(
    "change,match",
    [
        ({"block_q": 3}, "block_q=3 must be a power of two"),
        ({"pages_per_block": 1, "page_size": 8}, "keys per step must be a power of two >= 16"),
        ({"head_dim_k": 32}, "head_dim of q"),
        ({"sliding_window": 0}, "sliding_window=0"),
    ],
)
def test_bad_inputs_are_clear_errors(change, match):
    page_size = change.pop("page_size", 16)
    head_dim_k = change.pop("head_dim_k", 16)
    q = jnp.zeros((8, 4, 16))
    pages = jnp.zeros((6, page_size, 2, head_dim_k))
    meta = (
        jnp.ones(2, jnp.int32),
        jnp.zeros((2, 3), jnp.int32),
        jnp.array([0, 1, 2], jnp.int32),
        jnp.array([2], jnp.int32),
    )
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention_gpu(q, pages, pages, *meta, sm_scale=0.25, interpret=True, **change)
