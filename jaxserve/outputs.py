"""What the engine hands back, shaped like vLLM's `RequestOutput` / `CompletionOutput`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Logprob:
    logprob: float  # under the model's raw distribution (before penalties, temperature, filters)
    rank: int  # 1 = the most likely token
    decoded_token: str


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float  # time.perf_counter() seconds
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generated_tokens: int = 0
    num_draft_tokens: int = 0  # speculative decoding: proposals verified for this request (all its sequences)
    num_accepted_tokens: int = 0  # of which accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def ttft(self) -> float | None:
        """Arrival -> first token, seconds (queueing and prefill included)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.num_generated_tokens < 2 or self.first_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str  # everything so far (cumulative, as vLLM's default)
    token_ids: list[int]
    cumulative_logprob: float | None = None  # only when logprobs were requested
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token: the sampled one and the top-n
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string, if one ended it
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


def new_choices(out: RequestOutput, ended: set[int]):
    """The completions of a streamed output that have something to send (new text or tokens, or their finish),
    each finish once: `ended` (the caller's, per stream) collects the indices whose finish went out (n > 1: a
    choice that ended early is in every later output of its siblings)."""
    for c in out.outputs:
        if c.index in ended:
            continue
        if c.finish_reason:
            ended.add(c.index)
        if c.delta_token_ids or c.delta_text or c.finish_reason:
            yield c


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    error: str | None = None  # set when the request ended on an internal error (the engine lives on)

    def add(self, later: RequestOutput, aggregate: bool) -> None:
        """Fold a later output of the same request into this one, which nobody has read yet (vLLM's
        RequestOutput.add): a reader that fell behind gets one output covering every step it missed. aggregate:
        the outputs are deltas (DELTA) whose text, token ids and logprobs join; otherwise the later output's
        cumulative fields replace these. The delta fields always join."""
        self.finished = later.finished
        self.metrics = later.metrics
        self.num_cached_tokens = later.num_cached_tokens
        self.error = later.error or self.error
        mine = {c.index: c for c in self.outputs}
        for c in later.outputs:
            old = mine.get(c.index)
            if old is None:
                self.outputs.append(c)
                continue
            old.delta_text += c.delta_text
            old.delta_token_ids.extend(c.delta_token_ids)  # (every output owns its lists)
            if aggregate:
                old.text += c.text
                old.token_ids.extend(c.token_ids)
                if old.logprobs is not None and c.logprobs is not None:
                    old.logprobs.extend(c.logprobs)
            else:
                old.text, old.token_ids, old.logprobs = c.text, c.token_ids, c.logprobs
            old.cumulative_logprob, old.finish_reason, old.stop_reason = (
                c.cumulative_logprob,
                c.finish_reason,
                c.stop_reason,
            )
