"""Runs in its own process (tests/test_sharding.py starts it): simulated CPU devices must be set before jax
starts, and the rest of the suite runs on one device. Prints one JSON object: greedy tokens per mesh layout
and what each layout's parameters look like on a device.

    python tests/sharded_check.py tiny|real
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAXSERVE_TEST_CACHE", os.path.expanduser("~/.cache/jaxserve/xla-tests")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from jaxserve.llm import LLM  # noqa: E402
from jaxserve.sampling import SamplingParams  # noqa: E402


# The tiny models' engine shape in every case below: few pages, small buckets.
TINY_SHAPE = dict(
    max_model_len=128,
    max_num_seqs=8,
    max_num_batched_tokens=32,
    page_size=8,
    kv_cache_memory=1 << 20,
    token_buckets=(8, 32),
)


def layout(engine) -> dict:
    """How replica 0's weights and KV pages sit on its first device."""
    replica = getattr(engine, "engines", [engine])[0]
    runner = replica.runner
    layers = runner.params.layers

    def local(a):
        a = getattr(a, "values", a)  # a quantized weight: its values' shard
        return list(a.addressable_shards[0].data.shape)

    return {
        "devices": [d.id for d in runner.cache.k.sharding.device_set] if runner.mesh is not None else [0],
        "wq": local(layers.wq),
        "wk": local(layers.wk),
        "wo": local(layers.wo),
        "w_down": local(layers.w_down),
        "embed": local(runner.params.embed),
        "kv": local(runner.cache.k),
        "wq_spec": str(getattr(layers.wq, "values", layers.wq).sharding),
        "replicas": len(getattr(engine, "engines", [engine])),
        "memory": runner.describe_memory(),
        "one_copy": all(e.model.params is e.runner.params for e in getattr(engine, "engines", [engine])),
    }


def run(path, layouts, prompts, params, **options) -> dict:
    results = {}
    for tp, dp in layouts:
        llm = LLM(path, quiet=True, tensor_parallel_size=tp, data_parallel_size=dp, **options)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[f"{dp}x{tp}"] = {"tokens": [o.outputs[0].token_ids for o in outs], "layout": layout(llm.engine)}
        del llm
    return results


def spec_run(model, spec: dict, prompts, params, **options):
    """One TP 3 engine with speculative_config=spec: (the LLM, its tokens and proposal counts)."""
    llm = LLM(model, quiet=True, tensor_parallel_size=3, speculative_config=spec, **options)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    st = llm.engine.spec_stats
    tokens = [o.outputs[0].token_ids for o in outs]
    return llm, {"tokens": tokens, "proposed": st.num_draft_tokens, "accepted": st.num_accepted_tokens}


def serve_one(path: str, prompt, **options) -> dict:
    """One request through the servers' Frontend over a data x tensor parallel engine, and its metrics."""
    import asyncio

    from jaxserve.api.validation import GenerateRequest
    from jaxserve.async_engine import AsyncEngine
    from jaxserve.llm import build_engine
    from jaxserve.servers.frontend import Frontend

    engine = build_engine(path, quiet=True, **options)
    pages = [e.block_manager.num_usable_pages for e in engine.engines]
    async_engine = AsyncEngine(engine)
    frontend = Frontend(async_engine, model_name="tiny8")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    out = asyncio.run(frontend.complete(GenerateRequest(params=params, prompt_token_ids=tuple(prompt))))
    text = frontend.metrics.exposition()[0].decode()
    async_engine.shutdown()
    return {
        "tokens": out.outputs[0].token_ids,
        "replica_pages": pages,
        "metrics": [line for line in text.splitlines() if line.startswith("jaxserve_kv_pages_total")],
    }


def kernels() -> dict:
    """The tiny model's forward with the Pallas kernels (interpreted) inside shard_map on a 2-device mesh, against
    the unsharded reference forward (the scenario of tests/test_paged_forward.py)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.config import ParallelConfig
    from jaxserve.parallel import make_mesh
    from models.cache import KVCache
    from models.llama import forward
    from models.sharding import kv_cache_spec, shard_params
    from tests.test_model import _tiny_model
    from tests.test_paged_forward import two_prompt_step

    model, _ = _tiny_model()
    cfg = model.config
    tokens, positions, meta = two_prompt_step(cfg.vocab_size)

    def run(mesh=None, **kw):
        params = model.params if mesh is None else shard_params(model.params, cfg, mesh)
        cache = KVCache.zeros(cfg.num_layers, 8, 8, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
        if mesh is not None:
            kv = jax.sharding.NamedSharding(mesh, kv_cache_spec(cfg, mesh.shape["model"]))
            cache = jax.device_put(cache, KVCache(kv, kv))
        step = jax.jit(lambda p, c, t, pos, m: forward(p, cfg, t, pos, c, m, mesh=mesh, **kw))
        hidden, cache = step(params, cache, tokens, positions, meta)
        return np.asarray(hidden)[:26], np.asarray(cache.k)

    want = run(attention_backend="reference")
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=2)).replica(0)
    out = {"tp": 2, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}
    for backend in ("reference", "pallas_gpu", "pallas_tpu"):
        got = run(mesh, attention_backend=backend, interpret_kernels=backend != "reference")
        out[backend] = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
    return out


def main(case: str) -> None:
    rnd = random.Random(0)
    if case == "tiny":
        from tests.tiny_models import TINY, random_arrays, write_gguf

        cfg = dataclasses.replace(TINY, num_heads=8, num_kv_heads=4, head_dim=8, vocab_size=264)
        path = os.path.join(tempfile.mkdtemp(), "tiny8.gguf")
        write_gguf(path, cfg, random_arrays(cfg, seed=5))
        prompts = [[rnd.randrange(3, 260) for _ in range(rnd.randint(3, 60))] for _ in range(10)]
        layouts = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)]
        results = run(
            path,
            layouts,
            prompts,
            SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
            **TINY_SHAPE,
        )
        results["served"] = serve_one(
            path,
            prompts[0],
            tensor_parallel_size=2,
            data_parallel_size=2,
            **TINY_SHAPE,
        )
        results["kernels"] = kernels()
        results["config"] = {
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "mlp": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
        }
    elif case == "tiny_int8":  # int8 weights: values and scales split together; the reference matmul everywhere
        from tests.tiny_models import TINY, random_arrays, write_gguf

        cfg = dataclasses.replace(TINY, num_heads=8, num_kv_heads=4, head_dim=8, vocab_size=264)
        path = os.path.join(tempfile.mkdtemp(), "tiny8.gguf")
        write_gguf(path, cfg, random_arrays(cfg, seed=5))
        prompts = [[rnd.randrange(3, 260) for _ in range(rnd.randint(3, 60))] for _ in range(6)]
        results = run(
            path,
            [(1, 1), (2, 1), (4, 1)],
            prompts,
            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
            quantization="int8",
            attention_backend="reference",
            **TINY_SHAPE,
        )
        dense = run(
            path,
            [(1, 1)],
            prompts,
            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
            **TINY_SHAPE,
        )
        results["dense"] = dense["1x1"]["tokens"]
        results["config"] = {
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_heads,
            "head_dim": cfg.head_dim,
            "mlp": cfg.intermediate_size,
            "vocab": cfg.vocab_size,
        }
    elif case == "orbax":  # checkpoints restored straight into their TP 3 shards
        from models.checkpoint import save_checkpoint
        from models.loader import load_model
        from tests.tiny_models import TINY, random_arrays, write_gguf

        cfg = dataclasses.replace(
            TINY, num_heads=6, num_kv_heads=3, head_dim=8, hidden_size=48, intermediate_size=96, vocab_size=264
        )
        root = tempfile.mkdtemp()
        path = os.path.join(root, "tiny6.gguf")
        write_gguf(path, cfg, random_arrays(cfg, seed=7))
        prompts = [[rnd.randrange(3, 260) for _ in range(rnd.randint(3, 60))] for _ in range(6)]
        shape = TINY_SHAPE
        greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        results = {}
        for quant in ("none", "int8"):
            ckpt = os.path.join(root, f"ckpt-{quant}")
            save_checkpoint(load_model(path, quantization=quant), ckpt, progress=False)
            extra = {} if quant == "none" else {"quantization": quant, "attention_backend": "reference"}
            source = run(path, [(1, 1)], prompts, greedy, **shape, **extra)["1x1"]["tokens"]
            llm = LLM(ckpt, quiet=True, tensor_parallel_size=3, **shape, **extra)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
            engine = llm.engine
            restored, placed = jax.tree.leaves(engine.model.params), jax.tree.leaves(engine.runner.params)
            results[quant] = {
                "source": source,
                "tokens": [o.outputs[0].token_ids for o in outs],
                "layout": layout(engine),
                # every restored array already on the mesh: what the engine serves is those very arrays
                "same_arrays": len(restored) == len(placed) and all(a is b for a, b in zip(restored, placed)),
                "devices_per_array": sorted({len(a.sharding.device_set) for a in restored}),
                "wq_shards": [
                    list(s.data.shape)
                    for s in getattr(
                        engine.model.params.layers.wq, "values", engine.model.params.layers.wq
                    ).addressable_shards
                ],
            }
            del llm
        results["config"] = {
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_heads,
            "head_dim": cfg.head_dim,
            "vocab": cfg.vocab_size,
        }
    else:
        from models.loader import default_model_path, load_model

        path = default_model_path()
        model = load_model(path)  # one load serves every fp32 engine below (one int8 load the int8 ones)
        tok = model.tokenizer
        words = "the cat sat on a mat while the model of a language predicted every next token with care".split()
        prompts = [tok.encode(" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 90)))) for _ in range(8)]
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        prompts[0] = tok.encode(tok.apply_chat_template(chat), add_special_tokens=False)
        shape = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, token_buckets=(16, 64))
        greedy = SamplingParams(temperature=0.0, max_tokens=24)
        ngram = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": None}  # on with 8 running
        # One device, then 2 replicas of TP 3 (each replica a TP 3 engine: the TP 3 check and the DP one)
        results = run(model, [(1, 1), (3, 2)], prompts, greedy, **shape)
        results["first_text"] = tok.decode(results["1x1"]["tokens"][0], skip_special_tokens=True)
        # int8 weights over TP 3 (values and scales split together), the reference kernels on both sides
        int8 = load_model(path, quantization="int8")
        # (4 prompts: the reference kernels over simulated devices are slow; the tiny_int8 case covers more)
        results["int8"] = run(int8, [(1, 1), (3, 1)], prompts[:4], greedy, attention_backend="reference", **shape)
        del int8
        # n-gram speculation over TP 3 on one replica: the same greedy tokens as one device without it
        llm, results["spec_1x3"] = spec_run(model, ngram, prompts, greedy, **shape)
        results["spec_1x3"]["layout"] = layout(llm.engine)
        del llm
        # the model's own weights in int4 as its draft, both over TP 3: the same greedy tokens again (the first
        # 4 prompts, 12 tokens: a greedy run's prefix; the int4 reference matmul over simulated devices is slow)
        draft = {"method": "draft_model", "model": path, "num_speculative_tokens": 4, "quantization": "int4"}
        short = dataclasses.replace(greedy, max_tokens=12)
        llm, results["draft_1x3"] = spec_run(model, draft, prompts[:4], short, **shape)
        wq = llm.engine.proposer.runner.params.layers.wq
        results["draft_1x3"]["draft_wq"] = [list(wq.values.addressable_shards[0].data.shape), wq.bits]
        results["draft_1x3"]["draft_kv"] = list(llm.engine.proposer.runner.cache.k.addressable_shards[0].data.shape)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
