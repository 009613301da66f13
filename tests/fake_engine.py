"""A fake engine implementing jaxserve.engine_api.Engine without a model or a compiled step (JetStream's mock engine):
the servers, batch jobs and metrics run over it in tests that need no weights.

Its outputs can be computed by hand: sequence k of a request echoes the prompt's token ids from offset k, cyclically
(output token i = prompt[(i + k) % len(prompt)]; greedy requests, temperature 0, use offset 0 for every sequence, as a
real engine's greedy copies are alike), one token per sequence per step, until max_tokens or the context end ("length")
or a stop token id (the scheduler's own Request.check_stop); it never emits EOS. Its "distribution" at every step ranks
the emitted token first and token (t + j) % V j-th after it, with logprob -(j + 1) * ln 2 (probabilities 1/2, 1/4, ...).
Text, stop strings, logprobs and n > 1 gathering go through the real OutputProcessor, so those paths are the engine's
own."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from jaxserve.api.validation import (
    check_banned,
    check_logit_bias,
    check_priority,
    check_prompt_tokens,
    check_request_id,
)
from jaxserve.engine_api import EngineStats, ModelCard
from jaxserve.errors import QueueFullError
from jaxserve.output_processor import OutputProcessor, SequenceTokens
from jaxserve.outputs import RequestMetrics
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling import MAX_LOGPROBS, SamplerOutput, SamplingParams


def echo_token(prompt: Sequence[int], k: int, i: int) -> int:
    """The i-th output token of sequence k (the rule the docstring gives)."""
    return prompt[(i + k) % len(prompt)]


def fake_sampler_output(tokens: Sequence[int], vocab_size: int) -> SamplerOutput:
    """Row r: token tokens[r] at rank 1; top j is (tokens[r] + j) % V with logprob -(j + 1) ln 2."""
    t = np.asarray(tokens, np.int32)
    j = np.arange(MAX_LOGPROBS, dtype=np.int32)
    top_ids = (t[:, None] + j[None, :]) % vocab_size
    top_lp = np.broadcast_to(-(j + 1) * np.float32(np.log(2.0)), top_ids.shape).astype(np.float32)
    return SamplerOutput(t, top_lp[:, 0].copy(), np.ones(len(t), np.int32), top_ids, top_lp)


class FakeEngine:
    def __init__(
        self,
        tokenizer,
        *,
        max_model_len: int = 256,
        vocab_size: int | None = None,
        max_num_seqs: int = 8,
        max_waiting_requests: int = 64,
        max_num_batched_tokens: int = 8,
        page_size: int = 16,
        path: str = "fake-model.gguf",
        scheduling_policy: str = "fcfs",
        step_seconds: float = 0.0,
    ):
        """step_seconds: how long a step takes (a device step's time: streams' readers keep up between steps,
        so they see one output per step rather than a few steps folded into one)."""
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.max_num_seqs = max_num_seqs
        self.max_waiting_requests = max_waiting_requests
        self.max_num_batched_tokens, self.page_size = max_num_batched_tokens, page_size  # (the model card's only)
        self.path = path
        self.scheduling_policy = scheduling_policy  # checked as the engine checks it (it orders nothing here)
        self.step_seconds = step_seconds
        self.outputs = OutputProcessor(tokenizer, self._finish)
        self._active: dict[str, tuple[Request, int]] = {}  # sequence id -> (request, its index k)
        self.num_steps = self.num_prompt_tokens = 0
        self.params_seen: list[SamplingParams] = []

    # ---- the Engine interface -------------------------------------------------------------------------------

    def tokenize(self, prompt):
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def check_prompt(self, prompt_token_ids) -> None:
        check_prompt_tokens(prompt_token_ids, max_model_len=self.max_model_len, vocab_size=self.vocab_size)

    def add_request(self, request_id, prompt, params=None, *, priority=0, arrival_time=None, cache_salt=None) -> None:
        params = params or SamplingParams()
        check_request_id(request_id)
        check_priority(priority, policy=self.scheduling_policy)
        check_logit_bias(params, self.vocab_size)
        check_banned(params or SamplingParams(), self.tokenizer.eos_token_ids)
        if request_id in self.outputs.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        self.check_prompt(ids)
        if params.n > self.waiting_room:
            raise QueueFullError(f"the waiting queue has room for {self.waiting_room} sequences")
        now = time.perf_counter() if arrival_time is None else arrival_time
        limit = self.max_model_len - len(ids)
        max_tokens = limit if params.max_tokens is None else min(limit, params.max_tokens)
        child_ids = [request_id] if params.n == 1 else [f"{k}_{request_id}" for k in range(params.n)]
        reqs = [
            Request(rid, ids, params, max_tokens, status=RequestStatus.RUNNING, arrival_time=now) for rid in child_ids
        ]
        self.outputs.new_request(request_id, text, ids, params, RequestMetrics(arrival_time=now), reqs)
        self.params_seen.append(params)  # (what the front ends made of a request's fields, for their tests)
        for k, req in enumerate(reqs):
            self._active[req.request_id] = (req, k)
        self.num_prompt_tokens += len(ids) * params.n

    def abort_request(self, request_id):
        return self.outputs.abort(request_id, time.perf_counter())

    def step(self):
        running = list(self._active.values())[: self.max_num_seqs]
        if not running:
            return []
        self.num_steps += 1
        if self.step_seconds:
            time.sleep(self.step_seconds)
        new, tokens = [], []
        for row, (req, k) in enumerate(running):
            offset = k if req.sampling_params.temperature > 0 else 0
            token = echo_token(req.prompt_token_ids, offset, req.num_output_tokens)
            req.append_output(token)
            status = req.check_stop(self.max_model_len)  # stop token ids, max_tokens, the context end (no EOS)
            done = status is not None
            if done:
                self._finish(req.request_id, status)
            new.append(SequenceTokens(req.request_id, [token], [row], done))
            tokens.append(token)
        return self.outputs.process(new, fake_sampler_output(tokens, self.vocab_size), time.perf_counter())

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    @property
    def waiting_room(self) -> int:
        return self.max_waiting_requests - len(self._active)

    def stats(self) -> EngineStats:
        n = len(self._active)
        return EngineStats(
            num_waiting=0,
            num_running=n,
            kv_pages_in_use=n,
            kv_pages_total=self.max_num_seqs,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            num_preemptions=0,
            prompt_tokens=self.num_prompt_tokens,
            generation_tokens=self.outputs.num_generated_tokens,
            steps=self.num_steps,
            compilations=0,
            compilation_cache_hits=0,
            compilations_since_warmup=0,
        )

    def model_card(self) -> ModelCard:
        return ModelCard(
            path=self.path,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            dtype="float32",
            num_parameters=0,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            page_size=self.page_size,
            num_kv_pages=self.max_num_seqs,
            has_chat_template=bool(self.tokenizer.chat_template),
            max_waiting_requests=self.max_waiting_requests,
        )

    @property
    def step_channel(self):
        return None

    # ---- scheduler side -------------------------------------------------------------------------------------

    def _finish(self, request_id: str, status: RequestStatus) -> None:
        entry = self._active.pop(request_id, None)
        if entry is not None:
            entry[0].status = status
