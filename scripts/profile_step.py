"""Where one engine step's time goes, from a jax.profiler trace: matmuls, attention, LM head, sampler, host.

    .venv/bin/python scripts/profile_step.py [--quantization int8] [--kv-cache-dtype int8] [--num-seqs 64]
        [--context 128] [--steps 5] [--top N] [--spec K]

It fills the engine with --num-seqs requests of --context prompt tokens, runs their prefill and a few decode
steps untimed, then traces --steps decode steps (every sequence decoding one token: workload A's steady state).
Each XLA:CPU thunk in the trace is put in a phase by what it is and by the named scope it was traced under
(the compiled HLO's op_name metadata): dots and our FFI matmul calls are "matmuls" (the LM head apart), the rest
of the `attention` scope is "attention" (KV write, RoPE, norms, the paged attention), `mlp` elementwise work,
`sample` the sampler; "host" is the engine step's wall time less the thunks' time: Python (scheduling, input
packing, output processing, ~0.5 ms of a one-stream step) plus XLA's own gaps between thunks. Times are
exclusive (a loop's own time excludes the thunks inside it). --spec K: every decode step verifies K speculated
tokens per sequence (n-gram speculation with a proposer that always proposes K copies of the last token: what a
verification step of K + 1 rows costs, whatever the acceptance).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

PHASES = ("matmuls", "attention", "mlp elementwise", "LM head", "sampler", "other device", "host")


def scopes_of(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata, with the custom-call target (our FFI kernels) prefixed."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.search(r"%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", line)
        if m:
            target = re.search(r'custom_call_target="([^"]*)"', line)
            out[m.group(1)] = (f"[{target.group(1)}] " if target else "") + m.group(2)
    return out


def phase_of(name: str, scope: str) -> str:
    if "[jaxserve_ragged_paged_attention]" in scope:
        return "attention"
    # (an einsum's op_name carries its spec, "kgtd,ukd->kgtu": those are the jnp attention's, not projections)
    is_matmul = (
        name.startswith(("ffi_call", "custom-call", "dot", "ynn_fusion", "onednn")) or "dot" in name
    ) and "->" not in scope
    if "lm_head" in scope or ("/sample/" in scope and is_matmul):  # (older caches: the LM head under sample)
        return "LM head"
    if is_matmul:
        return "matmuls"
    if "/sample" in scope or scope.startswith("sample"):
        return "sampler"
    if "attention" in scope:
        return "attention"
    if "mlp" in scope:
        return "mlp elementwise"
    return "other device"


def exclusive_times(events: list[dict]) -> list[tuple[str, float]]:
    """(name, exclusive microseconds) of complete events, nesting by time on each thread."""
    by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, child time]

        def close(until):
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= until:
                e, child = stack.pop()
                out.append((e["name"], e["dur"] - child))
                if stack:
                    stack[-1][1] += e["dur"]

        for e in evs:
            close(e["ts"])
            stack.append([e, 0.0])
        close(float("inf"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--num-seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest thunks with their scopes")
    ap.add_argument("--spec", type=int, default=0, help="verify K speculated tokens per sequence each step")
    args = ap.parse_args()

    from jaxserve.llm import build_engine
    from jaxserve.sampling import SamplingParams

    engine = build_engine(
        None,
        quantization=args.quantization,
        attention_backend=args.attention_backend,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=512,
        max_num_seqs=max(args.num_seqs, 1) * (1 + args.spec),  # a proposal takes a sampled row
        max_num_batched_tokens=512,
        quiet=True,
        progress=False,
        speculative_config=(
            {"method": "ngram", "num_speculative_tokens": args.spec, "disable_by_batch_size": None}
            if args.spec
            else None
        ),
    )
    if args.spec:
        engine.proposer.propose = lambda tokens: [int(tokens[-1])] * args.spec
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i in range(args.num_seqs):
        engine.add_request(f"p{i}", [int(x) for x in rng.integers(100, 40000, args.context)], params)
    while (
        any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    bucket = engine.runner.bucket_for(args.num_seqs * (1 + args.spec))
    scopes = scopes_of(engine.runner.compiled[bucket].as_text())

    trace_dir = tempfile.mkdtemp(prefix="jaxserve-trace-")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    per_thunk = collections.Counter()
    for name, us in exclusive_times(events):
        if name in scopes:
            totals[phase_of(name, scopes[name])] += us / 1e3
            per_thunk[name] += us / 1e3
    device = sum(totals.values())
    totals["host"] = max(0.0, wall * 1e3 - device)
    per_step = {k: totals[k] / args.steps for k in PHASES}
    total = sum(per_step.values())
    print(
        f"quantization={args.quantization}, kv_cache_dtype={args.kv_cache_dtype}, "
        f"{args.num_seqs} sequences decoding at context ~{args.context}"
        f"{f', verifying {args.spec} proposals each' if args.spec else ''}: "
        f"bucket T{bucket}, {total:.1f} ms per step ({args.num_seqs / total * 1e3:.0f} tok/s)"
    )
    for k in PHASES:
        print(f"  {k:<16} {per_step[k]:8.2f} ms  {100 * per_step[k] / total:5.1f}%")
    for name, ms in per_thunk.most_common(args.top):
        print(f"  {ms / args.steps:8.2f} ms  {phase_of(name, scopes[name]):<15} {name}  {scopes[name][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
