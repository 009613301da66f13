"""Load test: N concurrent streaming clients against a jaxserve server (HTTP and/or gRPC) for a bounded time.

Each client loops until --duration seconds have passed: it sends one streaming completion (a prompt from a fixed,
seeded set of about --prompt-words words; --max-tokens tokens, ignore_eos so every request makes exactly that
many) and records TTFT (send -> first token), TPOT ((last token - first token) / (tokens - 1)), end-to-end time,
output tokens (from the usage) and, on failure, the error kind (HTTP status / gRPC code) and message. At the
deadline no new request starts; in-flight ones get --grace seconds, then are cancelled (counted, not errors).
Protocols run one after the other, so each gets the machine to itself.

    # against running servers
    python scripts/load_test.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:50051 --concurrency 32 --duration 60
    # launch the server(s) here, on free loopback ports, with engine flags passed through; SIGTERM at the end
    python scripts/load_test.py --start http,grpc --model model.gguf --max-num-seqs 32 --kv-cache-memory 512MiB \\
        --concurrency 32 --duration 30 --json results.json

Exit status 1 when any request failed, no request completed, or a server this script started exited non-zero
(a CI smoke test); 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.v1 import jaxserve_pb2 as pb  # noqa: E402
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc  # noqa: E402

WORDS = (
    "the quick brown fox jumps over lazy dog river mountain city light dark winter summer music paper stone "
    "garden window story number table ocean forest bridge market engine signal silver golden ancient modern "
    "simple careful bright quiet heavy small large early late north south east west under above between "
    "through water fire earth wind cloud rain snow road house door"
).split()
# Engine flags passed through to a started server: (our option, `jaxserve serve` flag, `jaxserve-grpc` flag).
ENGINE_FLAGS = [
    (n, "--" + n.replace("_", "-"), "--" + n)
    for n in (
        "model",
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_waiting_requests",
        "page_size",
        "kv_cache_memory",
        "compile_cache_dir",
    )
]


def make_prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(max(1, words + rng.randint(-words // 8, words // 8))))
        for _ in range(count)
    ]


class Record:
    """One request's outcome: timings in seconds (ttft/tpot None when it failed or made < 1 / < 2 tokens)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = self.last = None
        self.end = self.start
        self.tokens, self.error, self.message = 0, None, ""

    def token(self):
        self.last = time.perf_counter()
        self.first = self.first or self.last


# ---- clients ----------------------------------------------------------------------------------------------------


async def http_request(session: aiohttp.ClientSession, url: str, prompt: str, args) -> Record:
    rec = Record()
    body = {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error, rec.message = f"http {resp.status}", (await resp.text())[:300]
                return rec
            counted = 0
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    rec.error, rec.message = f"stream {chunk['error'].get('code')}", chunk["error"].get("message")
                    return rec
                if chunk.get("choices"):
                    rec.token()
                    counted += 1
                if chunk.get("usage"):
                    rec.tokens = chunk["usage"]["completion_tokens"]
            if not rec.tokens:  # no usage chunk: fall back to counting chunks (one per engine step)
                rec.tokens = counted
    except (aiohttp.ClientError, ValueError, KeyError) as e:  # ValueError: a bad or overlong SSE line
        rec.error, rec.message = type(e).__name__, str(e)[:300]
    rec.end = time.perf_counter()
    return rec


async def grpc_request(stub: pb_grpc.JaxServeStub, prompt: str, args) -> Record:
    rec = Record()
    req = pb.GenerateRequest(
        text=prompt,
        sampling=pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True),
    )
    try:
        async for resp in stub.Generate(req):
            new = sum(len(o.token_ids) for o in resp.outputs)
            if new:
                rec.token()
                rec.tokens += new
            if resp.finished and resp.usage.completion_tokens:
                rec.tokens = resp.usage.completion_tokens
    except grpc.aio.AioRpcError as e:
        rec.error, rec.message = f"grpc {e.code().name}", (e.details() or "")[:300]
    rec.end = time.perf_counter()
    return rec


async def run_load(protocol: str, target: str, args) -> dict:
    """--concurrency clients until the deadline (+ grace); returns the summary."""
    prompts = make_prompts(64, args.prompt_words, args.seed)
    records: list[Record] = []
    async with contextlib.AsyncExitStack() as stack:
        if protocol == "http":
            session = await stack.enter_async_context(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=args.concurrency), timeout=aiohttp.ClientTimeout(total=None)
                )
            )
            send = lambda p: http_request(session, target, p, args)  # noqa: E731
        else:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target))
            stub = pb_grpc.JaxServeStub(channel)
            send = lambda p: grpc_request(stub, p, args)  # noqa: E731
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        in_flight = 0

        async def client(i: int) -> None:
            nonlocal in_flight
            n = i
            while time.perf_counter() < deadline:
                in_flight += 1
                records.append(await send(prompts[n % len(prompts)]))
                in_flight -= 1
                n += args.concurrency
                if records[-1].error:  # e.g. 429: back off a little instead of spinning
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(client(i)) for i in range(args.concurrency)]
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        _, pending = await asyncio.wait(tasks, timeout=args.grace)
        cancelled = in_flight  # requests still running after the grace period (not clients asleep)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    return summarize(protocol, target, records, cancelled, elapsed)


# ---- statistics -------------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) in milliseconds; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return 1000 * (v[lo] + (v[hi] - v[lo]) * (k - lo))


def summarize(protocol: str, target: str, records: list[Record], cancelled: int, elapsed: float) -> dict:
    ok = [r for r in records if r.error is None]
    bad = [r for r in records if r.error is not None]
    ttft = [r.first - r.start for r in ok if r.first is not None]
    tpot = [(r.last - r.first) / (r.tokens - 1) for r in ok if r.first is not None and r.tokens > 1]
    e2e = [r.end - r.start for r in ok]
    kinds: dict[str, int] = {}
    for r in bad:
        kinds[r.error] = kinds.get(r.error, 0) + 1
    tokens = sum(r.tokens for r in ok)
    out = {
        "protocol": protocol,
        "target": target,
        "elapsed_s": round(elapsed, 3),
        "requests": len(ok),
        "requests_per_s": len(ok) / elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "errors": len(bad),
        "error_kinds": kinds,
        "cancelled": cancelled,
        "first_errors": list(dict.fromkeys(f"{r.error}: {r.message}" for r in bad))[:5],
    }  # first distinct ones
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = pct(values, 50), pct(values, 99)
    return out


def print_table(results: list[dict]) -> None:
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    rows = [
        ("requests", "requests", "d"),
        ("requests/s", "requests_per_s", ".2f"),
        ("output tokens/s", "output_tokens_per_s", ".1f"),
        ("TTFT p50 ms", "ttft_p50_ms", ".1f"),
        ("TTFT p99 ms", "ttft_p99_ms", ".1f"),
        ("TPOT p50 ms", "tpot_p50_ms", ".2f"),
        ("TPOT p99 ms", "tpot_p99_ms", ".2f"),
        ("e2e p50 ms", "e2e_p50_ms", ".1f"),
        ("e2e p99 ms", "e2e_p99_ms", ".1f"),
        ("errors", "errors", "d"),
        ("cancelled", "cancelled", "d"),
    ]
    print(f"{'':18}" + "".join(f"{r['protocol']:>12}" for r in results))
    for label, key, spec in rows:
        print(f"{label:18}" + "".join(f"{f(r[key], spec):>12}" for r in results))
    for r in results:
        if r["errors"]:
            print(f"  [{r['protocol']}] errors by kind: {r['error_kinds']}")
        for e in r["first_errors"]:
            print(f"  [{r['protocol']}] {e}")


# ---- launching servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(protocol: str, port: int, args) -> list[str]:
    if protocol == "http":
        cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        return cmd + [
            x
            for name, flag, _ in ENGINE_FLAGS
            if getattr(args, name) is not None
            for x in (flag, str(getattr(args, name)))
        ]
    cmd = [sys.executable, "-m", "jaxserve.servers.grpc_server", "--host=127.0.0.1", f"--port={port}"]
    return cmd + [f"{flag}={getattr(args, name)}" for name, _, flag in ENGINE_FLAGS if getattr(args, name) is not None]


async def wait_ready(protocol: str, target: str, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the {protocol} server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(Exception):
            if protocol == "http":
                async with aiohttp.ClientSession() as s, s.get(target + "/ready") as r:
                    if r.status == 200:
                        return
            else:
                async with grpc.aio.insecure_channel(target) as ch:
                    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"the {protocol} server was not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float) -> int:
    proc.terminate()  # SIGTERM: drain, then exit
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def run_started(protocol: str, args) -> dict:
    """Start a server of this protocol on a free port, wait for it, load it, SIGTERM it."""
    port = free_port()
    target = f"http://127.0.0.1:{port}" if protocol == "http" else f"127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix=f"load_test_{protocol}_", suffix=".log", delete=False)
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(server_command(protocol, port, args), stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    result, code, t = None, None, time.perf_counter()
    try:
        await wait_ready(protocol, target, proc, args.start_timeout)
        print(f"[load_test] {protocol} server ready on {target} after {time.perf_counter() - t:.1f} s", file=sys.stderr)
        result = await run_load(protocol, target, args)
    finally:
        code = stop_server(proc, args.grace + 30)
        print(f"[load_test] {protocol} server exited with {code}", file=sys.stderr)
        log.seek(0)
        if result is None or code != 0:
            sys.stderr.write(f"[load_test] the end of {log.name}:\n" + "".join(log.readlines()[-30:]))
        log.close()
        if result is not None and code == 0:
            os.unlink(log.name)
    result["server_exit_code"] = code
    return result


# ---- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="HTTP server, e.g. http://127.0.0.1:8000")
    p.add_argument("--grpc", help="gRPC server, e.g. 127.0.0.1:50051")
    p.add_argument(
        "--start",
        nargs="?",
        const="http",
        metavar="PROTOCOLS",
        help="launch the server(s) here: http (default), grpc or http,grpc",
    )
    p.add_argument("--start-timeout", type=float, default=600, help="seconds a started server may take to be ready")
    p.add_argument("--concurrency", type=int, default=32, help="clients per protocol")
    p.add_argument("--duration", type=float, default=60, help="seconds clients keep starting requests")
    p.add_argument("--grace", type=float, default=30, help="seconds in-flight requests get after the deadline")
    p.add_argument("--prompt-words", type=int, default=64, help="words per prompt (+-12%%)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt set")
    p.add_argument("--json", help="also write the results here")
    g = p.add_argument_group("engine flags for --start")
    for name, flag, _ in ENGINE_FLAGS:
        g.add_argument(flag, dest=name, default=None)
    args = p.parse_args(argv)
    if not (args.url or args.grpc or args.start):
        p.error("give --url and/or --grpc, or --start")
    if args.start and not set(args.start.split(",")) <= {"http", "grpc"}:
        p.error("--start takes http, grpc or http,grpc")
    return args


async def amain(args) -> list[dict]:
    results = []
    for protocol in ("http", "grpc"):
        if args.start and protocol in args.start.split(","):
            results.append(await run_started(protocol, args))
        elif not args.start and (args.url if protocol == "http" else args.grpc):
            target = args.url.rstrip("/") if protocol == "http" else args.grpc
            results.append(await run_load(protocol, target, args))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = asyncio.run(amain(args))
    except RuntimeError as e:  # a started server died or never became ready (its log's end is printed above)
        print(f"[load_test] {e}", file=sys.stderr)
        return 1
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
    failed = any(r["errors"] or not r["requests"] or r.get("server_exit_code") not in (None, 0) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
