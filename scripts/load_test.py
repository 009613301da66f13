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

--soak (HTTP, with --start): the clients misbehave too. Each request is drawn (seeded) from a mix: good streamed
completions and chats (random max_tokens, n, logprobs, temperature; each must come back whole, with exactly the
tokens asked for), clients that disconnect mid-stream, server-side deadlines (`timeout`), client-side aborts,
bad requests (each must get a 4xx naming its field), and clients that never read (a 4 KiB receive buffer; the
server must end the stream). Every --sample seconds the server's RSS and /health are read; at the end the KV
pages still in use (must be 0), the RSS curve, and its trend after warm-up (last-quarter median minus
first-quarter median, and the slope) are printed. Exit 1 when a good request failed, /health ever failed, a page
leaked, the RSS grew past --max-rss-growth after warm-up, or the server exited non-zero.

    python scripts/load_test.py --start http --soak --duration 1800 --concurrency 32 --json soak.json

--swap PATH (HTTP, with --start): a model swap under load. The server starts serving --model as `swap@1` with an
admin key; the clients send model "swap" with a `user` drawn from --users keys (one request in ten pinned to
"swap@1"), and record the `model_version` of every chunk. The phases, --duration / 5 seconds each: A v1 at 100%
(PATH loads as swap@2 through POST /admin/load meanwhile; B waits until it is ready), B split {1: 70, 2: 30},
C rollback (v1 100%), D promote v2, E rollback (v1 100%); then v2 is unloaded (it has no traffic) and its report
(KV pages in use when it stopped, weight and KV bytes, RSS freed) is printed next to the server's RSS. Exit 1
when any request failed or was cancelled, a stream changed version, a pinned request was not answered by v1, a
user saw two versions within one phase, a phase's share of v2 is off its split by more than --split-tolerance
(plus 4 binomial standard deviations), or v2's pages were not all free when it stopped.

    python scripts/load_test.py --start http --model model.gguf --swap model-int8/ --concurrency 32 --duration 100
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
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.servers.metrics import metric_value  # noqa: E402
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
        "stream_write_timeout",
    )
]


def default_model_file() -> str:
    from models.loader import default_model_path

    return default_model_path()


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


async def post_stream(session: aiohttp.ClientSession, url: str, body: dict, rec: Record, on_open=None, on_chunk=None):
    """One streamed completion into `rec`: tokens timed as chunks come, the usage's count, or the error kind
    (HTTP status / an error chunk / a transport error). on_open(response) and on_chunk(chunk) see each as it
    comes."""
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if on_open is not None:
                on_open(resp)
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
                if on_chunk is not None:
                    on_chunk(chunk)
                if chunk.get("choices"):
                    rec.token()
                    counted += 1
                if chunk.get("usage"):
                    rec.tokens = chunk["usage"]["completion_tokens"]
            if not rec.tokens:  # no usage chunk: fall back to counting chunks (one per engine step)
                rec.tokens = counted
    # ValueError: a bad or overlong SSE line; RuntimeError: aiohttp's "Connection closed" mid-stream
    except (aiohttp.ClientError, ValueError, KeyError, RuntimeError) as e:
        rec.error, rec.message = type(e).__name__, str(e)[:300]
    rec.end = time.perf_counter()
    return rec


def completion_body(prompt: str, args, **extra) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        **extra,
    }


async def http_request(session: aiohttp.ClientSession, url: str, prompt: str, args) -> Record:
    return await post_stream(session, url, completion_body(prompt, args), Record())


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


# ---- soak: clients that misbehave ---------------------------------------------------------------------------------

SOAK_MIX = (("good", 58), ("disconnect", 10), ("deadline", 10), ("abort", 8), ("bad", 12), ("never_reads", 2))
# Bad requests: (path, body (bytes: sent as is), headers): each must be refused with a 4xx that names a field.
_BAD = [
    ("/v1/completions", {"prompt": "hi", "n": 0}, None),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, None),
    ("/v1/completions", {"prompt": "lone \ud800 surrogate"}, None),
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, None),
    ("/v1/completions", {"prompt": "hi", "priority": 5}, None),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, None),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 100}, None),
    ("/v1/completions", {"prompt": [10**9]}, None),
    ("/v1/completions", {"prompt": "hi", "n": 64, "max_tokens": 2000, "logprobs": 20}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None),
    ("/v1/chat/completions", {"messages": []}, None),
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b'{"prompt": "hi"}', {"Content-Type": "text/plain"}),
]


class SoakRecord(Record):
    def __init__(self, kind: str, room: int):
        super().__init__()
        self.kind, self.outcome = kind, "ok"  # outcome: "ok" or what went wrong (a failure of this kind's check)
        self.room = room  # max_tokens for the long requests: what the context leaves after a prompt


def _chunks_of(raw_lines: list[str]) -> list[dict]:
    return [json.loads(line[5:]) for line in raw_lines if line.startswith("data:") and line != "data: [DONE]"]


async def soak_good(session, url: str, prompt: str, rng: random.Random, rec: SoakRecord) -> None:
    chat = rng.random() < 0.4
    n = rng.choice((1, 1, 1, 2))
    max_tokens = rng.randint(4, 48)
    body = {"max_tokens": max_tokens, "temperature": rng.choice((0.0, 0.7)), "n": n, "ignore_eos": True}
    body.update(stream=True, stream_options={"include_usage": True})
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        if rng.random() < 0.3:
            body.update(logprobs=True, top_logprobs=3)
    else:
        body["prompt"] = prompt
        if rng.random() < 0.3:
            body["logprobs"] = 3
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with session.post(url + path, json=body) as resp:
        if resp.status != 200:
            rec.outcome = f"good request got http {resp.status}: {(await resp.text())[:200]}"
            return
        lines = [raw.decode().strip() async for raw in resp.content]
    if "data: [DONE]" not in lines:
        rec.outcome = "good stream ended without [DONE]"
        return
    chunks = _chunks_of(lines)
    errors = [c for c in chunks if "error" in c]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    finished = {ch["index"] for c in chunks for ch in c.get("choices", ()) if ch.get("finish_reason")}
    if errors or not usage or usage[-1]["completion_tokens"] != n * max_tokens or finished != set(range(n)):
        rec.outcome = f"good stream incomplete: errors={errors[:1]} usage={usage[-1:]} finished={sorted(finished)}"
        return
    rec.tokens = usage[-1]["completion_tokens"]
    rec.token()


async def soak_disconnect(session, url: str, prompt: str, rng: random.Random, rec: SoakRecord) -> None:
    body = {"prompt": prompt, "max_tokens": 64, "stream": True, "ignore_eos": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        seen, want = 0, rng.randint(1, 4)
        async for raw in resp.content:
            seen += raw.startswith(b"data:")
            if seen >= want:
                resp.close()  # drops the connection mid-stream
                return


async def soak_deadline(session, url: str, prompt: str, rng: random.Random, rec: SoakRecord) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": rec.room,
        "stream": True,
        "ignore_eos": True,
        "timeout": rng.uniform(0.2, 2),
    }
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status == 504:
            return
        if resp.status != 200:
            rec.outcome = f"deadline request got http {resp.status}"
            return
        lines = [raw.decode().strip() async for raw in resp.content]
    chunks = _chunks_of(lines)
    ended = any("error" in c and c["error"].get("code") == 504 for c in chunks)
    if not ended and not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks):
        rec.outcome = "deadline stream neither timed out nor finished"


async def soak_abort(session, url: str, prompt: str, rng: random.Random, rec: SoakRecord) -> None:
    body = {"prompt": prompt, "max_tokens": 128, "stream": rng.random() < 0.7, "ignore_eos": True}

    async def go():
        async with session.post(url + "/v1/completions", json=body) as resp:
            async for _ in resp.content:
                pass

    task = asyncio.ensure_future(go())
    await asyncio.sleep(rng.uniform(0, 1.0))
    task.cancel()  # the client gives up: the connection closes under the request
    await asyncio.gather(task, return_exceptions=True)


async def soak_bad(session, url: str, prompt: str, rng: random.Random, rec: SoakRecord) -> None:
    path, body, headers = rng.choice(_BAD)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url + path, data=data, headers=headers or {"Content-Type": "application/json"}) as resp:
        got = await resp.json(content_type=None)
    err = got.get("error") if isinstance(got, dict) else None
    if not 400 <= resp.status < 500 or not err or not err.get("param"):
        rec.outcome = f"bad request {body!r:.80} got http {resp.status}: {str(got)[:200]}"


_TCP_CLOSED_STATES = (7, 8)  # TCP_CLOSE (the server reset the connection), TCP_CLOSE_WAIT (it closed it)


async def soak_never_reads(url: str, prompt: str, rng: random.Random, rec: SoakRecord, limit: float) -> None:
    """A 4 KiB receive buffer, a big streamed request (n=16, 20 logprobs a token), and no reading at all: the
    server must end the connection (seen in the socket's TCP state, without reading) within `limit` s of the
    request starting to stream (queueing included), or have written all of it (the kernel's buffers held it; read
    at the end, it finishes with [DONE])."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, int(port)))
        body = json.dumps(
            {"prompt": prompt, "n": 16, "logprobs": 20, "max_tokens": rec.room, "stream": True, "ignore_eos": True}
        ).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        await loop.sock_sendall(sock, (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in _TCP_CLOSED_STATES:
                return  # ended by the server
            await asyncio.sleep(0.5)
        tail, end = b"", time.monotonic() + 30  # not ended: then it must have been written whole
        while time.monotonic() < end:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), end - time.monotonic())
            except (asyncio.TimeoutError, OSError):
                break
            tail = (tail + data)[-64:]
            if not data or b"data: [DONE]" in tail:
                break
        if b"data: [DONE]" not in tail:
            rec.outcome = f"a stream nobody read was not ended within {limit:.0f} s"
    finally:
        sock.close()


SOAK_CLIENTS = {
    "good": soak_good,
    "disconnect": soak_disconnect,
    "deadline": soak_deadline,
    "abort": soak_abort,
    "bad": soak_bad,
}


def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _metric(session, url: str, spec: str) -> float | None:
    """The sum of the server's samples `spec` names ('name' or 'name{k="v"}': every model and version of it,
    the series being labelled by them), or None if it has none."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    try:
        return metric_value(text, spec)
    except KeyError:
        return None


async def run_soak(url: str, pid: int, args) -> dict:
    prompts = make_prompts(64, args.prompt_words, args.seed)
    records: list[SoakRecord] = []
    samples: list[tuple[float, float, int]] = []  # (seconds, RSS MiB, requests so far)
    health_failures: list[str] = []
    weights = [w for _, w in SOAK_MIX]
    kinds = [k for k, _ in SOAK_MIX]
    # a stream nobody reads must be ended within its queueing time plus the write timeout: 5 minutes is plenty
    hold = 300.0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        async with session.get(url + "/v1/models") as r:
            room = min(1000, (await r.json())["data"][0]["max_model_len"] - 4 * args.prompt_words - 64)
        t0 = time.perf_counter()
        deadline = t0 + args.duration

        async def client(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            n = i
            while time.perf_counter() < deadline:
                kind = rng.choices(kinds, weights)[0]
                rec = SoakRecord(kind, room)
                prompt = prompts[n % len(prompts)]
                n += args.concurrency
                try:
                    if kind == "never_reads":
                        await soak_never_reads(url, prompt, rng, rec, hold)
                    else:
                        await SOAK_CLIENTS[kind](session, url, prompt, rng, rec)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                    if kind in ("good", "bad"):  # the others may well see their own connection cut
                        rec.outcome = f"{kind} request failed: {type(e).__name__}: {str(e)[:200]}"
                rec.end = time.perf_counter()
                records.append(rec)

        async def sampler() -> None:
            while True:
                now = time.perf_counter() - t0
                try:
                    async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                        if r.status != 200:
                            health_failures.append(f"{now:.0f}s: /health {r.status} {await r.text()}")
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    health_failures.append(f"{now:.0f}s: /health {type(e).__name__}")
                samples.append((now, _rss_mib(pid) or 0.0, len(records)))
                await asyncio.sleep(args.sample)

        watch = asyncio.create_task(sampler())
        tasks = [asyncio.create_task(client(i)) for i in range(args.concurrency)]
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        _, pending = await asyncio.wait(tasks, timeout=args.grace + hold)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Idle now: every page must be back (a few seconds for the last aborts to land).
        end = time.monotonic() + 30
        while time.monotonic() < end:
            in_use = await _metric(session, url, "jaxserve_kv_pages_in_use")
            running = await _metric(session, url, "jaxserve_num_requests_running")
            if not in_use and not running:
                break
            await asyncio.sleep(0.5)
        samples.append((time.perf_counter() - t0, _rss_mib(pid) or 0.0, len(records)))
        watch.cancel()
        outcomes = {}
        for name in ("stop", "length", "abort", "cancelled", "deadline", "invalid", "slow_client", "error"):
            outcomes[name] = await _metric(session, url, f'jaxserve_requests_total{{outcome="{name}"}}')
        elapsed = time.perf_counter() - t0
    failures = [r for r in records if r.outcome != "ok"]
    by_kind = {k: sum(r.kind == k for r in records) for k in kinds}
    e2e = {k: [r.end - r.start for r in records if r.kind == k] for k in kinds}
    latency = {k: {"p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "max_ms": pct(v, 100)} for k, v in e2e.items() if v}
    growth, slope = rss_trend(samples, args.duration * args.warmup_fraction)
    return {
        "protocol": "http-soak",
        "target": url,
        "elapsed_s": round(elapsed, 1),
        "requests": len(records),
        "by_kind": by_kind,
        "e2e_by_kind": latency,
        "good_answered": sum(r.kind == "good" and r.outcome == "ok" for r in records),
        "good_tokens": sum(r.tokens for r in records if r.kind == "good"),
        "failures": len(failures),
        "first_failures": list(dict.fromkeys(r.outcome for r in failures))[:8],
        "health_failures": health_failures[:8],
        "kv_pages_in_use_at_end": in_use,
        "running_at_end": running,
        "server_outcomes": outcomes,
        "rss_curve_mib": [(round(t), round(rss, 1), n) for t, rss, n in samples],
        "rss_growth_after_warmup_mib": None if growth is None else round(growth, 1),
        "rss_slope_mib_per_hour": None if slope is None else round(slope, 1),
    }


def rss_trend(samples: list[tuple[float, float, int]], warmup_s: float) -> tuple[float | None, float | None]:
    """After warm-up: (median RSS of the last quarter - median of the first quarter, MiB; the least-squares slope,
    MiB per hour). The RSS saw-tooths by the size of a step's transient buffers, so single samples (the max minus
    the first) measure that amplitude, not growth; quarter medians and the slope measure the trend."""
    warm = [(t, rss) for t, rss, _ in samples if t >= warmup_s]
    if len(warm) < 8:
        return None, None
    q = len(warm) // 4
    first, last = sorted(r for _, r in warm[:q]), sorted(r for _, r in warm[-q:])
    growth = last[len(last) // 2] - first[len(first) // 2]
    ts, rs = np.array([t for t, _ in warm]), np.array([r for _, r in warm])
    slope = float(np.polyfit(ts, rs, 1)[0]) * 3600
    return growth, slope


def print_soak(r: dict, max_growth: float) -> None:
    print(f"soak over {r['elapsed_s']:.0f} s: {r['requests']} requests {r['by_kind']}")
    print(f"  good requests answered whole: {r['good_answered']} of {r['by_kind']['good']} ({r['good_tokens']} tokens)")
    for kind, q in r["e2e_by_kind"].items():
        print(f"  {kind:12} e2e p50 {q['p50_ms']:9.0f} ms  p99 {q['p99_ms']:9.0f} ms  max {q['max_ms']:9.0f} ms")
    print(f"  client-side failures: {r['failures']}  /health failures: {len(r['health_failures'])}")
    for f in r["first_failures"] + r["health_failures"]:
        print(f"    {f}")
    print(f"  at the end: KV pages in use {r['kv_pages_in_use_at_end']}, running {r['running_at_end']}")
    print(f"  server outcomes: {r['server_outcomes']}")
    curve = r["rss_curve_mib"]
    lo, hi = min(rss for _, rss, _ in curve), max(rss for _, rss, _ in curve)
    print(f"  RSS curve (s, MiB, requests so far; the bar spans {lo:.0f}..{hi:.0f} MiB):")
    step = max(1, len(curve) // 30)
    for t, rss, n in curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else []):
        print(f"    {t:6d} s {rss:8.1f} MiB {n:7d}  " + "#" * (1 + int(50 * (rss - lo) / max(hi - lo, 1e-9))))
    growth, slope = r["rss_growth_after_warmup_mib"], r["rss_slope_mib_per_hour"]
    print(
        f"  RSS after warm-up: last-quarter median - first-quarter median {growth} MiB (limit {max_growth:g}); "
        f"trend {slope} MiB/hour"
    )


def soak_failed(r: dict, max_growth: float) -> bool:
    growth = r["rss_growth_after_warmup_mib"]
    return bool(
        r["failures"]
        or r["health_failures"]
        or r["kv_pages_in_use_at_end"] != 0  # (None: the server reported no such metric, so nothing was checked)
        or r["running_at_end"] != 0
        or not r["good_answered"]
        or growth is None
        or growth > max_growth
        or r.get("server_exit_code") not in (None, 0)
    )


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


# ---- swap: a model version swap under load ------------------------------------------------------------------------

SWAP_NAME = "swap"
# phase -> the admin call that starts it, and the share (percent) of unpinned requests v2 must answer in it
SWAP_PHASES = (
    ("A", None, 0),
    ("B", ("split", {"split": {"1": 70, "2": 30}}), 30),
    ("C", ("rollback", {}), 0),
    ("D", ("promote", {"version": "2"}), 100),
    ("E", ("rollback", {}), 0),
)


class SwapRecord(Record):
    def __init__(self, user: str, pinned: bool, phase: str):
        super().__init__()
        self.user, self.pinned, self.phase_sent, self.phase_answered = user, pinned, phase, None
        self.versions: set[str | None] = set()  # every chunk's model_version (one, if the stream kept its version)
        self.header_version: str | None = None


async def swap_request(session, url: str, prompt: str, rec: SwapRecord, args, state: dict) -> SwapRecord:
    body = completion_body(prompt, args, model=f"{SWAP_NAME}@1" if rec.pinned else SWAP_NAME, user=rec.user)

    def opened(resp) -> None:
        rec.phase_answered = state["phase"]  # routed between the send and the response's headers
        rec.header_version = resp.headers.get("x-jaxserve-model-version")

    return await post_stream(
        session, url, body, rec, opened, lambda chunk: rec.versions.add(chunk.get("model_version"))
    )


async def admin_call(session, url: str, key: str, action: str, body: dict | None = None) -> dict:
    auth = {"Authorization": f"Bearer {key}"}
    call = session.get(url + "/admin/models", headers=auth) if action == "models" else None
    call = call or session.post(f"{url}/admin/{action}", json={"model": SWAP_NAME, **(body or {})}, headers=auth)
    async with call as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"admin {action}: HTTP {r.status}: {data}")
        return data


async def wait_version(session, url: str, key: str, version: str, timeout: float) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = await admin_call(session, url, key, "models")
        for m in state["models"]:
            v = next((x for x in m["versions"] if x["version"] == version), None) if m["name"] == SWAP_NAME else None
            if v and v["state"] == "ready":
                return v
            if v and v["state"] == "failed":
                raise RuntimeError(f"{SWAP_NAME}@{version} failed to load: {v.get('error')}")
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{SWAP_NAME}@{version} was not ready after {timeout:.0f} s")


async def run_swap(url: str, pid: int, args) -> dict:
    prompts = make_prompts(64, args.prompt_words, args.seed)
    users = [f"user-{i}" for i in range(args.users)]
    records: list[SwapRecord] = []
    state = {"phase": "A", "stop": False, "in_flight": 0}
    phase_s = args.duration / len(SWAP_PHASES)
    timeline: list[dict] = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency + 4), timeout=aiohttp.ClientTimeout(total=None)
    ) as session:

        async def client(i: int) -> None:
            rng, n = random.Random(args.seed * 7919 + i), i
            while not state["stop"]:
                rec = SwapRecord(rng.choice(users), rng.random() < args.pinned_fraction, state["phase"])
                state["in_flight"] += 1
                records.append(await swap_request(session, url, prompts[n % len(prompts)], rec, args, state))
                state["in_flight"] -= 1
                n += args.concurrency

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(i)) for i in range(args.concurrency)]
        loaded = await admin_call(session, url, args.admin_key, "load", {"version": "2", "path": args.swap})
        timeline.append({"t": time.perf_counter() - t0, "event": f"load v2 ({loaded['state']})"})
        await asyncio.sleep(phase_s)
        v2 = await wait_version(session, url, args.admin_key, "2", args.start_timeout)
        timeline.append({"t": time.perf_counter() - t0, "event": "v2 ready", "report": v2.get("report")})
        for phase, call, _ in SWAP_PHASES[1:]:
            state["phase"] = "switching"  # requests routed while the admin call runs count for neither phase
            answer = await admin_call(session, url, args.admin_key, call[0], call[1])
            state["phase"] = phase
            timeline.append({"t": time.perf_counter() - t0, "event": f"{phase}: {call[0]}", "split": answer["split"]})
            print(f"[load_test] phase {phase}: {call[0]} -> split {answer['split']}", file=sys.stderr)
            await asyncio.sleep(phase_s)
        state["stop"] = True
        _, pending = await asyncio.wait(tasks, timeout=args.grace)
        cancelled = state["in_flight"]
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - t0
        rss_before = _rss_mib(pid)
        unload = await admin_call(session, url, args.admin_key, "unload", {"version": "2", "timeout": 60})
        rss_after = _rss_mib(pid)
        final = await admin_call(session, url, args.admin_key, "models")
    out = summarize("http", url, records, cancelled, elapsed)
    out.update(swap_checks(records, args))
    out.update(
        timeline=timeline,
        unload_report=unload["report"],
        server_rss_mib_before_unload=rss_before,
        server_rss_mib_after_unload=rss_after,
        final_state=final["models"],
        events=final["events"][-20:],
    )
    return out


def swap_checks(records: list[SwapRecord], args) -> dict:
    """What the swap must show, from the records: one version per stream, pinned requests on v1, sticky users
    within a phase, and each phase's share of v2 next to its split."""
    ok = [r for r in records if r.error is None]
    mixed = [r for r in ok if len(r.versions) != 1 or r.header_version not in r.versions]
    pinned_off = [r for r in ok if r.pinned and r.versions != {"1"}]
    phases = {}
    for phase, _, want in SWAP_PHASES:
        rows = [r for r in ok if not r.pinned and r.phase_sent == phase == r.phase_answered and len(r.versions) == 1]
        by_user: dict[str, set] = {}
        for r in rows:
            by_user.setdefault(r.user, set()).update(r.versions)
        on_v2 = sum(r.versions == {"2"} for r in rows)
        share = on_v2 / len(rows) if rows else None
        p = want / 100
        # sticky routing draws a version per user, not per request: the spread follows the number of users
        tol = args.split_tolerance + 4 * (p * (1 - p) / max(1, len(by_user))) ** 0.5
        phases[phase] = {
            "requests": len(rows),
            "users": len(by_user),
            "v2_percent_wanted": want,
            "v2_percent": None if share is None else round(100 * share, 1),
            "tolerance_percent": round(100 * tol, 1),
            "within_tolerance": share is not None and abs(share - p) <= tol,
            "users_on_two_versions": sum(len(v) > 1 for v in by_user.values()),
        }
    return {
        "streams_changing_version": len(mixed),
        "pinned_requests": sum(r.pinned for r in ok),
        "pinned_not_on_v1": len(pinned_off),
        "phases": phases,
    }


def print_swap(r: dict) -> None:
    print_table([r])
    print(f"\nswap: {r['streams_changing_version']} streams changed version; {r['pinned_not_on_v1']} of "
          f"{r['pinned_requests']} pinned (swap@1) requests answered by another version")  # fmt: skip
    print(f"{'phase':>5} {'requests':>9} {'users':>6} {'v2 wanted':>10} {'v2 got':>8} {'tol':>6} {'sticky broken':>14}")
    for name, p in r["phases"].items():
        got = "-" if p["v2_percent"] is None else f"{p['v2_percent']:.1f}%"
        print(
            f"{name:>5} {p['requests']:>9} {p['users']:>6} {p['v2_percent_wanted']:>9}% {got:>8} "
            f"{p['tolerance_percent']:>5.1f}% {p['users_on_two_versions']:>14}"
        )
    u = r["unload_report"]
    print(f"v2 unloaded: {json.dumps(u)}; server RSS {r['server_rss_mib_before_unload']} -> "
          f"{r['server_rss_mib_after_unload']} MiB")  # fmt: skip


def swap_failed(r: dict) -> list[str]:
    why = []
    if r["errors"] or r["cancelled"] or not r["requests"]:
        why.append(f"{r['errors']} errors, {r['cancelled']} cancelled, {r['requests']} completed")
    if r["streams_changing_version"]:
        why.append(f"{r['streams_changing_version']} streams changed version")
    if r["pinned_not_on_v1"]:
        why.append(f"{r['pinned_not_on_v1']} pinned requests not on v1")
    for name, p in r["phases"].items():
        if not p["within_tolerance"]:
            why.append(f"phase {name}: v2 {p['v2_percent']}% for {p['v2_percent_wanted']}% wanted")
        if p["users_on_two_versions"]:
            why.append(f"phase {name}: {p['users_on_two_versions']} users saw two versions")
    if r["unload_report"].get("kv_pages_in_use_at_stop", 0) != 0:
        why.append(f"v2 stopped with {r['unload_report']['kv_pages_in_use_at_stop']} pages in use")
    return why


# ---- launching servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(protocol: str, port: int, args) -> list[str]:
    if protocol == "http":
        cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if args.swap:  # v1 is --model (the default model when none is given), served as swap@1
            cmd += ["--model", f"{SWAP_NAME}={args.model or default_model_file()}@1", "--admin-key", args.admin_key]
        return cmd + [
            x
            for name, flag, _ in ENGINE_FLAGS
            if getattr(args, name) is not None and not (args.swap and name == "model")
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
        if args.swap:
            result = await run_swap(target, proc.pid, args)
        elif args.soak:
            result = await run_soak(target, proc.pid, args)
        else:
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
    p.add_argument("--soak", action="store_true", help="misbehaving clients too, RSS and health watched (see above)")
    p.add_argument("--sample", type=float, default=10, help="--soak: seconds between RSS / health samples")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="--soak: RSS growth is measured after this")
    p.add_argument("--max-rss-growth", type=float, default=64, help="--soak: MiB the RSS may grow after warm-up")
    p.add_argument("--swap", metavar="PATH", help="a v1 -> v2 -> rollback swap under load, PATH as v2 (see above)")
    p.add_argument("--users", type=int, default=500, help="--swap: distinct `user` keys the clients draw from")
    p.add_argument("--pinned-fraction", type=float, default=0.1, help="--swap: requests pinned to swap@1")
    p.add_argument("--split-tolerance", type=float, default=0.02, help="--swap: a phase's v2 share may be off by")
    g = p.add_argument_group("engine flags for --start")
    for name, flag, _ in ENGINE_FLAGS:
        g.add_argument(flag, dest=name, default=None)
    args = p.parse_args(argv)
    if not (args.url or args.grpc or args.start):
        p.error("give --url and/or --grpc, or --start")
    if args.start and not set(args.start.split(",")) <= {"http", "grpc"}:
        p.error("--start takes http, grpc or http,grpc")
    if args.soak and args.start != "http":
        p.error("--soak runs against a server it starts: --start http")
    if args.swap and (args.start != "http" or args.soak):
        p.error("--swap runs against a server it starts: --start http (not with --soak)")
    args.admin_key = f"load-test-admin-{random.getrandbits(64):x}" if args.swap else None
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=2)
    if args.swap:
        print_swap(results[0])
        why = swap_failed(results[0]) + (
            [f"server exit {results[0]['server_exit_code']}"] if results[0].get("server_exit_code") else []
        )
        for line in why:
            print(f"[load_test] swap FAILED: {line}", file=sys.stderr)
        return 1 if why else 0
    if args.soak:
        print_soak(results[0], args.max_rss_growth)
        return 1 if soak_failed(results[0], args.max_rss_growth) else 0
    print_table(results)
    failed = any(r["errors"] or not r["requests"] or r.get("server_exit_code") not in (None, 0) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
