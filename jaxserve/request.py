"""One sequence's host-side state: its tokens, how many have KV computed, its status. Never imports jax."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its KV dropped; it resumes by recompute
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context end
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


@dataclasses.dataclass(eq=False)
class Request:
    """A sequence the scheduler runs. `num_computed_tokens` counts tokens whose KV is in the cache.

    The one scheduling rule: each step a request gets tokens until `num_computed_tokens` catches up with
    `num_tokens` (prompt + output), within the step's budget. Only the step that catches up samples.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: min(params.max_tokens, max_model_len - prompt length)
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0  # resolved: the params' seed, or one the engine drew
    priority: int = 0  # lower runs first; ties by arrival
    cache_salt: str | None = None  # prefix-cache pages are shared only among requests with the same salt
    arrival_time: float = 0.0
    arrival_index: int = 0  # admission order: breaks arrival_time ties
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at the first schedule (-1: not yet)
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    all_token_ids: list[int] = dataclasses.field(default_factory=list)  # prompt + output, kept appended
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)  # proposals for the next step to verify

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: priority, then first come first served."""
        return (self.priority, self.arrival_time, self.arrival_index)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """After a token is appended: the finished status it causes, or None (token-level checks only;
        stop strings are matched on text by the output processor)."""
        params = self.sampling_params
        n = self.num_output_tokens
        last = self.output_token_ids[-1]
        if n >= params.min_tokens:
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
