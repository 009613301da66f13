"""Device meshes and data parallelism.

    devices -> Mesh[data, model]   (data_parallel_size x tensor_parallel_size)
    row r of the mesh -> one replica: an LLMEngine whose weights and KV pages are sharded over its "model" axis

Data parallel replicas are independent engines (vLLM's choice): each has its own scheduler, KV pages and
batch, so a replica never waits on another's step and no batch axis has to be split evenly. A
`DataParallelEngine` routes each new request to the replica with the most room and steps them all; it has
the LLMEngine surface that `LLM` and the batch job use.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np
from jax.sharding import Mesh

from jaxserve.config import ParallelConfig
from jaxserve.engine_api import EngineStats, ModelCard
from models.sharding import DATA, MODEL


@dataclasses.dataclass(frozen=True)
class DeviceMesh:
    mesh: Mesh  # axes (data, model)

    @property
    def data_parallel_size(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def tensor_parallel_size(self) -> int:
        return self.mesh.shape[MODEL]

    def replica(self, index: int) -> Mesh:
        """Replica `index`'s devices as a 1-D mesh over "model"."""
        return Mesh(self.mesh.devices[index], (MODEL,))


def make_mesh(parallel: ParallelConfig, devices=None) -> DeviceMesh:
    """The first dp x tp devices as a (data, model) mesh: every process's under `multihost` (one engine spans
    the hosts), else this process's own (under jax.distributed each host's engines stay on its host, as batch
    shards do)."""
    if devices is None:
        devices = jax.devices() if parallel.multihost else jax.local_devices()
    devices = list(devices)
    tp, dp = parallel.tensor_parallel_size, parallel.data_parallel_size
    if tp * dp > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tp} x data_parallel_size={dp} needs {tp * dp} devices; "
            f"{len(devices)} are available ({devices[0].platform})"
        )
    grid = np.array(devices[: tp * dp], dtype=object).reshape(dp, tp)
    return DeviceMesh(Mesh(grid, (DATA, MODEL)))


class DataParallelEngine:
    """Several LLMEngines (one per mesh row) behind the one-engine interface."""

    def __init__(self, engines):
        if not engines:
            raise ValueError("DataParallelEngine: need at least one engine")
        self.engines = list(engines)
        first = self.engines[0]
        self.model, self.config, self.tokenizer = first.model, first.config, first.tokenizer
        self.max_model_len = first.max_model_len
        self._owner: dict[str, object] = {}
        self._turn = itertools.count()

    # The parts of LLMEngine's surface that do not depend on a replica.
    def tokenize(self, prompt):
        return self.engines[0].tokenize(prompt)

    def check_prompt(self, prompt_token_ids) -> None:
        self.engines[0].check_prompt(prompt_token_ids)

    @property
    def waiting_room(self) -> int:
        return sum(e.waiting_room for e in self.engines)

    @property
    def num_unfinished_requests(self) -> int:
        return sum(e.num_unfinished_requests for e in self.engines)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines)

    def add_request(self, request_id: str, prompt, params=None, **kw) -> None:
        if request_id in self._owner:
            raise ValueError(f"request_id={request_id!r} is already in use")
        n = 1 if params is None else params.n
        # The least loaded replica that has room (ties: round robin).
        turn = next(self._turn)
        order = sorted(
            range(len(self.engines)),
            key=lambda i: (self.engines[i].num_unfinished_requests, (i - turn) % len(self.engines)),
        )
        engine = next((self.engines[i] for i in order if self.engines[i].waiting_room >= n), self.engines[order[0]])
        engine.add_request(request_id, prompt, params, **kw)
        self._owner[request_id] = engine

    def abort_request(self, request_id: str):
        engine = self._owner.pop(request_id, None)
        return None if engine is None else engine.abort_request(request_id)

    def step(self) -> list:
        outputs = []
        for engine in self.engines:
            if engine.has_unfinished_requests():
                outputs.extend(engine.step())
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats.total([e.stats() for e in self.engines])

    def model_card(self) -> ModelCard:
        cards = [e.model_card() for e in self.engines]
        return dataclasses.replace(
            cards[0],
            num_kv_pages=sum(c.num_kv_pages for c in cards),
            max_waiting_requests=sum(c.max_waiting_requests for c in cards),
            weight_bytes=sum(c.weight_bytes for c in cards),
            kv_cache_bytes=sum(c.kv_cache_bytes for c in cards),
        )

    @property
    def step_channel(self):
        return None  # data parallel spans one process (ParallelConfig refuses it with multihost)

    @property
    def runner(self):
        """Replica 0's model runner (every replica's has the same buckets, pool size and compile counter)."""
        return self.engines[0].runner

    def describe_memory(self) -> str:
        return f"{len(self.engines)} data-parallel replicas; " + self.engines[0].runner.describe_memory()
