"""The device side of a step: pad the scheduled ragged batch to a compiled bucket, run the AOT-compiled step
(forward -> logits of the sampled rows -> sampler, all on device), hand back plain ints.

Buckets: T (tokens) in powers of two up to max_num_batched_tokens; S (sequence slots) = min(T, max_num_seqs),
so each token bucket has one sequence bucket; the block table width is the whole context's pages (the jnp
attention walks only up to the longest real sequence, the Pallas kernels only over each sequence's pages).
Every bucket is compiled before the engine reports ready; a missing bucket is an error, never a silent jit.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxserve import executable_cache
from jaxserve.compile_stats import compile_counter
from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.kv_cache.pool import PoolPlan, allocate_kv_cache, plan_kv_pool
from jaxserve.multihost import StepChannel, broadcast_from_leader, spans_processes
from jaxserve.sampling import SampleRow, SamplerOutput, SamplingTensors, sample
from jaxserve.scheduler import ScheduledRequest
from kernels_pallas.kv_quant import row_width
from models.cache import AttentionMetadata, KVCache
from models.config import LlamaConfig
from models.llama import LlamaParams, compute_logits, forward, matmul_backend
from models.sharding import (
    MODEL,
    check_tensor_parallel,
    kv_cache_spec,
    kv_heads_sharded,
    per_device_bytes,
    shard_params,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    token_ids: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]
    meta: AttentionMetadata  # slot_mapping i32[T], query_start_loc i32[S+1], kv_lens i32[S], block_tables i32[S, W]
    sample_idx: jax.Array  # i32[S]: the token row whose logits sampler row r samples from (ModelRunner.pack)


def _step(params: LlamaParams, cache: KVCache, inputs: StepInputs, st: SamplingTensors, *, cfg, backend, mesh):
    hidden, cache = forward(
        params, cfg, inputs.token_ids, inputs.positions, cache, inputs.meta, attention_backend=backend, mesh=mesh
    )
    with jax.named_scope("lm_head"):  # only the rows that are sampled
        logits = compute_logits(params, hidden[inputs.sample_idx], backend=matmul_backend(backend, mesh))
    with jax.named_scope("sample"):
        return sample(logits, st), cache


def _all_logits(params: LlamaParams, cache: KVCache, inputs: StepInputs, *, cfg, backend, mesh):
    """The step without sampling: the logits of every token row (teacher forcing; `ModelRunner.prompt_logits`)."""
    hidden, cache = forward(
        params, cfg, inputs.token_ids, inputs.positions, cache, inputs.meta, attention_backend=backend, mesh=mesh
    )
    return compute_logits(params, hidden, backend=matmul_backend(backend, mesh)), cache


def _temp_bytes(compiled: jax.stages.Compiled) -> int:
    """A compiled step's scratch memory (0 where the backend does not report it)."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # not every backend reports it
        return 0
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0


def _local_device(mesh: Mesh) -> jax.Device:
    """A device of this process in the mesh (whose free memory sizes the KV pool)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """Powers of two from 1 up to the budget (the budget itself last, if it is not one)."""
    buckets = [1 << i for i in range(max_num_batched_tokens.bit_length()) if 1 << i < max_num_batched_tokens]
    return buckets + [max_num_batched_tokens]


@dataclasses.dataclass
class BucketReport:
    num_tokens: int
    num_seqs: int
    seconds: float
    cache_hit: bool


class ModelRunner:
    """Owns the weights, the KV pages and the compiled step per bucket."""

    def __init__(
        self,
        config: LlamaConfig,
        params: LlamaParams,
        *,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        attention_backend: str = "auto",
        buckets: Sequence[int] | None = None,
        progress: bool = False,
        mesh: Mesh | None = None,
    ):
        """mesh: devices with a "model" axis to shard the weights and KV pages over (tensor parallel); None runs
        on the default device."""
        self.cfg = config
        self.mesh = mesh
        self.tensor_parallel_size = 1 if mesh is None else mesh.shape[MODEL]
        jit_kw, logits_kw = {}, {}
        if mesh is not None:
            check_tensor_parallel(config, self.tensor_parallel_size)
            params = shard_params(params, config, mesh)
            replicated = NamedSharding(mesh, P())
            param_shardings = jax.tree.map(lambda a: a.sharding, params)
            kv = NamedSharding(mesh, kv_cache_spec(config, self.tensor_parallel_size))
            jit_kw = {
                "in_shardings": (param_shardings, KVCache(kv, kv), replicated, replicated),
                "out_shardings": (replicated, KVCache(kv, kv)),
            }
            logits_kw = dict(jit_kw, in_shardings=jit_kw["in_shardings"][:3])
        self.params = params
        self._no_history: dict[int, jax.Array] = {}  # S -> i32[S, max_model_len] of -1 (see prepare)
        self.scheduler_config = scheduler
        self.page_size = cache.page_size
        self.max_model_len = scheduler.max_model_len
        self.pages_per_seq = -(-scheduler.max_model_len // cache.page_size)
        self.buckets = sorted(set(buckets or token_buckets(scheduler.max_num_batched_tokens)))
        if self.buckets[-1] < scheduler.max_num_batched_tokens:
            raise ValueError(
                f"buckets={self.buckets} do not reach max_num_batched_tokens={scheduler.max_num_batched_tokens}"
            )
        from kernels_pallas.backend import resolve_backend

        program = self.program()
        self._what = {  # what the step program is, for the executable cache (jaxserve.executable_cache)
            "runner": f"{type(self).__module__}.{type(self).__qualname__}",
            "program": executable_cache.describe(program),
            "config": repr(config),
            "backend": resolve_backend(attention_backend),
            "mesh": None if mesh is None else repr((mesh.axis_names, mesh.devices.shape, mesh.device_ids.tolist())),
        }
        self._fn = jax.jit(
            functools.partial(program, cfg=config, backend=attention_backend, mesh=mesh),
            donate_argnums=(1,),
            **jit_kw,
        )
        self._logits_fn = jax.jit(
            functools.partial(_all_logits, cfg=config, backend=attention_backend, mesh=mesh),
            donate_argnums=(1,),
            **logits_kw,
        )
        self._compiled_logits: dict[int, jax.stages.Compiled] = {}
        tp = self.tensor_parallel_size
        kv_shards = tp if tp > 1 and kv_heads_sharded(config, tp) else 1
        self.counter = compile_counter()
        t0 = time.perf_counter()
        kv_dtype = params.dtype if cache.kv_cache_dtype == "auto" else jnp.dtype(cache.kv_cache_dtype)

        def plan(reserve_bytes: int) -> PoolPlan:
            return plan_kv_pool(
                cache,
                config,
                params.dtype,
                reserve_bytes=reserve_bytes,
                max_tokens=None if cache.kv_cache_memory is not None else self.max_pool_tokens,
                kv_shards=kv_shards,
                device=None if mesh is None else _local_device(mesh),
            )

        # The largest bucket's scratch memory sizes the pool (a free-memory budget leaves room for it). It is
        # read off that bucket's compile over the pool planned without it; when the pool comes out the same
        # (an explicit kv_cache_memory, or the cap at max_num_seqs full sequences), that compile is the bucket's.
        first = plan(0)
        probe = self._compile_bucket(self.buckets[-1], first.num_pages, kv_dtype)
        self.step_temp_bytes = _temp_bytes(probe[0])
        self.pool: PoolPlan = plan(self.step_temp_bytes) if cache.kv_cache_memory is None else first
        if self.pool.num_tokens < scheduler.max_model_len:
            raise ValueError(
                f"max_model_len={scheduler.max_model_len} does not fit the KV cache: "
                f"{self.pool.describe()}; raise kv_cache_memory or lower max_model_len"
            )
        self.channel = StepChannel(self) if spans_processes(mesh) else None
        if self.channel is not None:  # every process must size the pool alike: process 0's plan wins
            num_pages = int(broadcast_from_leader(np.array(self.pool.num_pages, np.int64)))
            self.pool = dataclasses.replace(self.pool, num_pages=num_pages)
        t_kv = time.perf_counter()
        self.cache = allocate_kv_cache(self.pool, config, None if mesh is None else jit_kw["out_shardings"][1].k)
        jax.block_until_ready(self.cache)
        self.kv_alloc_seconds = time.perf_counter() - t_kv
        self.compiled: dict[int, jax.stages.Compiled] = {}
        self.report: list[BucketReport] = []
        # The sizing compile was over this very pool: it is the largest bucket's executable.
        ready = {self.buckets[-1]: probe} if self.pool.num_pages == first.num_pages else {}
        self._compile_all(progress, ready)
        if self.channel is not None:
            self.channel.warm_up()
        self.startup_seconds = time.perf_counter() - t0
        self.compiles_after_warmup_base = self.counter.snapshot()[0]

    # ---- what the compiled step is (a subclass may run another program over the same pages) --------------

    def program(self):
        """The step's function: (params, cache, inputs, rows, *, cfg, backend, mesh) -> (output, cache)."""
        return _step

    def row_template(self, num_slots: int):
        """Host arrays shaped as the step's per-row argument (here the sampler's tensors) for S = num_slots."""
        return SamplingTensors.build([], num_slots, self.max_model_len)

    # ---- sizes ----------------------------------------------------------------------------------

    def num_seqs_for(self, num_tokens: int) -> int:
        return min(num_tokens, self.scheduler_config.max_num_seqs)

    @property
    def max_pool_tokens(self) -> int:
        """Every running sequence at full length: more pages would only ever serve the prefix cache, so the
        default budget stops there rather than take half the host's memory (kv_cache_memory overrides it)."""
        return self.scheduler_config.max_num_seqs * self.pages_per_seq * self.page_size

    def _specs(self, num_tokens: int, num_pages: int, kv_dtype):
        s = self.num_seqs_for(num_tokens)
        i32 = jnp.int32
        meta = AttentionMetadata(
            slot_mapping=jax.ShapeDtypeStruct((num_tokens,), i32),
            query_start_loc=jax.ShapeDtypeStruct((s + 1,), i32),
            kv_lens=jax.ShapeDtypeStruct((s,), i32),
            block_tables=jax.ShapeDtypeStruct((s, self.pages_per_seq), i32),
            num_seqs=jax.ShapeDtypeStruct((), i32),
        )
        inputs = StepInputs(
            jax.ShapeDtypeStruct((num_tokens,), i32),
            jax.ShapeDtypeStruct((num_tokens,), i32),
            meta,
            jax.ShapeDtypeStruct((s,), i32),
        )
        st = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.row_template(s))
        shape = (
            self.cfg.num_layers,
            num_pages,
            self.page_size,
            self.cfg.num_kv_heads,
            row_width(self.cfg.head_dim, kv_dtype),
        )
        cache = KVCache(jax.ShapeDtypeStruct(shape, kv_dtype), jax.ShapeDtypeStruct(shape, kv_dtype))
        return cache, inputs, st

    def input_template(self, bucket: int) -> tuple[StepInputs, SamplingTensors]:
        """Zero numpy inputs of one bucket's step, shaped as `prepare` makes them (what followers of a multihost
        engine receive the leader's steps into)."""
        _, inputs, st = self._specs(bucket, 2, self.pool.dtype)
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), (inputs, st))

    def _compile_all(self, progress: bool, ready: dict) -> None:
        """Compile every bucket but those in `ready` ({num_tokens: (executable, its BucketReport)})."""
        from tqdm import tqdm

        bar = tqdm(self.buckets, desc="compiling step buckets", unit="bucket", disable=not progress, file=sys.stderr)
        for num_tokens in bar:
            if num_tokens in ready:
                self.compiled[num_tokens], report = ready[num_tokens]
            else:
                self.compiled[num_tokens], report = self._compile_bucket(
                    num_tokens, self.pool.num_pages, self.pool.dtype
                )
            self.report.append(report)

    def _compile_bucket(self, num_tokens: int, num_pages: int, kv_dtype) -> tuple[jax.stages.Compiled, BucketReport]:
        """One bucket's executable over a pool of num_pages, and how long it took (a persistent-cache hit?)."""
        t0 = time.perf_counter()
        hits0 = self.counter.snapshot()[1]
        cache, inputs, st = self._specs(num_tokens, num_pages, kv_dtype)
        args = (self.params, cache, inputs, st)
        # (one device only: a multi-device executable loaded back ran with a device assignment other than its
        # mesh's, DP replicas and TP meshes of other sizes alike; those take the persistent cache's path)
        path = None if self.mesh is not None else executable_cache.entry_path(self._what, args)
        if path is not None and self._what["backend"] == "cpu":  # (tracing registers our FFI kernels; a loaded
            from kernels_pallas.cpu import ensure_registered  # executable calls them without a trace)

            ensure_registered()
        compiled = executable_cache.load(
            path, None if path is None else next(iter(jax.tree.leaves(self.params)[0].devices()))
        )
        if compiled is None:
            compiled = self._fn.lower(*args).compile()
            hit = self.counter.snapshot()[1] > hits0
            if not hit:  # (XLA:CPU serializes an executable it loaded from the persistent cache without its
                executable_cache.store(path, compiled)  # machine code: only a real compile's is kept)
        else:
            hit = True  # (no trace, no lowering: the executable itself, from disk)
        seconds = time.perf_counter() - t0
        return compiled, BucketReport(num_tokens, self.num_seqs_for(num_tokens), seconds, hit)

    def describe_memory(self) -> str:
        """What one device holds: weights and KV pages (sharded over the mesh's "model" axis, if any)."""
        where = (
            "one device"
            if self.mesh is None
            else f"each of {self.mesh.size} devices (tensor parallel {self.tensor_parallel_size})"
        )
        return (
            f"per device on {where}: weights {per_device_bytes(self.params) / 2**20:.1f} MiB, "
            f"KV cache {per_device_bytes(self.cache) / 2**20:.1f} MiB"
        )

    def startup_report(self) -> dict:
        """This runner's start: seconds compiling (and how many buckets came from the persistent cache),
        allocating the KV pool, and in all (planning and the warm-up step included)."""
        return {
            "compile_seconds": round(sum(r.seconds for r in self.report), 3),
            "buckets": len(self.report),
            "buckets_from_cache": sum(r.cache_hit for r in self.report),
            "kv_alloc_seconds": round(self.kv_alloc_seconds, 3),
            "runner_seconds": round(self.startup_seconds, 3),
        }

    def describe_compile_plan(self) -> str:
        hits = sum(r.cache_hit for r in self.report)
        rows = ", ".join(
            f"T{r.num_tokens}/S{r.num_seqs} {r.seconds:.1f}s{' (cached)' if r.cache_hit else ''}" for r in self.report
        )
        return (
            f"compiled {len(self.report)} step buckets in {sum(r.seconds for r in self.report):.1f}s "
            f"({hits} from the persistent cache): {rows}"
        )

    @property
    def compiles_since_warmup(self) -> int:
        return self.counter.snapshot()[0] - self.compiles_after_warmup_base

    def bucket_for(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"a step of {num_tokens} tokens exceeds the largest compiled bucket {self.buckets[-1]}")

    # ---- one step -------------------------------------------------------------------------------

    def pack(
        self, scheduled: Sequence[ScheduledRequest], block_tables: Sequence[Sequence[int]]
    ) -> tuple[int, StepInputs, list[list[int]]]:
        """The token rows of one step, padded to its bucket. `block_tables[i]` are scheduled[i]'s pages.

        Sequences are laid out longest cached history first (the ragged layout allows any order), so the
        reference attention's row blocks hold rows of similar history and none walks far past its own. Returns
        the bucket, the inputs and `rows`: rows[i] are scheduled[i]'s sampler rows, one after its last real
        token and one after each proposal it verifies (speculative decoding), consecutive. The sampler's S rows
        are not tied to sequence slots, so proposals need no buckets of their own: one step takes at most S rows
        (the scheduler keeps proposals within max_num_seqs rows; S = min(T, max_num_seqs) >= the step's rows).
        """
        num_real = sum(s.num_tokens for s in scheduled)
        bucket = self.bucket_for(num_real)
        num_slots = self.num_seqs_for(bucket)
        if len(scheduled) > num_slots:
            raise ValueError(f"{len(scheduled)} sequences exceed the {num_slots} slots of bucket T{bucket}")
        num_rows = sum(1 + len(s.spec_token_ids) for s in scheduled)
        if num_rows > num_slots:
            raise ValueError(f"{num_rows} sampler rows (sequences and proposals) exceed the {num_slots} of T{bucket}")
        order = sorted(range(len(scheduled)), key=lambda i: -scheduled[i].start)
        rows: list[list[int]] = [[] for _ in scheduled]
        ps = self.page_size
        token_ids = np.zeros(bucket, np.int32)
        positions = np.zeros(bucket, np.int32)
        slot_mapping = np.full(bucket, -1, np.int32)
        qsl = np.full(num_slots + 1, num_real, np.int32)
        kv_lens = np.zeros(num_slots, np.int32)
        tables = np.zeros((num_slots, self.pages_per_seq), np.int32)
        sample_idx = np.zeros(num_slots, np.int32)
        at = row = 0
        for slot, i in enumerate(order):
            item, pages = scheduled[i], block_tables[i]
            n, start, num_spec = item.num_tokens, item.start, len(item.spec_token_ids)
            end = at + n
            qsl[slot] = at
            if n == 1:
                token_ids[at] = item.request.all_token_ids[start]
            else:  # a prompt chunk, or a decode and its proposals
                token_ids[at:end] = item.token_ids
            pos = np.arange(start, start + n, dtype=np.int32)
            positions[at:end] = pos
            page_arr = np.asarray(pages, np.int32)
            slot_mapping[at:end] = page_arr[pos // ps] * ps + pos % ps
            kv_lens[slot] = start + n
            tables[slot, : len(pages)] = page_arr
            rows[i] = list(range(row, row + num_spec + 1))
            sample_idx[row : row + num_spec + 1] = np.arange(end - 1 - num_spec, end)
            row += num_spec + 1
            at = end
        meta = AttentionMetadata(slot_mapping, qsl, kv_lens, tables, np.array(len(scheduled), np.int32))
        return bucket, StepInputs(token_ids, positions, meta, sample_idx), rows

    def prepare(
        self,
        scheduled: Sequence[ScheduledRequest],
        block_tables: Sequence[Sequence[int]],
        sample_rows: Sequence[Sequence[SampleRow]],
    ) -> tuple[int, StepInputs, SamplingTensors, list[list[int]]]:
        """`pack`, plus the sampling of each sampler row (`sample_rows[i]` are scheduled[i]'s, one per row)."""
        bucket, inputs, rows = self.pack(scheduled, block_tables)
        num_slots = self.num_seqs_for(bucket)
        by_row: list[SampleRow] = [None] * sum(len(r) for r in rows)  # type: ignore[list-item]
        for i, item_rows in enumerate(rows):
            if len(sample_rows[i]) != len(item_rows):
                raise ValueError(f"scheduled[{i}] has {len(item_rows)} sampler rows but {len(sample_rows[i])} given")
            for r, sample_row in zip(item_rows, sample_rows[i]):
                by_row[r] = sample_row
        # The sampler reads the [S, max_model_len] token history only for penalties: without one, a device array
        # of -1 made once per S stands in (nothing built or sent per step). Over several processes the full
        # history always goes (the followers receive into fixed host buffers).
        penalties = self.channel is not None or any(r.params.has_penalties for r in by_row)
        st = SamplingTensors.build(by_row, num_slots, self.max_model_len if penalties else 1)
        if not penalties:
            st = dataclasses.replace(st, history=self._unread_history(num_slots))
        return bucket, inputs, st, rows

    def _unread_history(self, num_slots: int) -> jax.Array:
        if num_slots not in self._no_history:
            where = NamedSharding(self.mesh, P()) if self.mesh is not None else next(iter(self.cache.k.devices()))
            self._no_history[num_slots] = jax.device_put(np.full((num_slots, self.max_model_len), -1, np.int32), where)
        return self._no_history[num_slots]

    def execute(self, bucket: int, inputs: StepInputs, st: SamplingTensors) -> SamplerOutput:
        """Run the compiled step (asynchronously: the result is a device future until read). Over several
        processes, process 0 first sends the step to the others (jaxserve.multihost)."""
        if self.channel is not None:
            self.channel.send(bucket, inputs, st)
        return self.run_compiled(bucket, inputs, st)

    def run_compiled(self, bucket: int, inputs: StepInputs, st: SamplingTensors) -> SamplerOutput:
        out, self.cache = self.compiled[bucket](self.params, self.cache, inputs, st)
        return out

    def prompt_logits(self, bucket: int, inputs: StepInputs) -> jax.Array:
        """f32[T, V]: the logits of every token row of one packed step, its KV written as a step writes it
        (scoring, perplexity, parity checks; serving never calls this). Its function for a bucket is compiled
        the first time that bucket is asked for: an explicit AOT compile, counted in `compiles_since_warmup`."""
        if self.channel is not None:
            raise NotImplementedError("prompt_logits runs on one process (its mesh may be tensor parallel)")
        compiled = self._compiled_logits.get(bucket)
        if compiled is None:
            cache, spec, _ = self._specs(bucket, self.pool.num_pages, self.pool.dtype)
            compiled = self._compiled_logits[bucket] = self._logits_fn.lower(self.params, cache, spec).compile()
        logits, self.cache = compiled(self.params, self.cache, inputs)
        return logits
