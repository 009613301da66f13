"""One engine over the devices of several processes (hosts): one JAX program, process 0 schedules.

    process 0:  scheduler -> prepare(step) --broadcast--> every process: compiled_step(params, cache, inputs)
    process k:  follow():   receive(step) ----------------^                (same program, same order)

Every process loads the same weights and builds the same ModelRunner (the same buckets compiled in the same
order, the same KV pool: process 0's size is broadcast), so the sharded step is one SPMD program over the
global mesh. Each step process 0 broadcasts a header (step or stop, and the bucket) and then the step's
inputs; the others rebuild the bucket's input shapes from the header and receive into them. The broadcasts
are jax's own collectives (`multihost_utils.broadcast_one_to_all`), warmed for every bucket at start-up so
nothing compiles while serving. Servers, the scheduler and the detokenizer run on process 0 only.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

STOP, STEP = 0, 1


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> tuple[int, int]:
    """jax.distributed.initialize (on a TPU VM slice it reads the topology itself; elsewhere name the
    coordinator, the process count and this process's id). Returns (process index, process count)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts need it; ignored elsewhere
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    return jax.process_index(), jax.process_count()


def _channel(engine) -> StepChannel | None:
    return engine.step_channel


def follow_or_none(engine):
    """On processes other than 0 of a multi-host engine: replay process 0's steps until it stops, then return
    None; on process 0 (or a one-process engine) return the engine to serve with."""
    channel = _channel(engine)
    if channel is None or channel.leader:
        return engine
    channel.follow()
    return None


def release_followers(engine) -> None:
    """Process 0, when it is done: let the followers' follow() return."""
    channel = _channel(engine)
    if channel is not None and channel.leader:
        channel.stop()


def spans_processes(mesh) -> bool:
    return mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def broadcast_from_leader(tree):
    """Process 0's value of a pytree of numpy arrays, on every process (the others pass same-shaped ones)."""
    return multihost_utils.broadcast_one_to_all(tree)


class StepChannel:
    def __init__(self, runner):
        self.runner = runner
        self.leader = jax.process_index() == 0

    def warm_up(self) -> None:
        """Run (and so compile) the header and every bucket's input broadcast once, on every process."""
        for bucket in self.runner.buckets:
            broadcast_from_leader(np.array([STEP, bucket], np.int32))
            broadcast_from_leader(self.runner.input_template(bucket))

    def send(self, bucket: int, inputs, st) -> None:
        """Process 0, before it runs a step: tell the others which, and with what."""
        broadcast_from_leader(np.array([STEP, bucket], np.int32))
        broadcast_from_leader(jax.tree.map(np.asarray, (inputs, st)))

    def stop(self) -> None:
        """Process 0: release the followers (their follow() returns)."""
        broadcast_from_leader(np.array([STOP, 0], np.int32))

    def follow(self) -> int:
        """Processes other than 0: run process 0's steps until it stops; returns the number of steps run."""
        if self.leader:
            raise RuntimeError("follow() runs on processes other than 0; process 0 schedules")
        steps = 0
        while True:
            kind, bucket = (int(x) for x in broadcast_from_leader(np.zeros(2, np.int32)))
            if kind == STOP:
                return steps
            inputs, st = broadcast_from_leader(self.runner.input_template(bucket))
            self.runner.run_compiled(bucket, inputs, st)
            steps += 1
