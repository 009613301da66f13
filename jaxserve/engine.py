"""The engine core: requests in, one ragged step at a time, outputs out. Synchronous; `AsyncEngine` runs it on a
background thread and `LLM` drives it to completion for offline batches.

    add_request -> Scheduler.schedule -> ModelRunner.prepare/execute -> Scheduler.update -> text / stop strings
    -> RequestOutput (one per request touched by the step)

A request with `n > 1` runs as n sequences ("{k}_{request_id}", seeds seed + k) whose outputs are gathered
into one RequestOutput; the prompt's full pages are shared through the prefix cache.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxserve.api.validation import (  # noqa: F401  (PromptTooLongError: re-exported)
    PromptTooLongError, check_priority, check_prompt_tokens, check_request_id,
)  # fmt: skip
from jaxserve.config import EngineConfig
from jaxserve.detokenizer import TextStream
from jaxserve.kv_cache.block_manager import BlockManager
from jaxserve.model_runner import ModelRunner
from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling import SampleRow, SamplerOutput, SamplingParams
from jaxserve.scheduler import QueueFullError, Scheduler, ScheduledRequest
from models.loader import LoadedModel

log = logging.getLogger("jaxserve.engine")

_NO_SAMPLE = SamplingParams(temperature=0.0, max_tokens=1)  # rows of a step that do not sample (mid-prompt)


@dataclasses.dataclass
class _Sequence:
    request: Request
    stream: TextStream
    completion: CompletionOutput


@dataclasses.dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[_Sequence]
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.completion.finish_reason is not None for s in self.seqs)


class LLMEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, *, progress: bool = False,
                 mesh: jax.sharding.Mesh | None = None):  # fmt: skip
        """mesh: this engine's devices, with a "model" axis (None: the first tensor_parallel_size devices when
        that is > 1, else the default device). Data parallelism is several engines (jaxserve.parallel)."""
        config = config or EngineConfig()
        if mesh is None and (config.parallel.tensor_parallel_size > 1 or config.parallel.multihost):
            from jaxserve.parallel import make_mesh

            mesh = make_mesh(dataclasses.replace(config.parallel, data_parallel_size=1)).replica(0)
        limit = model.config.max_position_embeddings
        if config.scheduler.max_model_len > limit:
            raise ValueError(f"SchedulerConfig.max_model_len={config.scheduler.max_model_len} exceeds the model's "
                             f"context of {limit} tokens")  # fmt: skip
        self.model = model
        self.config = config
        self.tokenizer = model.tokenizer
        self.max_model_len = config.scheduler.max_model_len
        self.runner = ModelRunner(model.config, model.params, cache=config.cache, scheduler=config.scheduler,
                                  attention_backend=config.attention_backend, buckets=config.token_buckets,
                                  progress=progress, mesh=mesh)  # fmt: skip
        self.block_manager = BlockManager(self.runner.pool.num_pages, config.cache.page_size,
                                          model_id=model.path, enable_prefix_caching=config.enable_prefix_caching)  # fmt: skip
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self._rng = np.random.default_rng(config.seed)
        self._parents: dict[str, _Parent] = {}
        self._seqs: dict[str, tuple[_Parent, _Sequence]] = {}
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    # ---- requests -------------------------------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids: every element must be an int")
        return None, [int(t) for t in ids]

    def check_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        check_prompt_tokens(prompt_token_ids, max_model_len=self.max_model_len, vocab_size=self.model.config.vocab_size)

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    priority: int = 0, arrival_time: float | None = None) -> None:  # fmt: skip
        """Queue a request (raises ValueError naming the field on bad input; nothing is queued then)."""
        params = params or SamplingParams()
        check_request_id(request_id)
        if request_id in self._parents:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: need a SamplingParams, got {type(params).__name__}")
        check_priority(priority)
        text, ids = self.tokenize(prompt)
        self.check_prompt(ids)
        free_seqs = self.waiting_room
        if params.n > free_seqs:
            raise QueueFullError(f"the waiting queue has room for {free_seqs} sequences; this request needs {params.n}")
        child_ids = [request_id] if params.n == 1 else [f"{k}_{request_id}" for k in range(params.n)]
        taken = [rid for rid in child_ids if rid in self._seqs]
        if taken:
            raise ValueError(f"request_id={request_id!r}: its sequence id {taken[0]!r} is already in use")
        now = time.perf_counter() if arrival_time is None else arrival_time
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        base_seed = int(self._rng.integers(2**32)) if params.seed is None else params.seed
        parent = _Parent(request_id, text, ids, params, RequestMetrics(arrival_time=now), [])
        for k, rid in enumerate(child_ids):
            req = Request(rid, ids, params, max_tokens, eos_token_ids=tuple(self.tokenizer.eos_token_ids),
                          seed=(base_seed + k) % 2**63, priority=priority, arrival_time=now)  # fmt: skip
            stream = TextStream(self.tokenizer, params.stop, skip_special_tokens=params.skip_special_tokens,
                                include_stop_str_in_output=params.include_stop_str_in_output)  # fmt: skip
            logprobs = [] if params.logprobs is not None else None
            completion = CompletionOutput(k, "", [], 0.0 if logprobs is not None else None, logprobs)
            parent.seqs.append(_Sequence(req, stream, completion))
        for seq in parent.seqs:
            self.scheduler.add_request(seq.request)
            self._seqs[seq.request.request_id] = (parent, seq)
        self._parents[request_id] = parent
        self.num_prompt_tokens += len(ids) * params.n

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now (its pages are freed); returns its final output, None if it is unknown/finished."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for seq in parent.seqs:
            if seq.completion.finish_reason is None:
                self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_ABORTED)
                self._finish_seq(seq, "abort", "")
        return self._emit(parent, time.perf_counter())

    @property
    def waiting_room(self) -> int:
        """Sequences the waiting queue can still take."""
        return self.config.scheduler.max_waiting_requests - len(self.scheduler.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # ---- one step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        block_tables = [self.block_manager.block_table(s.request.request_id) for s in sched.scheduled]
        rows = [self._sample_row(s) for s in sched.scheduled]
        bucket, inputs, st, slots = self.runner.prepare(sched.scheduled, block_tables, rows)
        result = jax.device_get(self.runner.execute(bucket, inputs, st))
        self.num_steps += 1
        token_ids = result.token_ids
        sampled = [int(token_ids[slot]) if s.samples else None for slot, s in zip(slots, sched.scheduled)]
        row_of = {s.request.request_id: slot for slot, s in zip(slots, sched.scheduled)}
        updates = self.scheduler.update(sched, sampled)
        now = time.perf_counter()
        touched: dict[str, _Parent] = {}
        for update in updates:
            parent, seq = self._seqs[update.request.request_id]
            try:
                self._on_token(parent, seq, update.new_token_ids[0], update.finished, result,
                               row_of[update.request.request_id], now)  # fmt: skip
            except Exception as e:  # a bug in one request's output path ends that request, not the engine
                log.exception("request %s failed", parent.request_id)
                parent.error = f"internal error: {type(e).__name__}: {e}"
                if seq.completion.finish_reason is None:
                    self.scheduler.finish_request(seq.request.request_id, RequestStatus.FINISHED_ABORTED)
                    self._finish_seq(seq, "abort", "")
            touched[parent.request_id] = parent
        return [self._emit(parent, now) for parent in touched.values()]

    def _sample_row(self, item: ScheduledRequest) -> SampleRow:
        req = item.request
        if not item.samples:
            return SampleRow(_NO_SAMPLE, 0, 0, (), ())
        params = req.sampling_params
        step = req.num_output_tokens
        banned: tuple[int, ...] = ()
        if step < params.min_tokens:
            banned = params.stop_token_ids + (() if params.ignore_eos else req.eos_token_ids)
        return SampleRow(params, req.seed, step, req.prompt_token_ids, req.output_token_ids, banned)

    def _on_token(self, parent: _Parent, seq: _Sequence, token: int, finished: bool, result, row: int,
                  now: float) -> None:  # fmt: skip
        comp, req = seq.completion, seq.request
        metrics = parent.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        metrics.num_generated_tokens += 1
        self.num_generated_tokens += 1
        comp.token_ids.append(token)
        comp.delta_token_ids.append(token)
        if comp.logprobs is not None:
            self._add_logprobs(comp, token, result, row, parent.params.logprobs)
        delta, stop = seq.stream.add(token)
        comp.text += delta
        comp.delta_text += delta
        if stop is not None and not finished:
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
        if stop is not None:
            req.stop_reason = stop
            req.status = RequestStatus.FINISHED_STOPPED
            finished = True
        if finished:
            self._finish_seq(seq, req.status.finish_reason or "stop", seq.stream.finish())

    def _add_logprobs(self, comp: CompletionOutput, token: int, out: SamplerOutput, row: int, num_top: int) -> None:
        entry = {token: Logprob(float(out.logprobs[row]), int(out.ranks[row]), self._piece(token))}
        for rank, (tid, lp) in enumerate(zip(out.top_ids[row, :num_top], out.top_logprobs[row, :num_top])):
            entry.setdefault(int(tid), Logprob(float(lp), rank + 1, self._piece(int(tid))))
        comp.logprobs.append(entry)
        comp.cumulative_logprob += float(out.logprobs[row])

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _finish_seq(self, seq: _Sequence, reason: str, tail: str) -> None:
        comp = seq.completion
        comp.text += tail
        comp.delta_text += tail
        comp.finish_reason = reason
        comp.stop_reason = seq.request.stop_reason

    def _emit(self, parent: _Parent, now: float) -> RequestOutput:
        outputs = []
        for seq in parent.seqs:
            comp = seq.completion
            outputs.append(dataclasses.replace(comp, token_ids=list(comp.token_ids),
                                               logprobs=None if comp.logprobs is None else list(comp.logprobs)))  # fmt: skip
            comp.delta_text, comp.delta_token_ids = "", []
        finished = parent.finished
        if finished:
            parent.metrics.finished_time = now
            del self._parents[parent.request_id]
            for seq in parent.seqs:
                self._seqs.pop(seq.request.request_id, None)
        cached = max(0, parent.seqs[0].request.num_cached_tokens)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, finished,
                             dataclasses.replace(parent.metrics), cached, parent.error)  # fmt: skip
