"""The model forward over the paged cache and the sampler, on a tiny random-weight model (fast, exact)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampling import SamplingParams
from models.llama import params_from_arrays
from models.loader import LoadedModel
from models.tokenizer import Tokenizer
from tests.engine_runs import greedy, scoring_engine
from tests.tiny_models import TINY, random_arrays, tiny_config


def _dense_reference(arrays, cfg, ids) -> np.ndarray:
    """The decoder written out in numpy, no cache: logits f32[n, V] for every position."""

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w

    n, d = len(ids), cfg.head_dim
    inv = cfg.rope_inv_freq().astype(np.float64)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    h = arrays["embed"][ids].astype(np.float64)
    for i in range(cfg.num_layers):
        x = norm(h, arrays["attn_norm"][i])
        q = rope((x @ arrays["wq"][i]).reshape(n, cfg.num_heads, d))
        k = rope((x @ arrays["wk"][i]).reshape(n, cfg.num_kv_heads, d))
        v = (x @ arrays["wv"][i]).reshape(n, cfg.num_kv_heads, d)
        k = np.repeat(k, cfg.q_per_kv, axis=1)
        v = np.repeat(v, cfg.q_per_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        h = h + np.einsum("hqk,khd->qhd", p, v).reshape(n, -1) @ arrays["wo"][i]
        x = norm(h, arrays["mlp_norm"][i])
        g = x @ arrays["w_gate"][i]
        h = h + (g / (1 + np.exp(-g)) * (x @ arrays["w_up"][i])) @ arrays["w_down"][i]
    h = norm(h, arrays["final_norm"])
    head = arrays["lm_head"] if "lm_head" in arrays else arrays["embed"].T
    return h @ head


def _tiny_model(cfg=TINY, seed=0) -> tuple[LoadedModel, dict]:
    from tests.tiny_models import tiny_vocab
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models as tk_models

    arrays = random_arrays(cfg, seed)
    tokens, _, _ = tiny_vocab()
    backend = HFTok(tk_models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok = Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], add_bos=False, chat_template=None)
    params = params_from_arrays(cfg, arrays, jnp.float32)
    return LoadedModel("tiny", cfg, params, tok, "float32", 0.0), arrays


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


IDS = [int(x) for x in np.random.default_rng(3).integers(3, TINY.vocab_size, size=45)]


@pytest.mark.parametrize(
    "cfg_changes",
    [{}, {"tie_word_embeddings": True}, {"attention_bias": True}, {"num_kv_heads": 1}, {"num_kv_heads": 4}],
    ids=["gqa", "tied", "qkv_bias", "mqa", "mha"],
)
def test_forward_matches_dense_numpy(cfg_changes):
    cfg = tiny_config(**cfg_changes)
    model, arrays = _tiny_model(cfg, seed=5)
    if cfg.attention_bias:  # the numpy reference has no bias: check it is applied by comparing with zero bias
        zero = dict(arrays, bq=0 * arrays["bq"], bk=0 * arrays["bk"], bv=0 * arrays["bv"])
        model = dataclasses.replace(model, params=params_from_arrays(cfg, zero, jnp.float32))
        arrays = zero
    logits = scoring_engine(model, 128).prompt_logits(IDS)
    np.testing.assert_allclose(logits, _dense_reference(arrays, cfg, IDS), atol=2e-4, rtol=1e-4)


def test_qkv_bias_changes_output():
    cfg = tiny_config(attention_bias=True)
    model, arrays = _tiny_model(cfg, seed=5)
    zero = dict(arrays, bq=0 * arrays["bq"], bk=0 * arrays["bk"], bv=0 * arrays["bv"])
    with_bias = scoring_engine(model, 64).prompt_logits(IDS[:8])
    model0 = dataclasses.replace(model, params=params_from_arrays(cfg, zero, jnp.float32))
    without = scoring_engine(model0, 64).prompt_logits(IDS[:8])
    assert np.abs(with_bias - without).max() > 1e-3


@pytest.mark.parametrize("chunk", [16, 32])
def test_chunked_prefill_equals_one_shot(tiny, chunk):
    model, arrays = tiny
    whole = scoring_engine(model, 128, chunk=64).prompt_logits(IDS)
    chunked = scoring_engine(model, 128, chunk=chunk).prompt_logits(IDS)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_decode_steps_equal_prefill_logits(tiny):
    """Greedy decoding token by token through the cache == the logits of the whole sequence at once."""
    model, arrays = tiny
    out = list(greedy(scoring_engine(model, 128), IDS[:10], 20).token_ids)
    full = _dense_reference(arrays, TINY, IDS[:10] + out)
    assert out == [int(x) for x in full[9:-1].argmax(-1)]


def test_kv_cache_budget_and_dtype(tiny):
    model, _ = tiny
    page_bytes = 2 * TINY.num_layers * 8 * TINY.num_kv_heads * TINY.head_dim * 2  # bf16
    engine = scoring_engine(model, 64, kv_cache_dtype="bfloat16", kv_cache_memory=9 * page_bytes)
    assert engine.runner.cache.k.dtype == jnp.bfloat16 and engine.runner.cache.k.shape[1] == 9  # + the null page
    assert "9 pages x 8 tokens (64 usable tokens)" in engine.runner.pool.describe()
    assert len(greedy(engine, IDS[:10], 5).token_ids) == 5
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        scoring_engine(model, 128, kv_cache_memory=8 * page_bytes)


def test_prompt_length_bounds(tiny):
    model, _ = tiny
    engine = scoring_engine(model, 32)
    with pytest.raises(ValueError, match="exceeds max_model_len=32"):
        engine.add_request("a", IDS[:32], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("a", [TINY.vocab_size], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="out of range"):
        engine.prompt_logits([TINY.vocab_size])
    with pytest.raises(ValueError, match="exceeds max_model_len=32"):
        engine.prompt_logits(IDS[:33])
    assert engine.prompt_logits(IDS[:32]).shape == (32, TINY.vocab_size)  # scoring may fill the context
    # generation stops at the end of the context with finish_reason "length"
    res = greedy(engine, IDS[:30], 100)
    assert len(res.token_ids) == 2 and res.finish_reason == "length"
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages  # prompt_logits gave its pages back
