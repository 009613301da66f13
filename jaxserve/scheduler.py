"""Continuous batching: which requests run this step, with how many tokens each. Never imports jax.

One rule (vLLM v1): each step a request gets tokens until `num_computed_tokens` catches up with `num_tokens`,
within the step's token budget (`max_num_batched_tokens`) and sequence cap (`max_num_seqs`). A prompt longer
than what is left of the budget is split across steps (chunked prefill) and shares each step with decodes:

    step budget 8:   [ d d d | p p p p p ]   3 running decodes first, then 5 tokens of a waiting prompt
    next step:       [ d d d | p p p | q q ] the prompt's last 3 tokens (it samples), a new prompt starts

A decode may carry proposals (speculative decoding: `Request.spec_token_ids`): they are scheduled after its
last token as more tokens of the same step, within the budget, the context and max_tokens, and the step
verifies them; `update` then appends the accepted ones and the token after them, and counts only their KV as
computed (a rejected proposal's slot is simply overwritten later; the prefix cache never sees it).

Order: running decodes, then running prompt chunks, each by (priority, arrival); then waiting requests by
(priority, arrival). When the page pool runs out, the lowest-priority, newest running request is preempted
(its pages freed, `num_computed_tokens` reset) and goes back to the waiting queue to resume by recompute;
its prompt pages are usually still in the prefix cache, so resuming is cheap.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

from jaxserve.config import SchedulerConfig
from jaxserve.errors import QueueFullError
from jaxserve.kv_cache.block_manager import BlockManager
from jaxserve.request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledRequest:
    """One sequence's share of a step: tokens [start, start + num_tokens) of its all_token_ids followed by
    spec_token_ids (proposals: the last len(spec_token_ids) of num_tokens)."""

    request: Request
    start: int
    num_tokens: int
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        """The step's input tokens for this sequence."""
        real = self.request.all_token_ids[self.start : self.start + self.num_tokens - len(self.spec_token_ids)]
        return real + self.spec_token_ids

    @property
    def samples(self) -> bool:
        """The step catches the request up, so its last token's logits pick the next token (with proposals:
        the logits after its last real token and after each proposal verify them)."""
        return self.start + self.num_tokens - len(self.spec_token_ids) == self.request.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[str]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclasses.dataclass
class RequestUpdate:
    """What one step did to a request: the tokens it got and, if it ended, why."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        room = block_manager.num_usable_pages * block_manager.page_size
        if room < config.max_model_len:
            # One sequence must always fit on its own, or preempting everyone else could not make room for it.
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the {room} tokens the KV pages hold")
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Request] = []  # sorted by sort_key
        self.running: list[Request] = []  # sorted by sort_key
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.num_preemptions = 0
        self._arrivals = 0

    # ---- admission and abort ------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting_requests} requests)")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens: with room for one new token that exceeds "
                f"max_model_len={self.config.max_model_len}"
            )
        request.arrival_index = self._arrivals
        self._arrivals += 1
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=lambda r: r.sort_key)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (abort, or a stop string found by the output processor); frees its pages."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
            self.block_manager.free(request_id)
        else:
            self.waiting.remove(req)
        req.status = status
        return req

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[str] = []
        # Each scheduled sequence takes one sampler row and each proposal one more: a step has max_num_seqs rows
        # (ModelRunner.pack), so proposals take only the rows no running or admitted sequence could need.
        num_spec = 0

        # Running requests: decodes first, then those still in their prompt (chunked prefill).
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.sort_key))
        for req in order:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            spec = []
            if n == req.num_tokens - req.num_computed_tokens:
                spec = self._proposals(req, min(budget - n, self.config.max_num_seqs - len(self.running) - num_spec))
            num_spec += len(spec)
            n += len(spec)
            while self.block_manager.allocate_slots(req.request_id, req.num_computed_tokens + n) is None:
                victim = self.running[-1]  # lowest priority, newest
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim.request_id in scheduled:
                    budget += scheduled.pop(victim.request_id).num_tokens
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled[req.request_id] = ScheduledRequest(req, req.num_computed_tokens, n, spec)
                budget -= n

        # Waiting requests, unless this step already had to preempt (no room to admit anyone).
        while not preempted and self.waiting and budget > 0 and len(self.running) + num_spec < self.config.max_num_seqs:
            req = self.waiting[0]
            pages, num_cached = self.block_manager.get_computed_pages(
                req.request_id, req.all_token_ids, record=False, salt=req.cache_salt
            )
            n = req.num_tokens - num_cached
            if n > budget:
                if not self.config.enable_chunked_prefill:
                    break
                n = budget
            if self.block_manager.allocate_slots(req.request_id, num_cached + n, pages, salt=req.cache_salt) is None:
                break
            self.waiting.pop(0)
            self.block_manager.record_lookup(req.num_tokens, num_cached)
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=lambda r: r.sort_key)
            scheduled[req.request_id] = ScheduledRequest(req, num_cached, n)
            budget -= n

        return SchedulerOutput(list(scheduled.values()), preempted)

    def _proposals(self, req: Request, room: int) -> list[int]:
        """The proposals a caught-up decode verifies this step: as many as the budget left (`room`), the context
        and max_tokens allow (the token after them is the step's own, so each bound leaves one for it)."""
        left = min(room, self.config.max_model_len - req.num_tokens - 1, req.max_tokens - req.num_output_tokens - 1)
        return req.spec_token_ids[: max(0, left)]

    def _preempt(self, req: Request) -> None:
        req.spec_token_ids = []
        self.running.remove(req)
        self.block_manager.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=lambda r: r.sort_key)

    def update(self, output: SchedulerOutput, sampled: Sequence[Sequence[int] | None]) -> list[RequestUpdate]:
        """Apply a step's results. `sampled[i]` is what `output.scheduled[i]` emitted (None if it did not
        sample): one token, or with proposals the accepted ones and the token after them. Appends tokens (every
        one checked for a stop: a stop inside the run ends it there), counts computed KV (real tokens and
        accepted proposals), caches newly full pages, finishes requests that hit a stop condition."""
        updates = []
        for item, tokens in zip(output.scheduled, sampled, strict=True):
            req = item.request
            if req.status is not RequestStatus.RUNNING:
                continue  # finished or preempted while the step ran
            req.spec_token_ids = []
            before = req.num_computed_tokens
            num_spec = len(item.spec_token_ids)
            accepted = 0
            if item.samples:
                if (
                    not tokens
                    or len(tokens) > num_spec + 1
                    or list(tokens[:-1]) != item.spec_token_ids[: len(tokens) - 1]
                ):
                    raise ValueError(
                        f"{req.request_id}: emitted {tokens} do not follow its proposals {item.spec_token_ids}"
                    )
                accepted = len(tokens) - 1
            req.num_computed_tokens = item.start + item.num_tokens - num_spec + accepted
            if not item.samples:
                self._cache_pages(req, before)
                continue
            new, status = [], None
            for token in tokens:
                req.append_output(int(token))
                new.append(int(token))
                status = req.check_stop(self.config.max_model_len)
                if status is not None:
                    break
            req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
            self._cache_pages(req, before)
            if status is not None:
                self.finish_request(req.request_id, status)
            updates.append(RequestUpdate(req, new, status is not None))
        return updates

    def _cache_pages(self, req: Request, before: int) -> None:
        """Enter the pages that became full since `before` computed tokens into the prefix cache."""
        page_size = self.block_manager.page_size
        if req.num_computed_tokens // page_size > before // page_size:
            self.block_manager.cache_full_pages(req.request_id, req.all_token_ids[: req.num_computed_tokens])
