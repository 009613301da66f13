"""The OpenAI-compatible HTTP server over the fake engine (tests.fake_engine, no model compiled;
tests/test_servers_real.py runs the real model): the official `openai` client (completions and chat, streamed and
not), health / ready / metrics, and a bad-input suite. Every bad case asserts the exact status and the error's
`param` (the field), then that the server still answers and no KV page leaked."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import socket
import time
import urllib.request

import openai
import pytest

from jaxserve.api.validation import Limits
from jaxserve.async_engine import AsyncEngine
from jaxserve.servers import http_server
from jaxserve.servers.frontend import Frontend
from tests.serving import LoopThread, fake_engine, metric_value, pages_in_use, tiny_engine_flags, tiny_gguf

LIMITS = Limits(max_body_bytes=64 << 10, max_header_bytes=4 << 10, max_prompt_chars=4000)


class Server:
    def __init__(self, path, api_keys=(), limits=LIMITS, stall_timeout=120.0, **engine_options):
        self.engine = fake_engine(path, **engine_options)
        self.async_engine = AsyncEngine(self.engine)
        self.frontend = Frontend(
            self.async_engine, model_name="tiny", limits=limits, api_keys=api_keys, stall_timeout=stall_timeout
        )
        self.loop = LoopThread()
        self.runner, self.port = self.loop.run(http_server.start(self.frontend))
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)

    def close(self):
        self.loop.run(self.runner.cleanup())
        self.async_engine.shutdown()
        self.loop.close()

    def request(self, method, path, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        raw = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data

    def wait_idle(self, timeout=10.0):
        """Wait until no request holds pages; returns the pages still in use (0 when clean)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.engine.has_unfinished_requests() and pages_in_use(self.engine) == 0:
                return 0
            time.sleep(0.02)
        return pages_in_use(self.engine)

    def metric(self, name):
        return metric_value(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics").read().decode(), name)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path)
    yield s
    s.close()


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Each engine step takes >= 20 ms, so a long request is surely still running when a test acts on it."""
    step = server.engine.step

    def slow():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(server.engine, "step", slow)


GREEDY = {"model": "tiny", "temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


# ---- the openai client ------------------------------------------------------------------------------------------


def test_logit_bias_reaches_the_engine(server):
    # (this server's engine is the fake one: tests/test_engine.py shows the bias steering the real sampler)
    server.client.completions.create(prompt="hi", logit_bias={"65": 5, "7": -100}, **GREEDY)
    assert server.engine.params_seen[-1].logit_bias == ((7, -100.0), (65, 5.0))
    server.client.chat.completions.create(messages=MSG, logit_bias={"9": 1.5}, **GREEDY)
    assert server.engine.params_seen[-1].logit_bias == ((9, 1.5),)


def test_completions_streamed_equals_whole(server):
    whole = server.client.completions.create(prompt="hello there", **GREEDY)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(
        server.client.completions.create(
            prompt="hello there", stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert server.wait_idle() == 0


def test_chat_streamed_equals_whole(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = server.client.chat.completions.create(messages=messages, **GREEDY)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(server.client.chat.completions.create(messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # The chat template was applied: the prompt is longer than the two messages' text.
    tokenized = server.request("POST", "/tokenize", {"prompt": "be brief" + "hi"})[1]["count"]
    assert whole.usage.prompt_tokens > tokenized


def test_seeded_sampling_n_and_logprobs(server):
    args = dict(
        model="tiny",
        prompt="abc",
        max_tokens=6,
        temperature=1.0,
        seed=7,
        n=2,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    a = server.client.completions.create(**args)
    b = server.client.completions.create(**args)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens == 12
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.token_logprobs) == 6
    # (top_logprobs is keyed by the decoded text, so byte tokens that decode alike share one key)
    assert all(top and x <= max(top.values()) + 1e-6 <= 1e-6 for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    chat = server.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)


def test_a_list_of_prompts(server):
    """Prompt i's completion k is choice i * n + k; each equals the same prompt sent alone."""
    prompts = ["one", "two two", [5, 6, 7]]
    alone = [server.client.completions.create(prompt=p, **GREEDY).choices[0].text for p in prompts]
    whole = server.client.completions.create(prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in whole.choices] == list(range(6))
    assert [c.text for c in whole.choices] == [t for t in alone for _ in range(2)]
    assert whole.usage.completion_tokens == 6 * 12
    streamed: dict[int, str] = {}
    chunks = list(
        server.client.completions.create(
            prompt=prompts, n=2, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    for chunk in chunks:
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {i: c.text for i, c in enumerate(whole.choices)}
    assert chunks[-1].usage.completion_tokens == 6 * 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert server.wait_idle() == 0


def test_models_health_ready_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    assert server.request("GET", "/ready") == (200, {"ready": True, "reason": "ok"})
    before = server.metric("jaxserve_generation_tokens_total")
    server.client.completions.create(prompt="x", **GREEDY)
    assert server.metric("jaxserve_generation_tokens_total") == before + 12
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read().decode()
    for name in (
        'jaxserve_requests_total{model="tiny",outcome="length",version="1"}',
        'jaxserve_model_traffic_percent{model="tiny",version="1"} 100.0',
        'jaxserve_model_version_state{model="tiny",state="ready",version="1"} 1.0',
        "jaxserve_time_to_first_token_seconds_bucket",
        "jaxserve_time_per_output_token_seconds_bucket",
        "jaxserve_e2e_request_latency_seconds_count",
        "jaxserve_prompt_tokens_total",
        "jaxserve_num_requests_waiting",
        "jaxserve_num_requests_running",
        "jaxserve_kv_pages_in_use",
        "jaxserve_prefix_cache_hit_rate",
        "jaxserve_num_preemptions_total",
        "jaxserve_compilations_total",
        "jaxserve_compilations_since_warmup 0.0",
    ):
        assert name in text, name


# ---- bad input --------------------------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
MSG = [{"role": "user", "content": "hi"}]


def with_(**changes):
    return json.dumps({**OK, **changes}).encode()


BAD = [
    # (id, path, body bytes, extra headers, status, param, words in the message)
    ("malformed-json", C, b'{"prompt": "hi", ', None, 400, "body", "malformed JSON"),
    ("not-an-object", C, b"[1, 2]", None, 400, "body", "JSON object"),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe"}', None, 400, "body", "UTF-8"),
    ("nan-literal", C, b'{"prompt": "hi", "temperature": NaN}', None, 400, "temperature", "finite"),
    ("infinity-literal", C, b'{"prompt": "hi", "top_p": Infinity}', None, 400, "top_p", "finite"),
    ("overflow-float", C, b'{"prompt": "hi", "temperature": 1e400}', None, 400, "temperature", "finite"),
    ("huge-int", C, with_(max_tokens=10**30), None, 400, "max_tokens", "integer"),
    ("negative-max-tokens", C, with_(max_tokens=-5), None, 400, "max_tokens", "integer"),
    ("max-tokens-string", C, with_(max_tokens="8"), None, 400, "max_tokens", "integer"),
    ("max-tokens-beyond-context", C, with_(max_tokens=200), None, 400, "max_tokens", "context"),
    ("temperature-negative", C, with_(temperature=-1), None, 400, "temperature", "[0, 100]"),
    ("temperature-bool", C, with_(temperature=True), None, 400, "temperature", "finite"),
    ("top-p-zero", C, with_(top_p=0), None, 400, "top_p", "(0, 1]"),
    ("top-k-below", C, with_(top_k=-2), None, 400, "top_k", "integer"),
    ("n-zero", C, with_(n=0), None, 400, "n", "[1, 64]"),
    ("n-huge", C, with_(n=1000), None, 400, "n", "[1, 64]"),
    ("logprobs-too-many", C, with_(logprobs=21), None, 400, "logprobs", "[0, 20]"),
    ("seed-negative", C, with_(seed=-1), None, 400, "seed", "integer"),
    ("min-over-max", C, with_(min_tokens=9), None, 400, "min_tokens", "max_tokens"),
    ("too-many-stops", C, with_(stop=["x"] * 17), None, 400, "stop", "at most 16"),
    ("stop-too-long", C, with_(stop=["x" * 300]), None, 400, "stop", "256"),
    ("stop-wrong-type", C, with_(stop=5), None, 400, "stop", "string"),
    ("empty-prompt", C, with_(prompt=""), None, 400, "prompt", "empty"),
    ("missing-prompt", C, json.dumps({"model": "tiny"}).encode(), None, 400, "prompt", "required"),
    ("prompt-wrong-type", C, with_(prompt={"a": 1}), None, 400, "prompt", "string"),
    ("prompt-chars-over-limit", C, with_(prompt="a" * 5000), None, 400, "prompt", "4000"),
    ("prompt-over-context", C, with_(prompt="ab " * 700), None, 400, "prompt", "max_model_len=128"),
    ("token-ids-over-context", C, with_(prompt=[5] * 200), None, 400, "prompt", "exceeds the limit of 128"),
    ("token-id-out-of-vocab", C, with_(prompt=[5, 100000]), None, 400, "prompt", "out of range"),
    ("token-id-float", C, with_(prompt=[5, 6.5]), None, 400, "prompt", "integer"),
    ("too-many-prompts", C, with_(prompt=["a"] * 65), None, 400, "prompt", "exceeds the limit of 64"),
    ("empty-prompt-in-list", C, with_(prompt=["a", ""]), None, 400, "prompt[1]", "empty"),
    ("bad-ids-in-list", C, with_(prompt=[[5, 6], [7, "x"]]), None, 400, "prompt[1]", "integer"),
    ("one-prompt-in-list-over-context", C, with_(prompt=["a", "ab " * 700]), None, 400, "prompt", "max_model_len"),
    ("unknown-model", C, with_(model="gpt-4"), None, 404, "model", "not served"),
    ("echo-unsupported", C, with_(echo=True), None, 400, "echo", "not supported"),
    ("logit-bias-not-an-id", C, with_(logit_bias={"abc": 1}), None, 400, "logit_bias", "token id"),
    ("logit-bias-over-100", C, with_(logit_bias={"5": 150}), None, 400, "logit_bias", "[-100, 100]"),
    ("logit-bias-out-of-vocab", C, with_(logit_bias={"5000": 1}), None, 400, "logit_bias", "vocabulary"),
    ("logit-bias-too-many", C, with_(logit_bias={str(i): 1 for i in range(301)}), None, 400, "logit_bias", "300"),
    ("logit-bias-not-a-map", C, with_(logit_bias="5"), None, 400, "logit_bias", "map token ids"),
    ("stream-not-bool", C, with_(stream="yes"), None, 400, "stream", "boolean"),
    (
        "stream-options-without-stream",
        C,
        with_(stream_options={"include_usage": True}),
        None,
        400,
        "stream_options",
        "stream: true",
    ),
    ("priority-under-fcfs", C, with_(priority=1), None, 400, "priority", "arrival order"),
    ("lone-surrogate-prompt", C, with_(prompt="ab\ud800c"), None, 400, "prompt", "lone surrogate"),
    ("lone-surrogate-stop", C, with_(stop=["\udfff"]), None, 400, "stop", "Unicode"),
    (
        "lone-surrogate-message",
        CHAT,
        json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "\ud83d"}]}).encode(),
        None,
        400,
        "messages[0].content",
        "lone surrogate",
    ),
    (
        "lone-surrogate-part",
        CHAT,
        json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}
        ).encode(),
        None,
        400,
        "messages[0].content[0].text",
        "lone surrogate",
    ),
    ("lone-surrogate-tokenize", "/tokenize", json.dumps({"prompt": "\ud800"}).encode(), None, 400, "prompt", "lone"),
    ("priority-string", C, with_(priority="high"), None, 400, "priority", "integer"),
    ("timeout-negative", C, with_(timeout=-1), None, 400, "timeout", "seconds"),
    ("request-id-too-long", C, with_(request_id="r" * 300), None, 400, "request_id", "256"),
    ("body-too-large", C, with_(prompt="a" * (70 << 10)), None, 413, "body", "exceeds the limit"),
    ("headers-too-large", C, with_(), {"X-Junk": "j" * (6 << 10)}, 431, "headers", "exceeds the limit"),
    ("wrong-content-type", C, with_(), {"Content-Type": "text/html"}, 400, "content-type", "application/json"),
    ("unknown-path", "/v1/nothing", with_(), None, 404, "path", "no route"),
    ("chat-no-messages", CHAT, json.dumps({"model": "tiny"}).encode(), None, 400, "messages", "non-empty list"),
    (
        "chat-bad-role",
        CHAT,
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(),
        None,
        400,
        "messages[0].role",
        "one of",
    ),
    (
        "chat-content-int",
        CHAT,
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
        None,
        400,
        "messages[0].content",
        "string",
    ),
    (
        "chat-top-logprobs-alone",
        CHAT,
        json.dumps({"messages": MSG, "top_logprobs": 2}).encode(),
        None,
        400,
        "top_logprobs",
        "logprobs: true",
    ),
    (
        "chat-top-logprobs-over",
        CHAT,
        json.dumps({"messages": MSG, "logprobs": True, "top_logprobs": 30}).encode(),
        None,
        400,
        "top_logprobs",
        "[0, 20]",
    ),
    (
        "chat-max-completion-over-context",
        CHAT,
        json.dumps({"messages": MSG, "max_completion_tokens": 500}).encode(),
        None,
        400,
        "max_completion_tokens",
        "context",
    ),
]


@pytest.mark.parametrize("path,body,headers,status,param,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(server, path, body, headers, status, param, words):
    got_status, got = server.request("POST", path, body, headers)
    assert got_status == status, got
    assert got["error"]["param"] == param, got
    assert words in got["error"]["message"], got
    assert got["error"]["code"] == status
    # The server still answers a normal request, and nothing leaked.
    ok_status, ok = server.request("POST", C, {**OK, "temperature": 0})
    assert ok_status == 200 and ok["usage"]["completion_tokens"] == 4, ok
    assert server.wait_idle() == 0


def test_bad_input_is_counted(server):
    before = server.metric('jaxserve_requests_total{outcome="invalid"}')
    server.request("POST", C, with_(n=0))
    assert server.metric('jaxserve_requests_total{outcome="invalid"}') == before + 1


def test_a_reused_request_id_cannot_touch_the_running_request(server, slow_steps):
    """20 intruders send a running request's id with a deadline shorter than a step (issue 15 item 1: the refused
    duplicate's cancelled add used to abort the victim): the victim gets every token; each intruder gets its own
    answer or its own deadline, and nothing that says the id is in use."""
    victim = {**OK, "max_tokens": 120, "ignore_eos": True, "request_id": "victim-1"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(server.request, "POST", C, victim)
        time.sleep(0.3)
        for i in range(20):
            intruder = {**OK, "max_tokens": 50, "request_id": "victim-1", "timeout": 0.001 if i % 2 else 0.03}
            status, got = server.request("POST", C, intruder)
            assert status in (200, 504), (status, got)
            assert "in use" not in json.dumps(got), got
        assert not first.done()  # the intruders came while the victim ran
        status, got = first.result()
    assert status == 200 and got["usage"]["completion_tokens"] == 120, got
    assert got["choices"][0]["finish_reason"] == "length"
    assert server.wait_idle() == 0


def _open_stream(port, body):
    sock = socket.create_connection(("127.0.0.1", port))
    raw = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw)
    )
    return sock


def test_client_disconnect_mid_stream_aborts(server, slow_steps):
    before = server.metric('jaxserve_requests_total{outcome="cancelled"}')
    sock = _open_stream(server.port, {**OK, "max_tokens": 100, "ignore_eos": True, "stream": True})
    received = b""
    while b"data: " not in received:  # the stream started
        received += sock.recv(65536)
    assert server.engine.has_unfinished_requests()
    sock.close()
    assert server.wait_idle() == 0
    assert server.metric('jaxserve_requests_total{outcome="cancelled"}') == before + 1


def test_deadline_mid_stream(server, slow_steps):
    start = time.monotonic()
    status, got = server.request("POST", C, {**OK, "max_tokens": 100, "ignore_eos": True, "timeout": 0.3})
    assert status == 504 and got["error"]["param"] == "timeout" and got["error"]["type"] == "timeout_error"
    assert time.monotonic() - start < 1.5  # 100 steps of >= 20 ms would take 2 s
    assert server.wait_idle() == 0
    # Streamed: the stream carries an error event, then [DONE].
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        C,
        json.dumps({**OK, "max_tokens": 100, "ignore_eos": True, "timeout": 0.3, "stream": True}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    events = [line[6:] for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert resp.status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "timeout_error"
    assert server.wait_idle() == 0


def test_burst_over_queue_limit(model_path):
    """A queue of 2 waiting sequences (8 run at once): a burst of 24 gets some 429s at once, the rest finish."""
    s = Server(model_path, max_waiting_requests=2)
    try:
        body = {**OK, "max_tokens": 30, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda _: s.request("POST", C, body), range(24)))
        statuses = sorted(r[0] for r in results)
        assert set(statuses) == {200, 429}, statuses
        refused = [r[1] for r in results if r[0] == 429]
        assert all(e["error"]["type"] == "rate_limit_error" and "server busy" in e["error"]["message"] for e in refused)
        assert all(r[1]["usage"]["completion_tokens"] == 30 for r in results if r[0] == 200)
        assert s.metric('jaxserve_requests_total{outcome="rejected"}') == len(refused)
        assert s.wait_idle() == 0
        assert s.request("POST", C, OK)[0] == 200
    finally:
        s.close()


def test_bugs_and_engine_death_tell_clients_no_internals(model_path, monkeypatch, caplog):
    """A bug answers 500 with an incident id (the log has the exception); a dead engine's /health, /ready and
    requests say it stopped, never its error text."""
    s = Server(model_path)
    try:
        with monkeypatch.context() as m:
            m.setattr(http_server, "parse_completion", lambda *a, **k: {}["secret-key-123"])
            status, got = s.request("POST", C, OK)
        assert status == 500 and "incident" in got["error"]["message"], got
        incident = got["error"]["message"].split("incident ")[1].split(";")[0]
        assert "secret-key-123" not in json.dumps(got) and "KeyError" not in json.dumps(got)
        assert any(incident in r.getMessage() and "secret-key-123" in r.getMessage() for r in caplog.records)

        def broken():
            raise RuntimeError("device 3 lost: /dev/accel3 at 0xdeadbeef")

        s.engine.step = broken
        status, got = s.request("POST", C, {**OK, "max_tokens": 5})
        assert status in (500, 503) and "0xdeadbeef" not in json.dumps(got), got
        for path in ("/health", "/ready"):
            status, got = s.request("GET", path)
            assert status == 503 and "engine stopped" in json.dumps(got), got
            assert "0xdeadbeef" not in json.dumps(got) and "RuntimeError" not in json.dumps(got)
    finally:
        s.close()


def test_api_keys_and_json_only(model_path):
    """--api-key: model requests need one of the keys as a Bearer token (401 naming authorization otherwise);
    probes and scrapes stay open; bodies must be application/json (what a web page cannot send cross-origin
    without a preflight), keyed or not."""
    s = Server(model_path, api_keys=("key-one", "key-two"))
    try:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "key-one"},
            {"Authorization": "Basic key-one"},
        ):
            status, got = s.request("POST", C, OK, headers=headers)
            assert status == 401 and got["error"]["param"] == "authorization", (headers, got)
            assert "key-one" not in json.dumps(got)
        assert s.request("GET", "/v1/models")[0] == 401
        assert s.request("POST", C, OK, headers={"Authorization": "Bearer key-two"})[0] == 200
        keyed = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="key-one", max_retries=0)
        assert keyed.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            s.client.completions.create(model="tiny", prompt="hi", max_tokens=3)  # (its key is "unused")
        for path in ("/health", "/ready", "/metrics"):
            assert s.request("GET", path)[0] == 200, path
        assert s.metric('jaxserve_requests_total{outcome="unauthenticated"}') == 6
        auth = {"Authorization": "Bearer key-one"}
        for ctype in ("text/plain", "application/x-www-form-urlencoded", ""):
            status, got = s.request("POST", C, OK, headers={**auth, "Content-Type": ctype})
            assert status == 400 and got["error"]["param"] == "content-type", (ctype, got)
    finally:
        s.close()


def test_work_per_request_is_capped_up_front(model_path):
    """One request adds at most --max-seqs-per-request sequences (prompts x n), and a non-streamed answer may not
    be estimated past --max-response-bytes: refused with 400 naming the field before anything is queued."""
    import dataclasses

    s = Server(model_path, limits=dataclasses.replace(LIMITS, max_seqs_per_request=16, max_response_bytes=1 << 20))
    try:
        cases = [
            ({"prompt": ["a", "b", "c", "d"], "n": 5}, "prompt", "20 sequences"),
            ({"n": 17}, "n", "at most 16"),
            ({"n": 8, "max_tokens": 100, "logprobs": 20}, "max_tokens", "stream it"),
        ]
        for change, field, words in cases:
            status, got = s.request("POST", C, {**OK, **change})
            assert status == 400 and got["error"]["param"] == field and words in got["error"]["message"], got
        chat = {"model": "tiny", "messages": MSG, "n": 8, "max_completion_tokens": 100, "logprobs": True}
        status, got = s.request("POST", CHAT, {**chat, "top_logprobs": 20})
        assert status == 400 and got["error"]["param"] == "max_completion_tokens", got
        assert s.engine.stats().generation_tokens == 0 and s.metric('jaxserve_requests_total{outcome="invalid"}') == 4
        # under the bounds, or streamed, the same work is served
        assert s.request("POST", C, {**OK, "prompt": ["a", "b", "c", "d"], "n": 4})[0] == 200
        assert s.request("POST", C, {**OK, "n": 8, "max_tokens": 100, "logprobs": 5, "ignore_eos": True})[0] == 200
        streamed = s.client.completions.create(
            model="tiny", prompt="hi", n=8, max_tokens=100, logprobs=20, stream=True, extra_body={"ignore_eos": True}
        )
        assert sum(len(c.choices[0].logprobs.tokens) for c in streamed if c.choices) == 800
    finally:
        s.close()


def test_cache_salt_field_and_per_key_pools(model_path):
    """cache_salt is a request field (400 naming it when bad), and --prefix-cache-per-key puts each API key's
    requests in a pool of their own: the engine gets a salt no client can send."""
    s = Server(model_path, api_keys=("k0", "k1"))
    s.frontend.prefix_cache_per_key = True
    seen = []
    add = s.engine.add_request
    s.engine.add_request = lambda *a, **kw: (seen.append(kw.get("cache_salt")), add(*a, **kw))[1]
    try:
        for key, salt in (("k0", None), ("k1", None), ("k0", "team"), ("k1", "team")):
            body = {**OK} if salt is None else {**OK, "cache_salt": salt}
            assert s.request("POST", C, body, headers={"Authorization": f"Bearer {key}"})[0] == 200
        assert seen == ["\x00key 0\x00", "\x00key 1\x00", "\x00key 0\x00team", "\x00key 1\x00team"]
        for bad in ("", "\x00key 1\x00", 5, "x" * 300):
            status, got = s.request("POST", C, {**OK, "cache_salt": bad}, headers={"Authorization": "Bearer k0"})
            assert status == 400 and got["error"]["param"] == "cache_salt", (bad, got)
    finally:
        s.close()


def test_a_wedged_engine_fails_liveness_and_the_server_exits_1(model_path):
    """Issue 15 item 9: steps that run nothing while work is pending are no progress: past the stall timeout
    /health and /ready say so (503) and the server's lifecycle returns 1, as when the engine dies."""
    from jaxserve.servers import lifecycle

    s = Server(model_path, stall_timeout=0.5)
    try:
        assert s.request("GET", "/health")[0] == 200
        s.engine.step = lambda: []  # the loop keeps stepping, nothing moves
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(s.request, "POST", C, {**OK, "timeout": 3})
            time.sleep(1.0)
            status, got = s.request("GET", "/health")
            assert status == 503 and got["status"] == "stalled" and "no progress" in got["error"], got
            status, got = s.request("GET", "/ready")
            assert status == 503 and "no progress" in got["reason"], got
            assert s.loop.run(lifecycle.wait_for_shutdown(s.frontend, poll=0.05), timeout=5) == 1
            assert pending.result()[0] == 504  # that request's own deadline still ends it
        del s.engine.step
    finally:
        s.close()


def test_a_runaway_chat_template_fails_its_request_not_the_loop(model_path):
    """Issue 15 item 7: a hostile template renders on a worker thread, is stopped by its time bound and fails
    that request with a 400 naming messages, while the event loop answers everyone else meanwhile."""
    from models.tokenizer import MAX_TEMPLATE_SECONDS, Tokenizer

    s = Server(model_path)
    tok = s.frontend.tokenizer
    silent = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"
    s.engine.tokenizer = Tokenizer(
        tok.backend, bos_token_id=tok.bos_token_id, eos_token_ids=tok.eos_token_ids, add_bos=False, chat_template=silent
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            chat = pool.submit(s.request, "POST", CHAT, {"model": "tiny", "messages": MSG, "max_tokens": 2})
            time.sleep(0.2)
            lags = []
            while not chat.done():
                t = time.monotonic()
                assert s.request("GET", "/health")[0] == 200
                lags.append(time.monotonic() - t)
            status, got = chat.result()
            elapsed = time.monotonic() - t0
        assert status == 400 and got["error"]["param"] == "messages" and "time bound" in got["error"]["message"]
        assert MAX_TEMPLATE_SECONDS - 0.3 < elapsed < MAX_TEMPLATE_SECONDS + 2
        assert lags and max(lags) < 0.5, lags  # the loop kept answering while the template ran
    finally:
        s.engine.tokenizer = tok
        s.close()


def test_drain_ends_streams_and_waits_with_an_answer(model_path):
    """Issue 15 item 8: past --drain-timeout an in-flight stream gets an error event and [DONE], a non-streamed
    request a 503, within the drain (the stream used to hang until aiohttp's own shutdown timeout)."""
    s = Server(model_path)
    step = s.engine.step
    s.engine.step = lambda: (time.sleep(0.02), step())[1]
    try:
        body = {**OK, "max_tokens": 120, "ignore_eos": True}
        sock = _open_stream(s.port, {**body, "stream": True})
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            whole = pool.submit(s.request, "POST", C, body)
            time.sleep(0.3)
            t0 = time.monotonic()
            assert s.loop.run(s.frontend.drain(0.2), timeout=10) == 2
            status, got = whole.result(timeout=5)
            raw = b""
            sock.settimeout(5)
            while b"data: [DONE]" not in raw:
                chunk = sock.recv(65536)
                assert chunk, raw[-300:]
                raw += chunk
            elapsed = time.monotonic() - t0
        sock.close()
        assert status == 503 and "drain timeout" in got["error"]["message"], got
        assert b"drain timeout" in raw.split(b"data: [DONE]")[0][-400:], raw[-400:]
        assert elapsed < 2.0, elapsed
        assert s.wait_idle() == 0
    finally:
        del s.engine.step
        s.close()


def test_draining_refuses_new_requests(model_path):
    s = Server(model_path)
    try:
        s.frontend.draining = True
        status, got = s.request("POST", C, OK)
        assert status == 503 and "draining" in got["error"]["message"]
        assert s.request("GET", "/ready")[0] == 503
        assert s.request("GET", "/health")[0] == 200  # alive, just not taking work
    finally:
        s.close()


def test_serve_binary_drains_on_sigterm(model_path):
    """`jaxserve serve` as users run it: ready, then SIGTERM mid-stream -> the stream completes, exit 0."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jaxserve.cli",
            "serve",
            "--model",
            model_path,
            "--port",
            str(port),
            *tiny_engine_flags(),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server not ready in 180 s"
            time.sleep(0.25)
        sock = _open_stream(
            port,
            {**OK, "max_tokens": 100, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
        )
        received = b""
        while b"data: " not in received:
            received += sock.recv(65536)
        proc.send_signal(signal.SIGTERM)
        while not received.endswith(b"0\r\n\r\n"):  # the chunked response's end
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        sock.close()
        events = [line[6:] for line in received.decode(errors="replace").splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 100  # the in-flight request finished
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_client_that_never_reads_costs_bounded_memory_and_the_others_are_served(model_path):
    """Item 2: a client with a 4 KiB receive buffer asks for n=16 with 20 logprobs a token, streamed, for
    4000 tokens each, and never reads. The server folds what the client has not taken (one pending output per
    stream, bounded), ends that stream within --stream-write-timeout (its request aborted, its pages back,
    counted slow_client), its RSS peak stays within a bound, and another client is served meanwhile. (Before:
    every step's output was queued with a copy of each sequence's whole token and logprob lists: hundreds of
    MiB within seconds, and the request ran to its end.)"""
    import dataclasses
    import threading

    s = Server(model_path, limits=dataclasses.replace(LIMITS, stream_write_timeout=2.0), max_model_len=4096)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.01)

    try:
        assert s.request("POST", C, OK)[0] == 200  # warm
        base = _rss_bytes()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        body = json.dumps(
            {**OK, "n": 16, "logprobs": 20, "max_tokens": 4000, "stream": True, "temperature": 0.8, "ignore_eos": True}
        ).encode()
        sock.connect(("127.0.0.1", s.port))
        head = f"POST {C} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        end = time.monotonic() + 10
        while not s.engine.has_unfinished_requests() and time.monotonic() < end:
            time.sleep(0.01)
        assert s.engine.has_unfinished_requests()  # the greedy one runs...
        other = s.client.completions.create(prompt="someone else", **GREEDY)  # ...and another client is served
        assert other.choices[0].finish_reason == "length" and other.usage.completion_tokens == 12
        assert s.wait_idle(timeout=20) == 0  # ended: aborted, every page back (it had 16 x 4000 tokens to go)
        end = time.monotonic() + 10  # (the stream ends for good at the write timeout: counted then)
        while s.metric('jaxserve_requests_total{outcome="slow_client"}') != 1 and time.monotonic() < end:
            time.sleep(0.05)
        done.set()
        watcher.join()
        assert s.engine.stats().generation_tokens < 16 * 4000 // 4
        assert s.metric('jaxserve_requests_total{outcome="slow_client"}') == 1
        assert peak[0] - base < 48 << 20, f"RSS grew {(peak[0] - base) >> 20} MiB"
        assert s.request("POST", C, OK)[0] == 200  # and the server goes on
    finally:
        done.set()
        sock.close()
        s.close()


def test_each_choice_finishes_once_in_a_stream(server):
    """n > 1: a choice that ends early (here a stop token id) sends its finish_reason once, not again with every
    later step of its siblings (it used to repeat)."""
    ids = server.engine.tokenizer.encode("alpha beta gamma delta epsilon")
    body = {**OK, "prompt": ids, "n": 2, "temperature": 0.5, "max_tokens": 6, "stream": True}
    body.update(stop_token_ids=[ids[1]], ignore_eos=True)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", C, body=json.dumps(body), headers={"Content-Type": "application/json"})
    data = conn.getresponse().read().decode()
    conn.close()
    chunks = [json.loads(line[5:]) for line in data.splitlines() if line.startswith("data: {")]
    finishes = [(ch["index"], ch["finish_reason"]) for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finishes) == [(0, "stop"), (1, "stop")], finishes
