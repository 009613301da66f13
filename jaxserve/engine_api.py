"""The one interface every engine implements (LLMEngine, DataParallelEngine, a multi-host leader, the tests'
fake engine) and the servers, batch jobs and metrics use, and nothing else of an engine (JetStream's engine API,
vLLM's EngineClient). A leaf module: no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from jaxserve.outputs import RequestOutput
    from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What an engine serves and how it is sized (the gRPC ModelInfo, /v1/models, batch outputs)."""

    path: str  # the model file or directory
    max_model_len: int
    vocab_size: int
    dtype: str
    num_parameters: int
    max_num_seqs: int
    max_num_batched_tokens: int
    page_size: int
    num_kv_pages: int  # over every replica
    has_chat_template: bool
    max_waiting_requests: int
    weight_bytes: int = 0  # the weights as held (every shard, every replica)
    kv_cache_bytes: int = 0  # K and V pages, over every replica


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """Counters and gauges at one moment (the Prometheus collector reads these)."""

    num_waiting: int  # sequences in the waiting queue
    num_running: int  # sequences holding KV pages
    kv_pages_in_use: int
    kv_pages_total: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    steps: int
    compilations: int  # process-wide (persistent-cache loads too)
    compilation_cache_hits: int
    compilations_since_warmup: int
    spec_num_drafts: int = 0  # speculative decoding: sequences that verified proposals (once per step each)
    spec_num_draft_tokens: int = 0  # proposals verified
    spec_num_accepted_tokens: int = 0  # of which accepted

    @staticmethod
    def total(parts: Sequence[EngineStats]) -> EngineStats:
        """Replicas summed (the compile counters are process-wide: taken once)."""
        fields = [f.name for f in dataclasses.fields(EngineStats)]
        per_process = ("compilations", "compilation_cache_hits", "compilations_since_warmup")
        return EngineStats(
            **{
                name: getattr(parts[0], name) if name in per_process else sum(getattr(p, name) for p in parts)
                for name in fields
            }
        )


@runtime_checkable
class Engine(Protocol):
    """Synchronous: add requests, then call step() until has_unfinished_requests() is False."""

    tokenizer: Any  # models.tokenizer.Tokenizer
    max_model_len: int

    def tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids); a bad id list raises ValueError naming prompt_token_ids."""

    def check_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        """ValueError (PromptTooLongError) naming the field when the prompt cannot run."""

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request; ValueError naming the field (nothing queued), QueueFullError when full. Prefix-cache
        pages are shared only among requests with the same `cache_salt`."""

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now; its final output, None if unknown or finished."""

    def step(self) -> list[RequestOutput]:
        """One step: an output per request it touched."""

    def has_unfinished_requests(self) -> bool: ...

    @property
    def waiting_room(self) -> int:
        """Sequences the waiting queue can still take."""

    def stats(self) -> EngineStats: ...

    def model_card(self) -> ModelCard: ...

    @property
    def step_channel(self) -> Any:
        """The multi-host step channel (jaxserve.multihost.StepChannel) of an engine spanning processes, or None."""
