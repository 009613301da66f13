"""scripts/load_test.py as a CI smoke would run it: it starts the HTTP and gRPC servers on the tiny model, loads each
with 4 streaming clients for ~3 s, stops them with SIGTERM, and every request must succeed with exactly max_tokens
tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.serving import tiny_engine_flags, tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_test_smoke(tmp_path):
    out = tmp_path / "load.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "load_test.py"),
        "--start",
        "http,grpc",
        "--model",
        tiny_gguf(tmp_path),
        *tiny_engine_flags(),
        "--concurrency",
        "4",
        "--duration",
        "3",
        "--grace",
        "20",
        "--prompt-words",
        "8",
        "--max-tokens",
        "8",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["protocol"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"http", "grpc"}
    for protocol, r in results.items():
        assert r["requests"] > 0, (protocol, r)
        assert r["errors"] == 0 and r["cancelled"] == 0, (protocol, r)
        assert r["output_tokens"] == r["requests"] * 8, (protocol, r)
        assert r["server_exit_code"] == 0, (protocol, r)
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["tpot_p50_ms"] <= r["tpot_p99_ms"], (protocol, r)
        assert r["ttft_p50_ms"] <= r["e2e_p50_ms"], (protocol, r)
