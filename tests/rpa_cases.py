"""Random ragged paged-attention batches for kernel tests (shared by the reference and the Pallas backends).

Pages not owned by any sequence, and the slots past each sequence's kv_len in its last page, hold NaN: a kernel
that reads (and does not fully mask) anything outside a sequence's cache produces NaN and fails the comparison.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st


@dataclasses.dataclass
class RaggedCase:
    q: np.ndarray  # f32[T, num_q_heads, head_dim]
    k_pages: np.ndarray  # f32[num_pages, page_size, num_kv_heads, head_dim]
    v_pages: np.ndarray  # f32[num_pages, page_size, num_kv_heads, head_dim]
    kv_lens: np.ndarray  # i32[S_padded]
    block_tables: np.ndarray  # i32[S_padded, max_pages_per_seq]
    query_start_loc: np.ndarray  # i32[S_padded + 1]
    num_seqs: np.ndarray  # i32[1]
    q_lens: list[int]  # valid sequences only
    sliding_window: int | None = None
    soft_cap: float | None = None

    @property
    def num_valid_rows(self) -> int:
        return int(self.query_start_loc[int(self.num_seqs[0])])

    def args(self):
        return (
            self.q,
            self.k_pages,
            self.v_pages,
            self.kv_lens,
            self.block_tables,
            self.query_start_loc,
            self.num_seqs,
        )


def make_case(
    rng: np.random.Generator,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    pad_seqs: int = 1,
    pad_tokens: int = 3,
    extra_pages: int = 2,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> RaggedCase:
    """Sequence i has kv_lens[i] cached tokens of which the last q_lens[i] are its query rows."""
    assert len(q_lens) == len(kv_lens) and all(0 < q <= k for q, k in zip(q_lens, kv_lens))
    s = len(q_lens)
    pages_per_seq = [-(-k // page_size) for k in kv_lens]
    max_pages = max(pages_per_seq) + 1  # one spare column: block-table padding
    num_pages = sum(pages_per_seq) + extra_pages + 1
    k_pages = np.full((num_pages, page_size, num_kv_heads, head_dim), np.nan, np.float32)
    v_pages = np.full_like(k_pages, np.nan)
    perm = rng.permutation(np.arange(1, num_pages))  # page 0 stays NaN: it is the padding page
    block_tables = np.zeros((s + pad_seqs, max_pages), np.int32)
    used = 0
    for i, (n_pages, kv_len) in enumerate(zip(pages_per_seq, kv_lens)):
        pages = perm[used : used + n_pages]
        used += n_pages
        block_tables[i, :n_pages] = pages
        for j, p in enumerate(pages):
            n = min(page_size, kv_len - j * page_size)  # the tail past kv_len stays NaN
            k_pages[p, :n] = rng.standard_normal((n, num_kv_heads, head_dim))
            v_pages[p, :n] = rng.standard_normal((n, num_kv_heads, head_dim))
    total = sum(q_lens)
    q = rng.standard_normal((total + pad_tokens, num_q_heads, head_dim)).astype(np.float32)
    qsl = np.zeros(s + pad_seqs + 1, np.int32)
    qsl[1 : s + 1] = np.cumsum(q_lens)
    qsl[s + 1 :] = total  # padding sequences own no rows
    lens = np.zeros(s + pad_seqs, np.int32)
    lens[:s] = kv_lens
    return RaggedCase(
        q, k_pages, v_pages, lens, block_tables, qsl, np.array([s], np.int32), list(q_lens), sliding_window, soft_cap
    )


@st.composite
def ragged_cases(draw, max_seqs: int = 8, max_kv: int = 80, heads=((4, 4), (6, 3), (4, 1)), head_dim: int = 16):
    """Hypothesis strategy: 1..max_seqs sequences, decode-only, prefill-only or mixed, page sizes 8/16/32,
    MHA / GQA (3 KV heads, as SmolLM2) / MQA, with and without sliding window and soft cap."""
    num_seqs = draw(st.integers(1, max_seqs))
    mode = draw(st.sampled_from(["decode", "prefill", "mixed"]))
    page_size = draw(st.sampled_from([8, 16, 32]))
    num_q_heads, num_kv_heads = draw(st.sampled_from(heads))
    q_lens, kv_lens = [], []
    for _ in range(num_seqs):
        kv = draw(st.integers(1, max_kv))
        kind = mode if mode != "mixed" else draw(st.sampled_from(["decode", "prefill"]))
        if kind == "decode":
            q = 1
        else:  # a prompt chunk: the whole prompt, or its last part after earlier chunks
            q = draw(st.integers(1, min(kv, 24)))
        q_lens.append(q)
        kv_lens.append(kv)
    window = draw(st.one_of(st.none(), st.integers(1, 40)))
    cap = draw(st.one_of(st.none(), st.floats(5.0, 50.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    return make_case(
        np.random.default_rng(seed),
        q_lens,
        kv_lens,
        page_size=page_size,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        sliding_window=window,
        soft_cap=cap,
    )


def dense_attention(case: RaggedCase) -> np.ndarray:
    """Plain causal attention per sequence on unpaged tensors (float64): the oracle for every backend."""
    out = np.zeros(case.q.shape, np.float64)
    num_q_heads, head_dim = case.q.shape[1:]
    page_size, num_kv_heads = case.k_pages.shape[1:3]
    group = num_q_heads // num_kv_heads
    for i, q_len in enumerate(case.q_lens):
        kv_len = int(case.kv_lens[i])
        pages = case.block_tables[i, : -(-kv_len // page_size)]
        k = case.k_pages[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len].astype(np.float64)
        v = case.v_pages[pages].reshape(-1, num_kv_heads, head_dim)[:kv_len].astype(np.float64)
        start = int(case.query_start_loc[i])
        q = case.q[start : start + q_len].astype(np.float64)
        for h in range(num_q_heads):
            s = q[:, h] @ k[:, h // group].T / np.sqrt(head_dim)
            if case.soft_cap is not None:
                s = case.soft_cap * np.tanh(s / case.soft_cap)
            qpos = kv_len - q_len + np.arange(q_len)[:, None]
            kpos = np.arange(kv_len)[None, :]
            mask = kpos <= qpos
            if case.sliding_window is not None:
                mask &= kpos > qpos - case.sliding_window
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[start : start + q_len, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // group]
    return out
