"""The model forward on a shared paged cache: scattered pages and several sequences in one ragged step give the
same logits as one sequence on identity pages (the single-stream path checked against HF in test_parity)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.cache import AttentionMetadata, KVCache
from models.llama import compute_logits, forward

PAGE = 16


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(1,))
def _step(params, cache, token_ids, positions, meta, *, cfg):
    hidden, cache = forward(params, cfg, token_ids, positions, cache, meta)
    return compute_logits(params, hidden), cache


def _ragged_step(model, cache, chunks, tables, starts):
    """One step over several sequences: chunks[i] are tokens starting at position starts[i] of sequence i."""
    token_ids = np.concatenate([np.asarray(c, np.int32) for c in chunks])
    positions = np.concatenate([np.arange(s, s + len(c), dtype=np.int32) for c, s in zip(chunks, starts)])
    slots = np.concatenate(
        [
            np.array([tables[i][p // PAGE] * PAGE + p % PAGE for p in range(s, s + len(c))], np.int32)
            for i, (c, s) in enumerate(zip(chunks, starts))
        ]
    )
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int32),
        kv_lens=np.array([s + len(c) for c, s in zip(chunks, starts)], np.int32),
        block_tables=np.array([list(t) + [0] * (width - len(t)) for t in tables], np.int32),
        num_seqs=np.array(len(chunks), np.int32),
    )
    logits, cache = _step(model.params, cache, token_ids, positions, meta, cfg=model.config)
    return np.asarray(logits), cache


@pytest.mark.real_model
def test_two_sequences_on_scattered_pages_match_single_stream(real_model, real_scorer):
    tok = real_model.tokenizer
    a = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the tallest mountain?"}]))
    b = tok.encode("def add(a, b):\n    return a + b\n\nprint(add(2, 3))")
    cfg = real_model.config
    cache = KVCache.zeros(cfg.num_layers, 32, PAGE, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    pages = np.random.default_rng(0).permutation(np.arange(1, 32))
    table_a = list(pages[: -(-len(a) // PAGE) + 1])
    table_b = list(pages[10 : 10 + -(-len(b) // PAGE) + 1])
    # step 1: a's prompt in two chunks interleaved with b's prompt; step 2: a's second chunk + b decodes one token
    split = len(a) // 2
    logits1, cache = _ragged_step(real_model, cache, [a[:split], b], [table_a, table_b], [0, 0])
    next_b = int(logits1[-1].argmax())
    logits2, cache = _ragged_step(real_model, cache, [a[split:], [next_b]], [table_a, table_b], [split, len(b)])

    want_a = real_scorer.prompt_logits(a)
    want_b = real_scorer.prompt_logits(b + [next_b])
    got_a = np.concatenate([logits1[:split], logits2[: len(a) - split]])
    got_b = np.concatenate([logits1[split:], logits2[-1:]])
    np.testing.assert_allclose(got_a, want_a, atol=2e-4)
    np.testing.assert_allclose(got_b, want_b, atol=2e-4)


def two_prompt_step(vocab_size: int, seed: int = 4):
    """One ragged step of a 21- and a 5-token prompt on scattered pages of 8 (8 pages; two padding rows, one
    padding sequence): (token_ids, positions, meta), 26 valid rows."""
    rng = np.random.default_rng(seed)
    a = [int(x) for x in rng.integers(3, vocab_size, 21)]
    b = [int(x) for x in rng.integers(3, vocab_size, 5)]
    tables = [[3, 1, 6], [5, 2]]
    meta = AttentionMetadata(
        slot_mapping=np.array(
            [tables[0][p // 8] * 8 + p % 8 for p in range(21)]
            + [tables[1][p // 8] * 8 + p % 8 for p in range(5)]
            + [-1, -1],
            np.int32,
        ),
        query_start_loc=np.array([0, 21, 26, 26], np.int32),
        kv_lens=np.array([21, 5, 0], np.int32),
        block_tables=np.array([tables[0], tables[1] + [0], [0, 0, 0]], np.int32),
        num_seqs=np.array(2, np.int32),
    )
    tokens = np.array(a + b + [0, 0], np.int32)
    positions = np.array(list(range(21)) + list(range(5)) + [0, 0], np.int32)
    return tokens, positions, meta


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_tiny_model_forward_with_interpreted_pallas_kernels(backend):
    """The kernels inside the layer scan (pages of all layers on one flat axis, offset per layer) == reference."""
    from tests.test_model import _tiny_model

    model, _ = _tiny_model()
    cfg = model.config
    tokens, positions, meta = two_prompt_step(cfg.vocab_size)

    def run(**kw):
        step = jax.jit(lambda p, c, t, pos, m: forward(p, cfg, t, pos, c, m, **kw))
        cache = KVCache.zeros(cfg.num_layers, 8, 8, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
        hidden, cache = step(model.params, cache, tokens, positions, meta)
        return np.asarray(hidden)[:26], np.asarray(cache.k), np.asarray(cache.v)

    want = run(attention_backend="reference")
    got = run(attention_backend=backend, interpret_kernels=True)
    for g, w in zip(got, want):  # hidden states, K pages, V pages (later layers' K/V inherit rounding)
        np.testing.assert_allclose(g, w, atol=2e-5)
    assert np.abs(want[1][0]).sum() > 0
    np.testing.assert_array_equal(got[1][0], want[1][0])  # layer 0's K pages: written, not computed from attention
