"""Helpers for server tests: a fake engine (tests.fake_engine: no model compiled) or a tiny-model engine behind a
Frontend, and an asyncio loop on a thread that runs a
server while the test talks to it with ordinary (blocking) clients."""

from __future__ import annotations

import asyncio
import os
import threading

from jaxserve.servers.metrics import metric_value  # noqa: F401  (the tests read metrics through it)
from tests.tiny_models import TINY, random_arrays, write_gguf

PAGE = 8
TEST_CACHE = os.environ.get("JAXSERVE_TEST_CACHE", os.path.expanduser("~/.cache/jaxserve/xla-tests"))


def tiny_engine_flags(cache: str = TEST_CACHE) -> list[str]:
    """The command-line flags of tiny_engine's configuration (budget 32 tokens, 8 sequences, 1 MiB of pages),
    for the binaries the tests start (cache="" turns the persistent compile cache off)."""
    return [
        *("--max-model-len", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "32"),
        *("--page-size", "8", "--kv-cache-memory", "1MiB", "--compile-cache-dir", cache),
    ]


def tiny_gguf(directory) -> str:
    path = directory / "tiny.gguf"
    if not path.exists():
        write_gguf(path, TINY, random_arrays(TINY, seed=3))
    return str(path)


def tiny_engine(path: str, *, max_waiting_requests: int = 64, max_model_len: int = 128):
    """An LLMEngine on the tiny model: budget 32 tokens, 8 sequences, 64 pages of 8 tokens."""
    from jaxserve.engine import LLMEngine
    from jaxserve.llm import engine_config
    from models.loader import load_model

    cfg = engine_config(
        max_model_len=max_model_len,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        page_size=PAGE,
        kv_cache_memory=64 * 2 * TINY.num_layers * PAGE * TINY.num_kv_heads * TINY.head_dim * 4,
        token_buckets=(8, 32),
        max_waiting_requests=max_waiting_requests,
    )
    return LLMEngine(load_model(path), cfg)


def fake_engine(path: str, *, max_waiting_requests: int = 64, max_model_len: int = 128, step_seconds: float = 0.002):
    """A FakeEngine (echoes each prompt, tests.fake_engine) with the tiny model's tokenizer: 8 sequences a step,
    each step taking `step_seconds` (as a device step would: a reader that keeps up sees every step)."""
    from models.loader import load_model
    from tests.fake_engine import FakeEngine

    return FakeEngine(
        load_model(path).tokenizer,
        max_model_len=max_model_len,
        max_num_seqs=8,
        max_waiting_requests=max_waiting_requests,
        vocab_size=TINY.vocab_size,
        max_num_batched_tokens=32,
        page_size=PAGE,
        step_seconds=step_seconds,
    )


def pages_in_use(engine) -> int:
    """KV pages referenced by a request (prefix-cached pages nobody holds count as free): Engine.stats()."""
    return engine.stats().kv_pages_in_use


class LoopThread:
    """An asyncio event loop on a daemon thread; `run(coro)` runs a coroutine there and waits for it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def http_request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 30.0):
    """One request to a test server on 127.0.0.1 (a dict body goes as JSON): (status, the body as JSON or, when it
    is not JSON, as bytes, the response headers)."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    try:
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data), resp.headers
    except ValueError:
        return resp.status, data, resp.headers
