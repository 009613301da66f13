"""The engine core: requests in, one ragged step at a time, outputs out. Synchronous; `AsyncEngine` runs it on a
background thread and `LLM` drives it to completion for offline batches.

    add_request -> Scheduler.schedule -> ModelRunner.prepare/execute -> Scheduler.update (token ids, EOS, length)
    -> OutputProcessor.process (text, stop strings, logprobs, n > 1 gathering) -> RequestOutput per request

A request with `n > 1` runs as n sequences ("{k}_{request_id}", seeds seed + k) whose outputs are gathered
into one RequestOutput; the prompt's full pages are shared through the prefix cache.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxserve.api.validation import (  # noqa: F401  (PromptTooLongError: re-exported)
    PromptTooLongError,
    check_banned,
    check_logit_bias,
    check_priority,
    check_prompt_tokens,
    check_request_id,
)
from jaxserve.config import EngineConfig
from jaxserve.sampling_params import banned_ids
from jaxserve.engine_api import EngineStats, ModelCard
from jaxserve.kv_cache.block_manager import BlockManager
from jaxserve.model_runner import ModelRunner, token_buckets
from jaxserve.output_processor import OutputProcessor, SequenceTokens
from jaxserve.outputs import RequestMetrics, RequestOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling import SampleRow, SamplingParams
from jaxserve.scheduler import QueueFullError, Scheduler, ScheduledRequest
from jaxserve.spec_decode import NgramProposer, SpecDecodeStats
from models.loader import LoadedModel

if TYPE_CHECKING:
    from jaxserve.draft import DraftProposer

_NO_SAMPLE = SamplingParams(temperature=0.0, max_tokens=1)  # rows of a step that do not sample (mid-prompt)


def verify_buckets(config: EngineConfig, k: int) -> tuple[int, ...]:
    """The default buckets (powers of two) and k + 1: one stream's verification step (its token and k
    proposals) in a bucket of its own size. On CPU a step costs about its bucket's rows (SmolLM2 fp32: 5 rows
    ~44 ms where 8 take ~54), and one stream verifying k = 4 is most of what speculation runs."""
    budget = config.scheduler.max_num_batched_tokens
    return tuple(sorted(set(token_buckets(budget)) | ({k + 1} if k + 1 < budget else set())))


class LLMEngine:
    def __init__(
        self,
        model: LoadedModel,
        config: EngineConfig | None = None,
        *,
        progress: bool = False,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """mesh: this engine's devices, with a "model" axis (None: the first tensor_parallel_size devices when
        that is > 1, else the default device). Data parallelism is several engines (jaxserve.parallel)."""
        config = config or EngineConfig()
        if mesh is None and (config.parallel.tensor_parallel_size > 1 or config.parallel.multihost):
            from jaxserve.parallel import make_mesh

            mesh = make_mesh(dataclasses.replace(config.parallel, data_parallel_size=1)).replica(0)
        limit = model.config.max_position_embeddings
        if config.scheduler.max_model_len > limit:
            raise ValueError(
                f"SchedulerConfig.max_model_len={config.scheduler.max_model_len} exceeds the model's "
                f"context of {limit} tokens"
            )
        spec = config.speculative_config
        if spec is not None and config.token_buckets is None:
            config = dataclasses.replace(config, token_buckets=verify_buckets(config, spec.num_speculative_tokens))
        self.config = config
        self.tokenizer = model.tokenizer
        self.max_model_len = config.scheduler.max_model_len
        self.runner = ModelRunner(
            model.config,
            model.params,
            cache=config.cache,
            scheduler=config.scheduler,
            attention_backend=config.attention_backend,
            buckets=config.token_buckets,
            progress=progress,
            mesh=mesh,
        )
        if self.runner.params is not model.params:  # sharded copies under a mesh: keep no reference to the
            model = dataclasses.replace(model, params=self.runner.params)  # unsharded ones (freed with the caller's)
        self.model = model
        self.block_manager = BlockManager(
            self.runner.pool.num_pages,
            config.cache.page_size,
            model_id=model.path,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self._rng = np.random.default_rng(config.seed)
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler.finish_request)
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.proposer: NgramProposer | DraftProposer | None = None
        if spec is not None and spec.method == "ngram":
            self.proposer = NgramProposer(spec, self.max_model_len)
        elif spec is not None:  # draft_model: its own runner over the same mesh, compiled now
            from jaxserve.draft import DraftProposer

            self.proposer = DraftProposer(spec, model, config, mesh=mesh, progress=progress)
            self.runner.compiles_after_warmup_base = self.runner.counter.snapshot()[0]  # the draft's are warm-up
        self.spec_stats = SpecDecodeStats(0 if spec is None else spec.num_speculative_tokens)

    @property
    def num_generated_tokens(self) -> int:
        return self.outputs.num_generated_tokens

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
        """Queue a request (raises ValueError naming the field on bad input; nothing is queued then). Its
        prefix-cache pages are shared only with requests of the same `cache_salt` (None: the unsalted pool)."""
        params = params or SamplingParams()
        check_request_id(request_id)
        if request_id in self.outputs.requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: need a SamplingParams, got {type(params).__name__}")
        check_priority(priority, policy=self.config.scheduler.policy)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt or len(cache_salt) > 1024):
            raise ValueError("cache_salt: must be a non-empty string of at most 1024 characters, or None")
        eos = tuple(self.tokenizer.eos_token_ids)
        check_banned(params, eos)
        text, ids = self.tokenize(prompt)
        self.check_prompt(ids)
        check_logit_bias(params, self.model.config.vocab_size)
        free_seqs = self.waiting_room
        if params.n > free_seqs:
            raise QueueFullError(f"the waiting queue has room for {free_seqs} sequences; this request needs {params.n}")
        child_ids = [request_id] if params.n == 1 else [f"{k}_{request_id}" for k in range(params.n)]
        taken = [rid for rid in child_ids if self.outputs.has_sequence(rid)]
        if taken:
            raise ValueError(f"request_id={request_id!r}: its sequence id {taken[0]!r} is already in use")
        now = time.perf_counter() if arrival_time is None else arrival_time
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        base_seed = int(self._rng.integers(2**32)) if params.seed is None else params.seed
        requests = [
            Request(
                rid,
                ids,
                params,
                max_tokens,
                eos_token_ids=eos,
                seed=(base_seed + k) % 2**63,
                priority=priority,
                cache_salt=cache_salt,
                arrival_time=now,
            )
            for k, rid in enumerate(child_ids)
        ]
        self.outputs.new_request(request_id, text, ids, params, RequestMetrics(arrival_time=now), requests)
        for req in requests:
            self.scheduler.add_request(req)
        self.num_prompt_tokens += len(ids) * params.n

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now (its pages are freed); returns its final output, None if it is unknown/finished."""
        return self.outputs.abort(request_id, time.perf_counter())

    @property
    def waiting_room(self) -> int:
        """Sequences the waiting queue can still take."""
        return self.config.scheduler.max_waiting_requests - len(self.scheduler.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.outputs.requests)

    # ---- what the servers read (jaxserve.engine_api.Engine) -----------------------------------------------------

    def startup_report(self) -> dict:
        """Where this engine's start went: loading the weights, allocating the KV pool, compiling the buckets (how
        many came from the persistent cache)."""
        return {"load_seconds": round(self.model.load_seconds, 3), **self.runner.startup_report()}

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        compiles, cache_hits = self.runner.counter.snapshot()
        return EngineStats(
            num_waiting=len(sched.waiting),
            num_running=len(sched.running),
            kv_pages_in_use=bm.num_usable_pages - bm.num_free_pages,
            kv_pages_total=bm.num_usable_pages,
            prefix_cache_queries=bm.num_queried_tokens,
            prefix_cache_hits=bm.num_hit_tokens,
            num_preemptions=sched.num_preemptions,
            prompt_tokens=self.num_prompt_tokens,
            generation_tokens=self.num_generated_tokens,
            steps=self.num_steps,
            compilations=compiles,
            compilation_cache_hits=cache_hits,
            compilations_since_warmup=self.runner.compiles_since_warmup,
            spec_num_drafts=self.spec_stats.num_drafts,
            spec_num_draft_tokens=self.spec_stats.num_draft_tokens,
            spec_num_accepted_tokens=self.spec_stats.num_accepted_tokens,
        )

    def model_card(self) -> ModelCard:
        cfg, sched = self.model.config, self.config.scheduler
        return ModelCard(
            path=self.model.path,
            max_model_len=self.max_model_len,
            vocab_size=cfg.vocab_size,
            dtype=str(self.model.dtype),
            num_parameters=int(cfg.num_params),
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            page_size=self.config.cache.page_size,
            num_kv_pages=self.runner.pool.num_pages,
            has_chat_template=bool(self.tokenizer.chat_template),
            max_waiting_requests=sched.max_waiting_requests,
            weight_bytes=sum(int(x.nbytes) for x in jax.tree.leaves(self.model.params)),
            kv_cache_bytes=self.runner.pool.total_bytes,
        )

    def prompt_logits(self, prompt: str | Sequence[int]) -> np.ndarray:
        """f32[n, V]: the logits at every position of a prompt (teacher forcing: scoring, perplexity, parity
        checks), through the engine's own forward in chunks of max_num_batched_tokens, over pages taken from the
        pool and given back after (never entered in the prefix cache). A prompt may fill max_model_len. Call it
        from the thread that steps the engine; each token bucket it uses compiles once (ModelRunner.prompt_logits).
        """
        _, ids = self.tokenize(prompt)
        if len(ids) > self.max_model_len:
            raise PromptTooLongError("prompt", f"{len(ids)} tokens exceeds max_model_len={self.max_model_len}")
        check_prompt_tokens(ids, max_model_len=self.max_model_len + 1, vocab_size=self.model.config.vocab_size)
        rid = "\x00prompt_logits"  # not printable: no client request id can be it
        if self.block_manager.allocate_slots(rid, len(ids)) is None:
            raise QueueFullError(f"prompt_logits: {len(ids)} tokens need more KV pages than are free now")
        req = Request(rid, ids, _NO_SAMPLE, 0)
        try:
            table = self.block_manager.block_table(rid)
            chunk = self.config.scheduler.max_num_batched_tokens
            out = []
            for start in range(0, len(ids), chunk):
                item = ScheduledRequest(req, start, min(chunk, len(ids) - start))
                bucket, inputs, _ = self.runner.pack([item], [table])
                out.append(np.asarray(jax.device_get(self.runner.prompt_logits(bucket, inputs)))[: item.num_tokens])
        finally:
            self.block_manager.free(rid)
        return np.concatenate(out)

    @property
    def step_channel(self):
        return self.runner.channel

    # ---- one step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        block_tables = [self.block_manager.block_table(s.request.request_id) for s in sched.scheduled]
        sample_rows = [self._sample_rows(s) for s in sched.scheduled]
        bucket, inputs, st, rows = self.runner.prepare(sched.scheduled, block_tables, sample_rows)
        result = jax.device_get(self.runner.execute(bucket, inputs, st))
        self.num_steps += 1
        token_ids = result.token_ids
        sampled: list[list[int] | None] = []
        for item, item_rows in zip(sched.scheduled, rows):
            if not item.samples:
                sampled.append(None)
                continue
            drawn = [int(token_ids[r]) for r in item_rows]
            sampled.append(drawn[: self._count_accepted(item, drawn) + 1])
        rows_of = {s.request.request_id: r for s, r in zip(sched.scheduled, rows)}
        updates = self.scheduler.update(sched, sampled)
        new = [
            SequenceTokens(
                u.request.request_id,
                u.new_token_ids,
                rows_of[u.request.request_id][: len(u.new_token_ids)],
                u.finished,
            )
            for u in updates
        ]
        outputs = self.outputs.process(new, result, time.perf_counter())
        if self.proposer is not None:
            self._propose([u.request for u in updates])
        return outputs

    def _count_accepted(self, item: ScheduledRequest, drawn: list[int]) -> int:
        """How many of item's proposals the step accepts: drawn[j] is the target's own draw after the j-th
        (made exactly as plain decoding makes it: same processing, same key (seed, step + j)), and a proposal is
        accepted while it equals that draw; the draw at the first mismatch (or after the last proposal) is the
        step's own token. Rejection sampling against a point-mass proposal: exact for greedy and random rows
        (jaxserve.rejection_sampler.verify_point_mass is the same rule on device)."""
        spec = item.spec_token_ids
        if not spec:
            return 0
        accepted = 0
        while accepted < len(spec) and drawn[accepted] == spec[accepted]:
            accepted += 1
        self.spec_stats.record(len(spec), accepted)
        metrics = self.outputs.metrics_of(item.request.request_id)
        if metrics is not None:
            metrics.num_draft_tokens += len(spec)
            metrics.num_accepted_tokens += accepted
        return accepted

    def _propose(self, requests: Sequence[Request]) -> None:
        """Proposals for the next step of each request that just got tokens and runs on; none at all while the
        batch is at least disable_by_batch_size sequences (there a step is compute-bound: verifying costs about
        as much as it saves)."""
        limit = self.config.speculative_config.disable_by_batch_size
        if limit is not None and len(self.scheduler.running) >= limit:
            return
        if self.config.speculative_config.method == "ngram":
            for req in requests:
                if req.status is RequestStatus.RUNNING:
                    req.spec_token_ids = self.proposer.propose(req.all_token_ids)
            return
        # The draft follows every running sequence (prompt chunks too), in one round for the whole batch.
        running = self.scheduler.running
        for rid, proposals in self.proposer.propose(running).items():
            self.scheduler.requests[rid].spec_token_ids = proposals

    def _sample_rows(self, item: ScheduledRequest) -> list[SampleRow]:
        """The sampler rows of one scheduled item: one after its last real token, one after each proposal.
        Row j draws the token plain decoding would draw at output step step + j: its key, its min_tokens bans
        and its penalty history (the output so far and the proposals before it) are that step's."""
        req = item.request
        if not item.samples:
            return [SampleRow(_NO_SAMPLE, 0, 0, (), ())]
        params = req.sampling_params
        step = req.num_output_tokens
        stop_ids = banned_ids(params, req.eos_token_ids) if step < params.min_tokens else ()
        rows = []
        for j in range(len(item.spec_token_ids) + 1):
            output = req.output_token_ids
            if j and params.has_penalties:
                output = output + item.spec_token_ids[:j]
            banned = stop_ids if step + j < params.min_tokens else ()
            rows.append(SampleRow(params, req.seed, step + j, req.prompt_token_ids, output, banned))
        return rows
