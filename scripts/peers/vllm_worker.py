"""vLLM CPU as a benchmark peer: run one workload file, write a result in scripts/bench_throughput.py's format.

Runs under vLLM's own venv (`bash ../shared/peers/setup_vllm.sh` makes it; never a jaxserve dependency):

    $VLLM_VENV/bin/python scripts/peers/vllm_worker.py WORKLOAD.json RESULT.json HF_DIR

`single` workloads run their requests one after another (one stream); the others submit every request at once.
Times: perf_counter seconds; vLLM's first/last token stamps are time.monotonic, the same clock on Linux.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_throughput import request_record  # noqa: E402  (numpy and the standard library only)


def record(t0, start, first, finish, tokens):
    return request_record(t0, start, first, finish, tokens, len(tokens))


def main() -> int:
    wl_file, result, hf_dir = sys.argv[1:4]
    with open(wl_file) as f:
        wl = json.load(f)
    from vllm import LLM, SamplingParams

    need = max(len(p) + n for p, n in zip(wl["prompts"], wl["out_lens"]))
    max_len = -(-need // 256) * 256
    t = time.perf_counter()
    llm = LLM(model=hf_dir, dtype="float32", max_model_len=max_len, max_num_seqs=64, disable_log_stats=False)
    load_s = time.perf_counter() - t

    def params(n):
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": wl["prompts"][0][:16]}], params(4), use_tqdm=False)
    warmup_s = time.perf_counter() - t

    def stamps(out):
        m = getattr(out, "metrics", None)
        first = getattr(m, "first_token_ts", 0.0) or None
        last = getattr(m, "last_token_ts", 0.0) or None
        return first, last

    records = []
    t0 = time.perf_counter()
    if wl.get("single"):
        for p, n in zip(wl["prompts"], wl["out_lens"]):
            start = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": p}], params(n), use_tqdm=False)[0]
            end = time.perf_counter()
            first, last = stamps(out)
            records.append(record(t0, start, first, last or end, out.outputs[0].token_ids))
    else:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in wl["prompts"]], [params(n) for n in wl["out_lens"]], use_tqdm=False
        )
        end = time.perf_counter()
        for out in outs:
            first, last = stamps(out)
            records.append(record(t0, t0, first, last or end, out.outputs[0].token_ids))
    wall = time.perf_counter() - t0
    res = {
        "ok": True,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": wall,
        "requests": records,
        "extra": {"vllm_max_model_len": max_len},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(result, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
