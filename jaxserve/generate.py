"""Single-stream generation on one sequence's KV cache, with its own jitted step: the tests' and
scripts/bench_quality.py's way to get a whole prompt's logits (`prompt_logits`). The CLI and every server run the
engine (jaxserve.engine) instead; issue 14 moves what the tests need onto the engine and removes this module.

The cache is the paged cache of `models.cache` holding one sequence whose block table is simply
[1, 2, 3, ...] (page 0 is the null page); the step is the same ragged step the batching engine uses (one
sequence, S = 1). Prompts are prefilled in chunks, then one token per step is decoded. Shapes are bucketed
(token count, and block-table width so attention only visits the pages in use) and each bucket compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator

import jax
import numpy as np

from jaxserve.config import CacheConfig
from jaxserve.detokenizer import IncrementalDetokenizer
from jaxserve.kv_cache.pool import allocate_kv_cache, plan_kv_pool
from jaxserve.sampling import SamplingParams, SamplingTensors, sample
from models.cache import AttentionMetadata
from models.config import LlamaConfig
from models.llama import LlamaParams, compute_logits, forward
from models.loader import LoadedModel

MIN_TOKEN_BUCKET = 16
MIN_PAGE_BUCKET = 16


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class PromptTooLongError(ValueError):
    pass


@dataclasses.dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    ttft_s: float  # call -> first token
    decode_s: float  # first token -> last token

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _step(params, cache, token_ids, positions, meta, sample_rows, st, *, cfg, backend):
    hidden, cache = forward(params, cfg, token_ids, positions, cache, meta, attention_backend=backend)
    logits = compute_logits(params, hidden[sample_rows])
    return sample(logits, st).token_ids, logits, cache


def _all_logits(params, cache, token_ids, positions, meta, *, cfg, backend):
    hidden, cache = forward(params, cfg, token_ids, positions, cache, meta, attention_backend=backend)
    return compute_logits(params, hidden), cache


class Generator:
    """Generates for one sequence at a time over a cache of `max_model_len` tokens."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_model_len: int | None = None,
        cache: CacheConfig | None = None,
        max_prefill_chunk: int = 512,
        attention_backend: str = "auto",
    ):
        cfg: LlamaConfig = model.config
        self.model = model
        self.cfg = cfg
        self.params: LlamaParams = model.params
        self.tokenizer = model.tokenizer
        limit = cfg.max_position_embeddings
        max_model_len = limit if max_model_len is None else max_model_len
        if not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len} must be in [1, {limit}] for this model")
        if max_prefill_chunk < MIN_TOKEN_BUCKET or max_prefill_chunk & (max_prefill_chunk - 1):
            raise ValueError(f"max_prefill_chunk={max_prefill_chunk} must be a power of two >= {MIN_TOKEN_BUCKET}")
        cache = cache or CacheConfig()
        # The budget decides how many pages exist; one sequence needs only enough for max_model_len.
        plan = plan_kv_pool(cache, cfg, model.params.dtype)
        if plan.num_tokens < max_model_len:
            raise ValueError(
                f"max_model_len={max_model_len} does not fit the KV cache budget: {plan.describe()}; "
                f"raise kv_cache_memory or lower max_model_len"
            )
        self.max_model_len = max_model_len
        self.page_size = cache.page_size
        self.max_prefill_chunk = max_prefill_chunk
        self.num_pages = 1 + -(-max_model_len // cache.page_size)  # page 0 is the null page, as in the engine
        self.cache_plan = dataclasses.replace(plan, num_pages=self.num_pages)
        self.cache = allocate_kv_cache(self.cache_plan, cfg)
        kw = dict(cfg=cfg, backend=attention_backend)
        self._step = jax.jit(functools.partial(_step, **kw), donate_argnums=(1,))
        self._all_logits = jax.jit(functools.partial(_all_logits, **kw), donate_argnums=(1,))

    # -- one ragged step over a chunk of this sequence's tokens ---------------------------------------------

    def _inputs(self, chunk: list[int], start: int):
        n = len(chunk)
        bucket = max(MIN_TOKEN_BUCKET, next_pow2(n)) if n > 1 else 1
        kv_len = start + n
        width = min(self.num_pages - 1, max(MIN_PAGE_BUCKET, next_pow2(-(-kv_len // self.page_size))))
        token_ids = np.zeros(bucket, np.int32)
        token_ids[:n] = chunk
        positions = np.zeros(bucket, np.int32)
        positions[:n] = np.arange(start, kv_len)
        slot_mapping = np.full(bucket, -1, np.int32)
        slot_mapping[:n] = positions[:n] + self.page_size  # block table [1, 2, ...]: slot = position + one page
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=np.array([0, n], np.int32),
            kv_lens=np.array([kv_len], np.int32),
            block_tables=np.arange(1, width + 1, dtype=np.int32)[None, :],
            num_seqs=np.array(1, np.int32),
        )
        return token_ids, positions, meta

    def _run(self, chunk: list[int], start: int, st: SamplingTensors):
        token_ids, positions, meta = self._inputs(chunk, start)
        sample_rows = np.array([len(chunk) - 1], np.int32)
        next_token, logits, self.cache = self._step(
            self.params, self.cache, token_ids, positions, meta, sample_rows, st
        )
        return next_token, logits

    def prompt_logits(self, prompt_ids: list[int]) -> np.ndarray:
        """f32[n, V]: the logits at every prompt position (for parity checks against a reference)."""
        self._check_prompt(prompt_ids, 0)
        out = []
        for start in range(0, len(prompt_ids), self.max_prefill_chunk):
            chunk = prompt_ids[start : start + self.max_prefill_chunk]
            token_ids, positions, meta = self._inputs(chunk, start)
            logits, self.cache = self._all_logits(self.params, self.cache, token_ids, positions, meta)
            out.append(np.asarray(logits)[: len(chunk)])
        return np.concatenate(out)

    def _check_prompt(self, prompt_ids: list[int], max_new: int) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty: it must have at least one token")
        if len(prompt_ids) + max_new > self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt_ids)} tokens; with room for {max_new} new one(s) that exceeds "
                f"max_model_len={self.max_model_len}"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")

    # -- generation -----------------------------------------------------------------------------------------

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Yield generated token ids; stops at EOS (unless ignore_eos), max_tokens or the context end."""
        prompt_ids = [int(t) for t in prompt_ids]
        self._check_prompt(prompt_ids, 1)
        room = self.max_model_len - len(prompt_ids)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        eos = () if params.ignore_eos else self.tokenizer.eos_token_ids

        def tensors(step):
            return SamplingTensors.from_params([params], [step])

        start, token = 0, None
        while start < len(prompt_ids):
            chunk = prompt_ids[start : start + self.max_prefill_chunk]
            token, _ = self._run(chunk, start, tensors(0))
            start += len(chunk)
        for step in range(max_new):
            token_id = int(token[0])
            yield token_id
            if token_id in eos or step + 1 == max_new:
                return
            token, _ = self._run([token_id], len(prompt_ids) + step, tensors(step + 1))

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield text deltas (special tokens skipped) as tokens are generated."""
        detok = IncrementalDetokenizer(self.tokenizer)
        for token_id in self.generate_ids(prompt_ids, params):
            delta = detok.add(token_id)
            if delta:
                yield delta
        tail = detok.flush()
        if tail:
            yield tail

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        t0 = time.perf_counter()
        tokens, t_first = [], None
        for token_id in self.generate_ids(prompt_ids, params):
            tokens.append(token_id)
            if t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        stopped = bool(tokens) and tokens[-1] in self.tokenizer.eos_token_ids and not params.ignore_eos
        return GenerationResult(
            prompt_token_ids=list(prompt_ids),
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason="stop" if stopped else "length",
            ttft_s=(t_first or t_end) - t0,
            decode_s=t_end - (t_first or t_end),
        )


def warmup(generator: Generator, prompt_len: int = 16, decode_steps: int = 2) -> float:
    """Compile the buckets a short generation touches; returns seconds spent."""
    t0 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=decode_steps, ignore_eos=True)
    for _ in generator.generate_ids([0] * prompt_len, params):
        pass
    jax.block_until_ready(generator.cache.k)
    return time.perf_counter() - t0

