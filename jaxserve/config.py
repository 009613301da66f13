"""Engine settings as frozen dataclasses, validated once. Their field defaults are the defaults of every front end:
jaxserve.options derives the Python keywords, the argparse flags and the absl flags from them."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

DEFAULT_COMPILE_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "int8")
MAX_PAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    page_size: tokens per page. kv_cache_dtype: "auto" follows the model's dtype; "int8" keeps each token's K and V
    per KV head as int8 with an f32 scale beside it (kernels_pallas/kv_quant.py; ~3.8x the tokens of float32).
    kv_cache_memory: bytes for K and V pages of all layers; None -> kv_cache_memory_fraction of the memory the
    device has free after the weights and the compiled step's scratch (jaxserve.kv_cache.pool.plan_kv_pool),
    capped at what max_num_seqs full-length sequences can use.
    """

    page_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"CacheConfig.page_size={self.page_size!r} must be an integer in [1, {MAX_PAGE_SIZE}]")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"CacheConfig.page_size={self.page_size} must be a power of two")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"CacheConfig.kv_cache_dtype={self.kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}")
        memory = self.kv_cache_memory
        if memory is not None and (not isinstance(memory, int) or memory <= 0):
            raise ValueError(f"CacheConfig.kv_cache_memory={self.kv_cache_memory!r} must be a positive number of bytes")
        if not 0 < self.kv_cache_memory_fraction <= 0.95:
            raise ValueError(
                f"CacheConfig.kv_cache_memory_fraction={self.kv_cache_memory_fraction!r} must be in (0, 0.95]"
            )


MAX_NUM_SEQS = 4096
MAX_BATCHED_TOKENS = 1 << 16
MAX_MODEL_LEN = 1 << 20


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits.

    max_num_batched_tokens: tokens one step may process (prompt chunks + decodes): the largest token bucket.
    max_num_seqs: sequences one step may hold (running requests). max_model_len: prompt + output tokens of one
    sequence. max_waiting_requests: admission bound of the waiting queue (a full queue refuses new requests).
    enable_chunked_prefill: split prompts longer than the step's remaining budget across steps.
    policy: "fcfs" (arrival order; a request may not set a priority) or "priority" (vLLM's names: requests' own
    priorities order admission and preemption, lower first).
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 2048
    max_waiting_requests: int = 4096
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"SchedulerConfig.policy={self.policy!r} must be one of {SCHEDULING_POLICIES}")
        for name, hi in (
            ("max_num_batched_tokens", MAX_BATCHED_TOKENS),
            ("max_num_seqs", MAX_NUM_SEQS),
            ("max_model_len", MAX_MODEL_LEN),
            ("max_waiting_requests", 1 << 20),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
                raise ValueError(f"SchedulerConfig.{name}={value!r} must be an integer in [1, {hi}]")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(
                f"SchedulerConfig.max_num_seqs={self.max_num_seqs} exceeds max_num_batched_tokens="
                f"{self.max_num_batched_tokens}: every scheduled sequence needs at least one token of the budget"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"SchedulerConfig.max_num_batched_tokens={self.max_num_batched_tokens} < max_model_len="
                f"{self.max_model_len}: without chunked prefill a whole prompt must fit one step"
            )


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How an engine spreads over devices (vLLM's names).

    tensor_parallel_size: devices one model copy is sharded over (mesh axis "model": heads, MLP, vocab, KV heads).
    data_parallel_size: model copies (mesh axis "data"); each runs its own scheduler, pages and batch.
    multihost: the mesh takes every process's devices (jax.distributed), not only this process's; process 0
    schedules and the others replay its steps (jaxserve.multihost).
    """

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    multihost: bool = False  # mesh over every process's devices (jax.distributed); process 0 schedules

    def __post_init__(self) -> None:
        if not isinstance(self.multihost, bool):
            raise ValueError(f"ParallelConfig.multihost={self.multihost!r} must be a bool")
        if self.multihost and self.data_parallel_size > 1:
            raise ValueError(
                "ParallelConfig.data_parallel_size > 1 with multihost: not supported yet (one engine spans the hosts)"
            )
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
                raise ValueError(f"ParallelConfig.{name}={value!r} must be an integer in [1, 4096]")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


ATTENTION_BACKENDS = ("auto", "reference", "pallas_tpu", "pallas_gpu", "cpu")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the model.

    token_buckets: the step sizes (tokens) to compile; None -> powers of two up to max_num_batched_tokens.
    seed: draws the seeds of requests that bring none (a request's own seed makes it reproducible).
    speculative_config: speculative decoding (jaxserve.spec_decode.SpeculativeConfig, or vLLM's dict / its JSON
    text: {"method": "ngram", "num_speculative_tokens": 4}); None decodes one token per step.
    """

    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    token_buckets: tuple[int, ...] | None = None
    seed: int = 0
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    speculative_config: Any = None  # SpeculativeConfig | None once validated

    def __post_init__(self) -> None:
        from jaxserve.spec_decode import SpeculativeConfig

        object.__setattr__(self, "speculative_config", SpeculativeConfig.parse(self.speculative_config))
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"EngineConfig.attention_backend={self.attention_backend!r} must be one of {ATTENTION_BACKENDS}"
            )
        if self.token_buckets is not None:
            b = self.token_buckets
            if not b or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in b):
                raise ValueError(f"EngineConfig.token_buckets={b!r} must be positive integers")
            if max(b) != self.scheduler.max_num_batched_tokens:
                raise ValueError(
                    f"EngineConfig.token_buckets={b!r}: the largest must equal max_num_batched_tokens="
                    f"{self.scheduler.max_num_batched_tokens}"
                )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"EngineConfig.seed={self.seed!r} must be an integer in [0, 2**63)")


_BYTE_UNITS = {
    "": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
}


def parse_bytes(text: str) -> int:
    """'123', '512MiB', '2GB', '1.5G' -> bytes; ValueError otherwise."""
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number) :].lower()
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size in bytes (e.g. 512MiB, 2GB)") from None
    if not 0 < value < 2**50:
        raise ValueError(f"{text!r} is out of range")
    return int(value)
