"""One process of a 2-process jax.distributed engine on CPU (tests/test_sharding.py starts two):

    python tests/multihost_check.py PROCESS_ID PORT MODEL_PATH [NUM_PROCESSES (2)]

Every process builds the same tensor-parallel engine over the global mesh (one CPU device per process, so
tensor_parallel_size = NUM_PROCESSES); process 0 generates and prints the tokens, the others replay its steps
until released.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: int, path: str, num_processes: int) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
    from jaxserve.llm import LLM, build_engine
    from jaxserve.sampling import SamplingParams
    from tests.multihost_prompts import PARAMS, PROMPTS

    engine = build_engine(
        path,
        quiet=True,
        compile_cache_dir=None,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        page_size=8,
        token_buckets=(8, 32),
        tensor_parallel_size=num_processes,
        multihost=True,
    )
    runner = engine.runner
    if process_id != 0:
        steps = runner.channel.follow()
        print("FOLLOWED " + json.dumps({"steps": steps}), flush=True)
        return
    outs = LLM.from_engine(engine).generate(
        [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(**PARAMS), use_tqdm=False
    )
    runner.channel.stop()
    wq = runner.params.layers.wq
    print(
        "RESULT "
        + json.dumps(
            {
                "tokens": [o.outputs[0].token_ids for o in outs],
                "steps": engine.num_steps,
                "devices": len(wq.sharding.device_set),
                "local_wq": list(wq.addressable_shards[0].data.shape),
                "compiles_since_warmup": runner.compiles_since_warmup,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 2)
