"""The accelerator check: kernels against their references on the device, and the engine's throughput there.

Run it through scripts/device_check.sh on a GPU (or TPU) machine; on CPU it runs too (kernels interpreted, a
smaller engine run) so it can be tried here before a device is lent. It writes one JSON summary (--out) after
every section, so a run cut short still leaves what it measured.

Sections:
  env       jax version, devices, the platform's peak HBM bandwidth where known
  kernels   the Pallas ragged paged attention (Triton on GPU, Mosaic on TPU) against the jnp reference on the
            same device, f32 and bf16, NaN-fenced pages (a read outside a sequence's pages shows as NaN); and the
            kernel's time and achieved bandwidth on a decode batch (64 sequences x 1024 cached tokens)
  engine    SmolLM2-135M's exact shapes (its config and tokenizer from .devcheck/, written by --prepare here, where
            the model file is: the 98 MB GGUF does not travel) with random weights: greedy tokens of the Pallas
            path equal the reference path's (f32), then workload A (64 x 128 in, 128 out) and one stream (128 in,
            256 out) in bf16 (Pallas and XLA attention) and int8 weights, with decode's bytes read per step as a
            fraction of the device's peak bandwidth
Speed does not depend on the weights' values (ignore_eos, fixed lengths): the figures are the real model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PREP = os.path.join(ROOT, ".devcheck")
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "v5e": 8.2e11, "v5p": 2.76e12, "v6e": 1.64e12}


def log(msg: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare() -> None:
    """Here, where the model file is: its config and tokenizer metadata into .devcheck/ (carried to the device)."""
    from models.gguf_loader import GGUFFile
    from models.loader import default_model_path

    f = GGUFFile(default_model_path())
    os.makedirs(PREP, exist_ok=True)
    with open(os.path.join(PREP, "smollm2.json"), "w") as fh:
        json.dump({"config": dataclasses.asdict(f.config()), "tokenizer": f.tokenizer_metadata()}, fh)
    log(f"wrote {PREP}/smollm2.json")


class Summary:
    def __init__(self, path: str):
        self.path, self.data = path, {"sections": {}}

    def put(self, section: str, value) -> None:
        self.data["sections"][section] = value
        with open(self.path, "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)


def peak_bandwidth(kind: str) -> float | None:
    return next((v for k, v in PEAK_BYTES_PER_S.items() if k.lower() in kind.lower()), None)


def env_section() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": dev.device_kind,
        "peak_hbm_bytes_per_s": peak_bandwidth(dev.device_kind),
    }


def _timed(fn, *args, iters: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def kernels_section(platform: str) -> dict:
    import jax
    import jax.numpy as jnp

    from kernels_pallas.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_ref
    from tests.rpa_cases import dense_attention, make_case

    backend = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "pallas_gpu")
    interpret = platform == "cpu"
    rng = np.random.default_rng(0)
    cases = {  # name -> (q_lens, kv_lens, page_size, q heads, kv heads, head_dim, window, soft cap)
        "smollm2 mixed prefill+decode": ([37, 1, 8, 1], [37, 50, 25, 300], 16, 9, 3, 64, None, None),
        "decode x16 group 4": ([1] * 16, list(range(20, 340, 20)), 16, 8, 2, 64, None, None),
        "prefill chunk over history": ([64], [200], 16, 4, 4, 128, None, None),
        "window + soft cap": ([5, 1, 17], [90, 33, 61], 8, 6, 3, 64, 24, 30.0),
        "MHA head_dim 96": ([3, 9], [3, 40], 16, 4, 4, 96, None, None),
    }
    rows = []
    for name, (q_lens, kv_lens, page, hq, hkv, d, window, cap) in cases.items():
        case = make_case(
            rng, q_lens, kv_lens, page_size=page, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
            sliding_window=window, soft_cap=cap,
        )  # fmt: skip
        want = dense_attention(case)[: case.num_valid_rows]
        for dtype, tol in (("float32", 2e-3), ("bfloat16", 3e-2)):
            row = {"case": name, "dtype": dtype}
            try:
                q, k, v, *meta = case.args()
                kw = dict(sm_scale=d**-0.5, sliding_window=window, soft_cap=cap)
                args = [jnp.asarray(a, dtype) for a in (q, k, v)] + [jnp.asarray(m) for m in meta]
                pallas = jax.jit(lambda *a: ragged_paged_attention(*a, backend=backend, interpret=interpret, **kw))
                ref = jax.jit(lambda *a: ragged_paged_attention_ref(*a, **kw))
                got = np.asarray(pallas(*args).astype(jnp.float32))
                oracle = np.asarray(ref(*args).astype(jnp.float32))
                valid = got[: case.num_valid_rows]
                row.update(
                    finite=bool(np.isfinite(valid).all()),
                    max_err_vs_dense=float(np.abs(valid - want).max()),
                    max_err_vs_ref=float(np.abs(valid - oracle[: case.num_valid_rows]).max()),
                    padding_zero=bool(np.all(got[case.num_valid_rows :] == 0)),
                )
                row["ok"] = row["finite"] and row["max_err_vs_dense"] <= tol and row["padding_zero"]
            except Exception as e:  # noqa: BLE001 - recorded in the summary, the other cases still run
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
            rows.append(row)
            log(f"kernel {name} {dtype}: {row}")
    result = {"backend": backend, "interpret": interpret, "cases": rows, "all_ok": all(r["ok"] for r in rows)}
    if platform != "cpu":
        result["decode_timing"] = _decode_timing(backend)
    return result


def _decode_timing(backend: str) -> dict:
    """64 sequences decoding at 1024 cached tokens (SmolLM2 heads, bf16, page 16): kernel vs reference time and
    the kernel's K/V bytes read per call over its time."""
    import jax
    import jax.numpy as jnp

    from kernels_pallas.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_ref

    import jax.random as jr

    s, kv_len, page, hq, hkv, d = 64, 1024, 16, 9, 3, 64
    pages_per_seq = kv_len // page
    keys = jr.split(jr.PRNGKey(0), 3)
    k = jr.normal(keys[0], (s * pages_per_seq + 1, page, hkv, d), jnp.bfloat16)
    v = jr.normal(keys[1], k.shape, jnp.bfloat16)
    q = jr.normal(keys[2], (s, hq, d), jnp.bfloat16)
    tables = (1 + jnp.arange(s * pages_per_seq, dtype=jnp.int32)).reshape(s, pages_per_seq)
    meta = (jnp.full((s,), kv_len, jnp.int32), tables, jnp.arange(s + 1, dtype=jnp.int32), jnp.array([s], jnp.int32))
    kw = dict(sm_scale=d**-0.5)
    out = {}
    kv_bytes = 2 * s * kv_len * hkv * d * 2
    for name, fn in (
        ("pallas", jax.jit(lambda *a: ragged_paged_attention(*a, backend=backend, **kw))),
        ("reference", jax.jit(lambda *a: ragged_paged_attention_ref(*a, **kw))),
    ):
        try:
            sec = _timed(fn, q, k, v, *meta, iters=50)
            out[name] = {"us": sec * 1e6, "kv_bytes_per_s": kv_bytes / sec}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        log(f"decode attention {name}: {out[name]}")
    out["kv_bytes"] = kv_bytes
    return out


def _model(dtype: str, quantization: str, small: bool):
    import jax.numpy as jnp

    from models.config import LlamaConfig
    from models.llama import params_from_arrays, random_arrays
    from models.loader import LoadedModel, quantize_dense
    from models.tokenizer import Tokenizer

    with open(os.path.join(PREP, "smollm2.json")) as fh:
        prep = json.load(fh)
    cfg = LlamaConfig(**prep["config"])
    if small:  # CPU trial run: the same code path at a size this machine runs in seconds
        cfg = dataclasses.replace(cfg, num_layers=2)
    params = params_from_arrays(cfg, quantize_dense(random_arrays(cfg), quantization), getattr(jnp, dtype))
    tok = Tokenizer.from_gguf_metadata(prep["tokenizer"])
    return LoadedModel("smollm2-135m-shapes-random", cfg, params, tok, dtype, 0.0, quantization)


def _engine(model, backend: str, num_seqs: int, budget: int):
    from jaxserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from jaxserve.engine import LLMEngine

    config = EngineConfig(
        cache=CacheConfig(kv_cache_memory=1 << 30),
        scheduler=SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=budget, max_model_len=1024),
        attention_backend=backend,
        token_buckets=tuple(sorted({1, 8, num_seqs, budget})),
        enable_prefix_caching=False,
    )
    return LLMEngine(model, config)


def _generate(llm, prompts, max_tokens: int):
    from jaxserve import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t


def _weight_bytes(params) -> int:
    import jax

    from models.quant import is_quantized

    return sum(
        leaf.nbytes if is_quantized(leaf) else leaf.size * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(params, is_leaf=is_quantized)
    )


def engine_section(platform: str, peak: float | None, deadline: float) -> dict:
    import jax

    from jaxserve.llm import LLM

    small = platform == "cpu"
    pallas = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "reference")
    rng = np.random.default_rng(1)
    n_a, in_a, out_a = (8, 32, 16) if small else (64, 128, 128)
    in_s, out_s = (32, 32) if small else (128, 256)
    prompts_a = [rng.integers(3, 49152, in_a).tolist() for _ in range(n_a)]
    prompt_s = [rng.integers(3, 49152, in_s).tolist()]
    result = {"model": "SmolLM2-135M shapes, random weights", "layers_small_cpu_trial": small, "runs": []}

    # Greedy agreement, f32: Pallas attention vs the jnp reference inside the same model and engine.
    try:
        model = _model("float32", "none", small)
        tokens = {}
        for backend in dict.fromkeys((pallas, "reference")):
            llm = LLM.from_engine(_engine(model, backend, 8, 256))
            tokens[backend], _ = _generate(llm, prompts_a[:4], 24)
            del llm
        result["greedy_f32_pallas_equals_reference"] = tokens[pallas] == tokens["reference"]
        result["greedy_f32_first_divergence"] = [
            next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
            for x, y in zip(tokens[pallas], tokens["reference"])
        ]
        log(f"greedy f32 equal: {result['greedy_f32_pallas_equals_reference']}")
        del model
    except Exception as e:  # noqa: BLE001
        result["greedy_error"] = traceback.format_exc()[-3000:]
        log(f"greedy check failed: {e}")

    modes = [("bfloat16", "none", pallas), ("bfloat16", "none", "reference"), ("bfloat16", "int8", pallas)]
    if small:
        modes = [("float32", "none", "reference"), ("float32", "int8", "reference")]
    for dtype, quant, backend in modes:
        run = {"dtype": dtype, "quantization": quant, "attention": backend}
        if time.time() > deadline:
            run["skipped"] = "out of time"
            result["runs"].append(run)
            continue
        try:
            model = _model(dtype, quant, small)
            t = time.perf_counter()
            llm = LLM.from_engine(_engine(model, backend, 64, 512))
            run["engine_build_s"] = time.perf_counter() - t
            _generate(llm, [prompts_a[0][:16]], 4)  # warm-up (first-call costs outside the timed runs)
            toks, sec = _generate(llm, prompts_a, out_a)
            run["A_out_tok_per_s"] = sum(map(len, toks)) / sec
            run["A_wall_s"] = sec
            _, sec_short = _generate(llm, prompt_s, 2)
            toks, sec = _generate(llm, prompt_s, out_s)
            step = (sec - sec_short) / (out_s - 2)  # one decode step, prefill and first steps taken out
            run["single_stream_tok_per_s"] = out_s / sec
            run["single_stream_decode_step_ms"] = step * 1e3
            wbytes = _weight_bytes(llm.engine.runner.params)
            cfg = model.config
            kv_per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (2 if dtype == "bfloat16" else 4)
            read = wbytes + kv_per_tok * (in_s + out_s / 2)  # weights + the mean cache read per decode step
            run["decode_bytes_per_step"] = read
            run["decode_bytes_per_s"] = read / step
            if peak:
                run["decode_fraction_of_peak_hbm"] = read / step / peak
            run["compiles_after_warmup"] = llm.engine.runner.compiles_since_warmup
            del llm, model
        except Exception as e:  # noqa: BLE001
            run["error"] = traceback.format_exc()[-3000:]
            log(f"run {run} failed: {e}")
        log(f"engine run: {run}")
        result["runs"].append(run)
        jax.clear_caches()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", action="store_true", help="write .devcheck/ here (where the model file is)")
    ap.add_argument("--out", default="device_check.json")
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining engine runs after this long")
    ap.add_argument("--sections", default="env,kernels,engine")
    args = ap.parse_args()
    if args.prepare:
        prepare()
        return 0
    deadline = time.time() + args.budget_s
    summary = Summary(args.out)
    env = env_section()
    summary.put("env", env)
    log(f"env: {env}")
    sections = args.sections.split(",")
    ok = True
    if "kernels" in sections:
        try:
            res = kernels_section(env["platform"])
            ok &= res["all_ok"]
        except Exception:  # noqa: BLE001
            res, ok = {"error": traceback.format_exc()[-3000:]}, False
        summary.put("kernels", res)
    if "engine" in sections:
        try:
            res = engine_section(env["platform"], env["peak_hbm_bytes_per_s"], deadline)
            ok &= res.get("greedy_f32_pallas_equals_reference", False) and all("error" not in r for r in res["runs"])
        except Exception:  # noqa: BLE001
            res, ok = {"error": traceback.format_exc()[-3000:]}, False
        summary.put("engine", res)
    summary.data["ok"] = ok
    summary.put("done", time.strftime("%Y-%m-%dT%H:%M:%S"))
    log(f"summary: {args.out} (ok={ok})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
