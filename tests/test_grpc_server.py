"""The gRPC server over the fake engine (tests.fake_engine, no model compiled; the binary runs the tiny model): the
RPCs, health and reflection, every error path (exact status codes and field names), cancel / deadline / admission /
drain / engine death, and the real `jaxserve-grpc` binary.

The servers run on an asyncio loop on a thread (tests.serving.LoopThread); the tests are plain blocking clients. Engine
steps take well under a millisecond here, so tests that must catch a request mid-flight slow the steps down (slow_steps)
instead of relying on timing luck."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jaxserve.api.validation import Limits
from jaxserve.async_engine import AsyncEngine
from jaxserve.servers.frontend import Frontend
from jaxserve.servers.grpc_server import build_server, define_flags, engine_options_from_flags, serve
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from tests.serving import LoopThread, fake_engine, metric_value, pages_in_use, tiny_gguf

LIMITS = Limits(max_body_bytes=64 << 10, max_header_bytes=4 << 10)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
S = pb.SamplingParams
Code = grpc.StatusCode


class Served:
    def __init__(self, engine, frontend, server, port, health):
        self.engine, self.frontend, self.server, self.port, self.health = engine, frontend, server, port, health
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.JaxServeStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("grpc"))


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


async def _start(engine, async_engine, limits=LIMITS, **frontend_options):
    frontend = Frontend(async_engine, model_name="tiny", limits=limits, **frontend_options)
    return Served(engine, frontend, *await build_server(frontend))


@pytest.fixture(scope="module")
def srv(gguf, loop):
    engine = fake_engine(gguf)
    async_engine = AsyncEngine(engine)
    served = loop.run(_start(engine, async_engine))
    yield served
    served.channel.close()
    loop.run(served.server.stop(0))
    async_engine.shutdown()


@pytest.fixture(scope="module")
def spare(gguf):
    """A second engine with a waiting queue of 2, for admission, drain and (last) engine death."""
    engine = fake_engine(gguf, max_waiting_requests=2)
    async_engine = AsyncEngine(engine)
    yield engine, async_engine
    async_engine.shutdown()


# ---- helpers ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def slow_steps(engine, seconds: float):
    """Every engine step takes at least `seconds` (the engine thread looks `step` up on the instance each time)."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow
    try:
        yield
    finally:
        del engine.step


def wait_idle(engine, frontend=None, timeout: float = 5.0) -> None:
    """Wait until no request holds pages or runs; fail if that does not happen within `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (
            pages_in_use(engine) == 0
            and not engine.has_unfinished_requests()
            and (frontend is None or frontend.num_inflight == 0)
        ):
            return
        time.sleep(0.02)
    assert pages_in_use(engine) == 0
    assert not engine.has_unfinished_requests()
    assert frontend is None or frontend.num_inflight == 0


def assert_still_serves(served: Served) -> None:
    out = served.stub.Complete(long_request(4))
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == pb.FINISH_REASON_LENGTH
    wait_idle(served.engine, served.frontend)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def err_field(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("jaxserve-field")


def outcome_count(frontend, outcome: str) -> float:
    body = frontend.metrics.exposition()[0].decode()
    try:
        return metric_value(body, f'jaxserve_requests_total{{outcome="{outcome}"}}')
    except KeyError:
        return 0.0


def long_request(max_tokens: int = 100, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="Hi", sampling=S(max_tokens=max_tokens, temperature=0, ignore_eos=True), **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the RPCs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [S(max_tokens=20, temperature=0, ignore_eos=True), S(max_tokens=20, temperature=0.9, seed=7, ignore_eos=True)],
    ids=["greedy", "seeded"],
)
def test_generate_streams_deltas_that_add_up_to_complete(srv, sampling):
    req = pb.GenerateRequest(text="Hello world", sampling=sampling, request_id="stream-1")
    msgs = list(srv.stub.Generate(req))
    assert len(msgs) >= 5  # one message per engine step that produced tokens (fewer if the reader fell behind)
    assert all(m.request_id == "stream-1" for m in msgs)
    assert [m.finished for m in msgs] == [False] * (len(msgs) - 1) + [True]
    assert all(not m.HasField("usage") for m in msgs[:-1])
    deltas = [d for m in msgs for d in m.outputs]
    assert all(d.index == 0 for d in deltas)
    assert [d.finish_reason for d in deltas] == [pb.FINISH_REASON_UNSPECIFIED] * (len(deltas) - 1) + [
        pb.FINISH_REASON_LENGTH
    ]
    ids = [t for d in deltas for t in d.token_ids]
    prompt_len = len(srv.engine.tokenizer.encode("Hello world"))
    assert msgs[-1].usage == pb.Usage(
        prompt_tokens=prompt_len,
        completion_tokens=20,
        total_tokens=prompt_len + 20,
        cached_tokens=msgs[-1].usage.cached_tokens,
    )
    full = srv.stub.Complete(pb.GenerateRequest(text="Hello world", sampling=sampling))
    (c,) = full.outputs
    assert len(ids) == 20 and ids == list(c.token_ids)
    assert "".join(d.text for d in deltas) == c.text == srv.engine.tokenizer.decode(ids)
    assert c.finish_reason == pb.FINISH_REASON_LENGTH
    assert full.usage.completion_tokens == 20 and full.usage.prompt_tokens == prompt_len
    assert full.request_id.startswith("grpc-")
    assert full.time_to_first_token_seconds > 0 and full.time_per_output_token_seconds > 0
    wait_idle(srv.engine, srv.frontend)


def test_logprobs(srv):
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=S(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    )
    deltas = [d for m in srv.stub.Generate(req) for d in m.outputs]
    streamed = [lp for d in deltas for lp in d.logprobs]
    assert [len(d.logprobs) for d in deltas] == [len(d.token_ids) for d in deltas]
    full = srv.stub.Complete(req).outputs[0]
    assert list(full.logprobs) == streamed and len(streamed) == 6
    for tid, lp in zip(full.token_ids, full.logprobs):
        assert lp.sampled.token_id == tid and lp.sampled.rank == 1  # greedy: the most likely token
        assert [t.rank for t in lp.top] == [1, 2, 3]
        assert lp.top[0] == lp.sampled
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.sampled.token == srv.engine.tokenizer.decode([tid], skip_special_tokens=False)
    assert math.isclose(full.cumulative_logprob, sum(lp.sampled.logprob for lp in full.logprobs), rel_tol=1e-6)
    wait_idle(srv.engine, srv.frontend)


def test_logit_bias_reaches_the_engine_and_bad_ones_name_the_field(srv):
    req = long_request(3)
    req.sampling.logit_bias[65] = 5.0
    req.sampling.logit_bias[7] = -100.0
    srv.stub.Complete(req)
    assert srv.engine.params_seen[-1].logit_bias == ((7, -100.0), (65, 5.0))
    for key, value, words in ((65, 500.0, "[-100, 100]"), (5000, 1.0, "vocabulary"), (-3, 1.0, "token id")):
        bad = long_request(3)
        bad.sampling.logit_bias[key] = value
        err = rpc_error(lambda bad=bad: srv.stub.Complete(bad))
        assert err.code() == Code.INVALID_ARGUMENT and err_field(err) == "logit_bias" and words in err.details()


def test_n_and_stop_token(srv):
    greedy = srv.stub.Complete(long_request(12)).outputs[0]
    stop_id = greedy.token_ids[5]
    first = list(greedy.token_ids).index(stop_id)
    req = long_request(12)
    req.sampling.stop_token_ids.append(stop_id)
    c = srv.stub.Complete(req).outputs[0]
    assert c.finish_reason == pb.FINISH_REASON_STOP and c.WhichOneof("stop_reason") == "stop_token_id"
    assert c.stop_token_id == stop_id and list(c.token_ids) == list(greedy.token_ids[: first + 1])

    msgs = list(
        srv.stub.Generate(
            pb.GenerateRequest(text="Hi", sampling=S(n=2, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True))
        )
    )
    for index in (0, 1):
        mine = [d for m in msgs for d in m.outputs if d.index == index]
        assert sum(len(d.token_ids) for d in mine) == 8
        assert [d.finish_reason for d in mine].count(pb.FINISH_REASON_LENGTH) == 1
    assert msgs[-1].usage.completion_tokens == 16
    wait_idle(srv.engine, srv.frontend)


def test_chat_prompt(srv):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    req = pb.GenerateRequest(
        chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in messages]),
        sampling=S(max_tokens=3, temperature=0, ignore_eos=True),
    )
    out = srv.stub.Complete(req)
    tok = srv.engine.tokenizer
    expected = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    assert out.usage.prompt_tokens == len(expected) and len(out.outputs[0].token_ids) == 3


def test_tokenize_list_models_model_info(srv):
    tok = srv.engine.tokenizer
    out = srv.stub.Tokenize(pb.TokenizeRequest(text="Hello world"))
    assert list(out.token_ids) == tok.encode("Hello world") and out.count == len(out.token_ids)
    assert out.max_model_len == 128
    raw = srv.stub.Tokenize(pb.TokenizeRequest(text="Hello", add_special_tokens=False, model="tiny"))
    assert list(raw.token_ids) == tok.encode("Hello", add_special_tokens=False)

    card = pb.ModelCard(
        id="tiny",
        max_model_len=128,
        vocab_size=260,
        dtype="float32",
        architecture="llama",
        num_parameters=srv.engine.model_card().num_parameters,
        versions=[pb.ModelVersion(version="1", state="ready", traffic_percent=100)],
    )
    assert list(srv.stub.ListModels(pb.ListModelsRequest()).models) == [card]
    info = srv.stub.ModelInfo(pb.ModelInfoRequest())
    assert info == pb.ModelInfoResponse(
        model=card,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        page_size=8,
        num_kv_pages=srv.engine.model_card().num_kv_pages,
        has_chat_template=bool(tok.chat_template),
    )
    assert srv.stub.ModelInfo(pb.ModelInfoRequest(model="tiny")) == info

    err = rpc_error(lambda: srv.stub.ModelInfo(pb.ModelInfoRequest(model="llama-70b")))
    assert err.code() == Code.NOT_FOUND and err.details().startswith("model:") and err_field(err) == "model"
    err = rpc_error(lambda: srv.stub.Tokenize(pb.TokenizeRequest(text="", model="tiny")))
    assert err.code() == Code.INVALID_ARGUMENT and err.details().startswith("text:") and err_field(err) == "text"
    err = rpc_error(lambda: srv.stub.Tokenize(pb.TokenizeRequest(text="x", model="other")))
    assert err.code() == Code.NOT_FOUND and err_field(err) == "model"


def test_a_taken_port_fails_to_bind(srv, loop):
    with pytest.raises(OSError, match=f"127.0.0.1:{srv.port}"):
        loop.run(build_server(srv.frontend, "127.0.0.1", srv.port))


def test_health_and_reflection(srv):
    for service in ("", "jaxserve.v1.JaxServe"):
        assert srv.health_stub.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING
    err = rpc_error(lambda: srv.health_stub.Check(health_pb2.HealthCheckRequest(service="nope")))
    assert err.code() == Code.NOT_FOUND

    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    (resp,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in resp.list_services_response.service}
    assert names == {
        "jaxserve.v1.JaxServe",
        "jaxserve.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    (resp,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="jaxserve.v1.JaxServe")])
    )
    assert resp.file_descriptor_response.file_descriptor_proto  # grpcurl can describe the service


# ---- bad input --------------------------------------------------------------------------------------------------


def _req(sampling=None, *, no_prompt=False, **kw):
    if not no_prompt and not {"text", "token_ids", "chat"} & kw.keys():
        kw["text"] = "Hello"
    return pb.GenerateRequest(sampling=sampling or S(), **kw)


def _ids(ids):
    return pb.TokenIds(ids=ids)


BAD = {  # name: (request, status code, the field the details start with)
    "temperature_nan": (_req(S(temperature=float("nan"))), Code.INVALID_ARGUMENT, "temperature"),
    "temperature_inf": (_req(S(temperature=float("inf"))), Code.INVALID_ARGUMENT, "temperature"),
    "temperature_negative": (_req(S(temperature=-1)), Code.INVALID_ARGUMENT, "temperature"),
    "top_p_zero": (_req(S(top_p=0)), Code.INVALID_ARGUMENT, "top_p"),
    "top_p_above_one": (_req(S(top_p=1.5)), Code.INVALID_ARGUMENT, "top_p"),
    "top_k_minus_two": (_req(S(top_k=-2)), Code.INVALID_ARGUMENT, "top_k"),
    "min_p_nan": (_req(S(min_p=float("nan"))), Code.INVALID_ARGUMENT, "min_p"),
    "presence_penalty_3": (_req(S(presence_penalty=3)), Code.INVALID_ARGUMENT, "presence_penalty"),
    "repetition_penalty_0": (_req(S(repetition_penalty=0)), Code.INVALID_ARGUMENT, "repetition_penalty"),
    "n_zero": (_req(S(n=0)), Code.INVALID_ARGUMENT, "n"),
    "n_1000": (_req(S(n=1000)), Code.INVALID_ARGUMENT, "n"),
    "max_tokens_zero": (_req(S(max_tokens=0)), Code.INVALID_ARGUMENT, "max_tokens"),
    "max_tokens_negative": (_req(S(max_tokens=-5)), Code.INVALID_ARGUMENT, "max_tokens"),
    "max_tokens_past_context": (_req(S(max_tokens=125)), Code.INVALID_ARGUMENT, "max_tokens"),  # 5 + 125 > 128
    "seed_negative": (_req(S(seed=-1)), Code.INVALID_ARGUMENT, "seed"),
    "logprobs_21": (_req(S(logprobs=21)), Code.INVALID_ARGUMENT, "logprobs"),
    "min_tokens_over_max": (_req(S(min_tokens=10, max_tokens=5)), Code.INVALID_ARGUMENT, "min_tokens"),
    "17_stop_strings": (_req(S(stop=[f"s{i}" for i in range(17)])), Code.INVALID_ARGUMENT, "stop"),
    "long_stop_string": (_req(S(stop=["x" * 257])), Code.INVALID_ARGUMENT, "stop"),
    "negative_stop_token": (_req(S(stop_token_ids=[-1])), Code.INVALID_ARGUMENT, "stop_token_ids"),
    "empty_text": (_req(text=""), Code.INVALID_ARGUMENT, "prompt"),
    "no_prompt": (_req(no_prompt=True), Code.INVALID_ARGUMENT, "prompt"),
    "text_past_context": (_req(text="ab" * 150), Code.INVALID_ARGUMENT, "prompt"),
    "token_ids_over_max_len": (_req(token_ids=_ids([1] * 129)), Code.INVALID_ARGUMENT, "token_ids"),
    "token_ids_fill_context": (_req(token_ids=_ids([1] * 128)), Code.INVALID_ARGUMENT, "token_ids"),
    "token_ids_empty": (_req(token_ids=_ids([])), Code.INVALID_ARGUMENT, "token_ids"),
    "token_id_out_of_vocab": (_req(token_ids=_ids([1, 100000])), Code.INVALID_ARGUMENT, "token_ids"),
    "token_id_negative": (_req(token_ids=_ids([-3])), Code.INVALID_ARGUMENT, "token_ids"),
    "chat_empty": (_req(chat=pb.Chat()), Code.INVALID_ARGUMENT, "chat.messages"),
    "chat_bad_role": (
        _req(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])),
        Code.INVALID_ARGUMENT,
        "chat.messages[0].role",
    ),
    "unknown_model": (_req(model="gpt-5"), Code.NOT_FOUND, "model"),
    "request_id_unprintable": (_req(request_id="a\x01b"), Code.INVALID_ARGUMENT, "request_id"),
    "request_id_too_long": (_req(request_id="r" * 257), Code.INVALID_ARGUMENT, "request_id"),
    "priority_under_fcfs": (_req(priority=1), Code.INVALID_ARGUMENT, "priority"),
    "cache_salt_control_char": (_req(cache_salt="a\x01"), Code.INVALID_ARGUMENT, "cache_salt"),
    "priority_2_40": (_req(priority=2**40), Code.INVALID_ARGUMENT, "priority"),
    "timeout_negative": (_req(timeout_seconds=-1), Code.INVALID_ARGUMENT, "timeout_seconds"),
    "timeout_nan": (_req(timeout_seconds=float("nan")), Code.INVALID_ARGUMENT, "timeout_seconds"),
}


@pytest.mark.parametrize("rpc", ["Complete", "Generate"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(srv, case, rpc):
    request, code, field = BAD[case]
    outcome = "not_found" if code == Code.NOT_FOUND else "invalid"
    before = outcome_count(srv.frontend, outcome)
    call = getattr(srv.stub, rpc)
    err = rpc_error(lambda: list(call(request)) if rpc == "Generate" else call(request))
    assert outcome_count(srv.frontend, outcome) == before + 1  # counted once, before or in the Frontend
    assert err.code() == code, err.details()
    assert err.details().startswith(f"{field}:"), err.details()
    assert err_field(err) == field
    assert_still_serves(srv)


def test_message_over_the_size_limit(srv):
    big = pb.GenerateRequest(text="a" * (LIMITS.max_body_bytes + 100))
    err = rpc_error(lambda: srv.stub.Complete(big))
    assert err.code() == Code.RESOURCE_EXHAUSTED and "larger than max" in err.details()
    assert_still_serves(srv)


def test_metadata_over_the_size_limit(srv):
    ok = srv.stub.Complete(_req(S(max_tokens=2)), metadata=(("x-padding", "p" * (LIMITS.max_header_bytes // 4)),))
    assert len(ok.outputs[0].token_ids) == 2
    # over our limit but under grpc's default one (8 KiB): refused every time, before any handler runs
    padding = "p" * (LIMITS.max_header_bytes + 1500)
    for _ in range(3):
        err = rpc_error(lambda: srv.stub.Complete(_req(), metadata=(("x-padding", padding),)))
        assert err.code() == Code.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert_still_serves(srv)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x1a\x02\xff\xfe",  # field 3 (text), invalid UTF-8
        b"\x1a\x09ab",
    ],  # field 3 claims 9 bytes, has 2
    ids=["bad_utf8", "truncated"],
)
def test_undecodable_request(srv, raw):
    identity = dict(request_serializer=None, response_deserializer=None)
    before = outcome_count(srv.frontend, "invalid")
    for call in (
        lambda: list(srv.channel.unary_stream("/jaxserve.v1.JaxServe/Generate", **identity)(raw)),
        lambda: srv.channel.unary_unary("/jaxserve.v1.JaxServe/Complete", **identity)(raw),
    ):
        err = rpc_error(call)
        assert err.code() == Code.INVALID_ARGUMENT and err.details().startswith("request:"), err.details()
        assert err_field(err) == "request"
    assert outcome_count(srv.frontend, "invalid") == before + 2
    assert_still_serves(srv)


def test_a_reused_request_id_cannot_touch_the_running_request(srv):
    """Intruders reuse a running request's id, some with a deadline shorter than a step: the victim finishes every
    token, each intruder is answered (or times out) on its own and sees its own id echoed."""
    with slow_steps(srv.engine, 0.01):
        stream = srv.stub.Generate(long_request(100, request_id="dup"))
        first = next(stream)
        assert first.request_id == "dup" and srv.frontend.num_inflight == 1
        for i in range(20):
            if i % 2:
                err = rpc_error(lambda: srv.stub.Complete(long_request(40, request_id="dup", timeout_seconds=0.001)))
                assert err.code() == Code.DEADLINE_EXCEEDED, err.details()
            else:
                out = srv.stub.Complete(long_request(4, request_id="dup"))
                assert out.request_id == "dup" and len(out.outputs[0].token_ids) == 4
        rest = list(stream)
    assert rest[-1].finished and sum(len(d.token_ids) for m in [first, *rest] for d in m.outputs) == 100
    assert all(m.request_id == "dup" for m in rest)
    wait_idle(srv.engine, srv.frontend)
    assert_still_serves(srv)


def test_a_bug_ends_only_that_request_with_internal(srv, monkeypatch):
    from jaxserve.servers import grpc_server

    def broken_conversion(*args):
        raise KeyError("conversion bug")

    with monkeypatch.context() as m:  # a bug in this server's own code
        m.setattr(grpc_server, "_delta", broken_conversion)
        err = rpc_error(lambda: list(srv.stub.Generate(long_request(50))))
    assert err.code() == Code.INTERNAL and "incident" in err.details(), err.details()
    assert "conversion bug" not in err.details() and "KeyError" not in err.details()  # the log has it, not the client
    wait_idle(srv.engine, srv.frontend)

    def broken_output(*args):
        raise ValueError("output path bug")

    srv.engine.outputs._add_tokens = broken_output  # a bug in the engine's per-request output path
    try:
        err = rpc_error(lambda: srv.stub.Complete(long_request(50)))
    finally:
        del srv.engine.outputs._add_tokens
    assert err.code() == Code.INTERNAL and "incident" in err.details() and "output path bug" not in err.details()
    wait_idle(srv.engine, srv.frontend)
    assert srv.frontend.engine.is_running
    assert_still_serves(srv)


# ---- cancel and deadlines ---------------------------------------------------------------------------------------


def test_client_cancel_aborts_the_request(srv):
    cancelled, generated = outcome_count(srv.frontend, "cancelled"), srv.engine.stats().generation_tokens
    with slow_steps(srv.engine, 0.01):
        call = srv.stub.Generate(long_request(100))
        assert next(call).outputs[0].token_ids
        assert pages_in_use(srv.engine) > 0
        call.cancel()
        wait_idle(srv.engine, srv.frontend, timeout=2.0)  # freed at once, not after 100 steps (1 s)
    assert srv.engine.stats().generation_tokens - generated < 100
    assert outcome_count(srv.frontend, "cancelled") == cancelled + 1
    assert_still_serves(srv)


def test_rpc_deadline_mid_stream(srv):
    generated = srv.engine.stats().generation_tokens
    received = []
    with slow_steps(srv.engine, 0.02):  # 100 tokens take 2 s; the deadline is 0.3 s
        err = rpc_error(lambda: received.extend(srv.stub.Generate(long_request(100), timeout=0.3)))
        assert err.code() == Code.DEADLINE_EXCEEDED
        wait_idle(srv.engine, srv.frontend, timeout=2.0)
    assert received and not received[-1].finished
    assert srv.engine.stats().generation_tokens - generated < 100
    assert_still_serves(srv)


@pytest.mark.parametrize("rpc", ["Complete", "Generate"])
def test_timeout_seconds_field(srv, rpc):
    deadlines = outcome_count(srv.frontend, "deadline")
    call = getattr(srv.stub, rpc)
    req = long_request(100, timeout_seconds=0.3)
    with slow_steps(srv.engine, 0.02):
        start = time.monotonic()
        err = rpc_error(lambda: list(call(req)) if rpc == "Generate" else call(req))
        assert time.monotonic() - start < 1.5
        wait_idle(srv.engine, srv.frontend, timeout=2.0)
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert err.details().startswith("timeout_seconds:") and err_field(err) == "timeout_seconds"
    assert outcome_count(srv.frontend, "deadline") == deadlines + 1
    assert_still_serves(srv)


# ---- admission, drain, engine death (on the spare engine) --------------------------------------------------------


def test_burst_over_the_queue_limit(spare, loop):
    engine, async_engine = spare
    served = loop.run(_start(engine, async_engine))
    try:

        def one(_):
            try:
                return list(served.stub.Generate(long_request(40)))[-1]
            except grpc.RpcError as e:
                return e

        with slow_steps(engine, 0.005), concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(12)))
        refused = [r for r in results if isinstance(r, grpc.RpcError)]
        done = [r for r in results if not isinstance(r, grpc.RpcError)]
        # 8 run and 2 wait at most: at least 2 of 12 must be refused, and at least the 2 queued ones finish
        assert len(refused) >= 2 and len(done) >= 2, [getattr(r, "details", lambda: "ok")() for r in results]
        for e in refused:
            assert e.code() == Code.RESOURCE_EXHAUSTED and e.details().startswith("server busy"), e.details()
        for r in done:
            assert r.finished and r.usage.completion_tokens == 40
        assert outcome_count(served.frontend, "rejected") == len(refused)
        wait_idle(engine, served.frontend)
        assert_still_serves(served)
    finally:
        served.channel.close()
        loop.run(served.server.stop(0))


async def _event() -> asyncio.Event:
    return asyncio.Event()


def _serve_in_background(loop, frontend, **kw):
    """Run serve() on the loop thread; returns (its future, the bound port, its stop event)."""
    stop = loop.run(_event())
    bound = concurrent.futures.Future()
    future = loop.submit(serve(frontend, ready_callback=bound.set_result, stop_event=stop, **kw))
    return future, bound.result(10), stop


def test_api_keys_on_every_rpc(gguf, loop):
    """--api-key: every JaxServe RPC needs 'authorization: Bearer <key>' metadata (UNAUTHENTICATED naming
    authorization otherwise); the health service stays open."""
    engine = fake_engine(gguf)
    async_engine = AsyncEngine(engine)
    served = loop.run(_start(engine, async_engine, api_keys=("grpc-key",)))
    try:
        for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "grpc-key"),)):
            for call in (
                lambda: served.stub.Complete(long_request(3), metadata=metadata),
                lambda: list(served.stub.Generate(long_request(3), metadata=metadata)),
                lambda: served.stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=metadata),
                lambda: served.stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata),
            ):
                err = rpc_error(call)
                assert err.code() == Code.UNAUTHENTICATED and err_field(err) == "authorization", err.details()
        assert served.frontend.primary.inflight == 0  # a refused call holds no version (it could not be unloaded)
        good = (("authorization", "Bearer grpc-key"),)
        assert len(served.stub.Complete(long_request(3), metadata=good).outputs[0].token_ids) == 3
        health = served.health_stub.Check(health_pb2.HealthCheckRequest(service="jaxserve.v1.JaxServe"))
        assert health.status == SERVING
    finally:
        served.channel.close()
        loop.run(served.server.stop(0))
        async_engine.shutdown()


def test_work_per_request_is_capped_up_front(gguf, loop):
    """n beyond max_seqs_per_request, and a Complete answer estimated past max_response_bytes, are INVALID_ARGUMENT
    naming the field before anything runs; the same work streamed through Generate is served."""
    import dataclasses

    engine = fake_engine(gguf)
    async_engine = AsyncEngine(engine)
    limits = dataclasses.replace(LIMITS, max_seqs_per_request=4, max_response_bytes=1 << 16)
    served = loop.run(_start(engine, async_engine, limits=limits))
    try:
        big = pb.GenerateRequest(
            text="Hi", sampling=S(n=4, max_tokens=100, logprobs=20, temperature=0, ignore_eos=True)
        )
        for request, field in (
            (pb.GenerateRequest(text="Hi", sampling=S(n=5, max_tokens=3)), "n"),
            (big, "max_tokens"),
        ):
            err = rpc_error(lambda: served.stub.Complete(request))
            assert err.code() == Code.INVALID_ARGUMENT and err_field(err) == field, err.details()
        assert engine.stats().generation_tokens == 0
        msgs = list(served.stub.Generate(big))
        assert msgs[-1].usage.completion_tokens == 400
    finally:
        served.channel.close()
        loop.run(served.server.stop(0))
        async_engine.shutdown()


def test_drain_finishes_in_flight_then_stops(spare, loop):
    engine, async_engine = spare
    frontend = Frontend(async_engine, model_name="tiny", limits=LIMITS)
    metrics_port = free_port()
    future, port, stop = _serve_in_background(loop, frontend, drain_timeout=10.0, metrics_port=metrics_port)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub, health = pb_grpc.JaxServeStub(channel), health_pb2_grpc.HealthStub(channel)
    try:
        assert health.Check(health_pb2.HealthCheckRequest()).status == SERVING
        with slow_steps(engine, 0.02):  # 60 tokens: about 1.2 s
            stream = stub.Generate(long_request(60))
            first = next(stream)
            loop.loop.call_soon_threadsafe(stop.set)
            end = time.monotonic() + 2
            while health.Check(health_pb2.HealthCheckRequest(service="jaxserve.v1.JaxServe")).status != NOT_SERVING:
                assert time.monotonic() < end, "health never turned NOT_SERVING"
                time.sleep(0.02)
            err = rpc_error(lambda: stub.Complete(_req()))
            assert err.code() == Code.UNAVAILABLE and "draining" in err.details()
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            assert metric_value(body, 'jaxserve_requests_total{outcome="unavailable"}') == 1.0
            rest = list(stream)  # the in-flight request runs to its end
        assert rest[-1].finished and rest[-1].usage.completion_tokens == 60
        assert sum(len(d.token_ids) for m in [first, *rest] for d in m.outputs) == 60
        assert future.result(10) == 0
        err = rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=2))
        assert err.code() == Code.UNAVAILABLE  # the server is gone
    finally:
        channel.close()
        loop.loop.call_soon_threadsafe(stop.set)
    wait_idle(engine, frontend)


def test_drain_timeout_cancels_the_rest(spare, loop):
    engine, async_engine = spare
    frontend = Frontend(async_engine, model_name="tiny", limits=LIMITS)
    future, port, stop = _serve_in_background(loop, frontend, drain_timeout=0.2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with slow_steps(engine, 0.02):  # 100 tokens take 2 s: far past the drain timeout
            stream = pb_grpc.JaxServeStub(channel).Generate(long_request(100))
            next(stream)
            loop.loop.call_soon_threadsafe(stop.set)
            err = rpc_error(lambda: list(stream))
            assert err.code() == Code.UNAVAILABLE and "drain timeout" in err.details(), err.details()
            wait_idle(engine, frontend, timeout=2.0)
        assert future.result(10) == 0
    finally:
        channel.close()


def test_engine_death_stops_the_server_with_status_1(spare, loop):
    """Last user of the spare engine: it dies here."""
    engine, async_engine = spare
    frontend = Frontend(async_engine, model_name="tiny", limits=LIMITS)
    future, port, _ = _serve_in_background(loop, frontend)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="jaxserve.v1.JaxServe"))
    statuses = [next(watch).status]
    try:
        with slow_steps(engine, 0.01):
            stream = pb_grpc.JaxServeStub(channel).Generate(long_request(100))
            next(stream)

            def broken():
                raise RuntimeError("device lost")

            engine.step = broken  # (slow_steps removes it again on exit)
            err = rpc_error(lambda: list(stream))
        assert err.code() == Code.UNAVAILABLE and "engine stopped" in err.details(), err.details()
        assert "device lost" not in err.details()  # (internals stay in the server log)
        with contextlib.suppress(grpc.RpcError):  # ends when the server stops
            statuses.extend(m.status for m in watch)
        assert statuses == [SERVING, NOT_SERVING]
        assert future.result(10) == 1
        assert not async_engine.is_running
    finally:
        channel.close()


# ---- the command line -------------------------------------------------------------------------------------------


def test_engine_options_from_flags():
    from absl import flags

    fv = flags.FlagValues()
    define_flags(fv)
    fv(
        [
            "jaxserve-grpc",
            "--max_num_seqs=8",
            "--kv_cache_memory=1MiB",
            "--noenable_prefix_caching",
            "--max_waiting_requests=3",
            "--dtype=bfloat16",
            "--compile_cache_dir=",
            "--tensor_parallel_size=3",
            "--quantization=int4",
            "--kv_cache_dtype=int8",
            "--scheduling_policy=priority",
            '--speculative_config={"method": "ngram", "num_speculative_tokens": 3}',
        ]
    )
    assert engine_options_from_flags(fv) == dict(
        model=None,
        dtype="bfloat16",
        quantization="int4",
        attention_backend="auto",
        max_model_len=None,
        compile_cache_dir=None,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        page_size=16,
        kv_cache_dtype="int8",
        enable_prefix_caching=False,
        seed=0,
        kv_cache_memory=1 << 20,
        max_waiting_requests=3,
        scheduling_policy="priority",
        tensor_parallel_size=3,
        data_parallel_size=1,
        multihost=False,
        speculative_config='{"method": "ngram", "num_speculative_tokens": 3}',
    )
    assert fv.port == 50051 and fv.host == "127.0.0.1" and fv.drain_timeout == 30.0 and fv.metrics_port is None
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["jaxserve-grpc", "--kv_cache_memory=lots"])
    with pytest.raises(ValueError, match="--kv_cache_memory"):
        engine_options_from_flags(fv)


def test_binary_serves_and_drains_on_sigterm(gguf, tmp_path):
    port = free_port()
    exe = shutil.which("jaxserve-grpc", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "jaxserve.servers.grpc_server"]
    cache = os.environ.get("JAXSERVE_TEST_CACHE", os.path.expanduser("~/.cache/jaxserve/xla-tests"))
    cmd += [  # two versions of one model, and the admin service (the binary's multi-model flags)
        *("--model", f"tiny={gguf}@1", "--model", f"tiny={gguf}@2", "--admin_key", "adm1n"),
        "--port",
        str(port),
        "--max_model_len",
        "128",
        "--max_num_seqs",
        "8",
        "--max_num_batched_tokens",
        "32",
        "--page_size",
        "8",
        "--kv_cache_memory",
        "1MiB",
        "--drain_timeout",
        "5",
        "--compile_cache_dir",
        cache,
    ]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(__file__)))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + 180
        while True:
            assert proc.poll() is None, open(tmp_path / "server.log").read()
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    break
            assert time.monotonic() < end, "the server did not become SERVING"
            time.sleep(0.5)
        msgs = list(pb_grpc.JaxServeStub(channel).Generate(long_request(10)))
        assert msgs[-1].finished and msgs[-1].usage.completion_tokens == 10 and msgs[-1].model_version == "1"
        pinned = long_request(3)
        pinned.model = "tiny@2"
        assert pb_grpc.JaxServeStub(channel).Complete(pinned).model_version == "2"
        state = json.loads(
            pb_grpc.AdminStub(channel)
            .ListVersions(pb.ListVersionsRequest(), metadata=[("authorization", "Bearer adm1n")])
            .json
        )
        versions = {v["version"]: (v["state"], v["traffic_percent"]) for v in state["models"][0]["versions"]}
        assert versions == {"1": ("ready", 100), "2": ("ready", 0)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, open(tmp_path / "server.log").read()
        assert f"serving 'tiny' on 127.0.0.1:{port}" in open(tmp_path / "server.log").read()
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_main_server_is_still_healthy_at_the_end(srv):
    assert srv.health_stub.Check(health_pb2.HealthCheckRequest()).status == SERVING
    assert_still_serves(srv)
    assert srv.frontend.num_inflight == 0 and pages_in_use(srv.engine) == 0


def test_a_client_that_never_reads_is_ended_and_the_others_are_served(gguf, loop):
    """Item 2 (gRPC): a Generate client that reads one message and then nothing (n=16, 20 logprobs a token,
    4000 tokens each) has its call ended within --stream-write-timeout or at the stream's buffer bound: its
    request is aborted (pages back), counted slow_client, and another client is served meanwhile."""
    import dataclasses

    engine = fake_engine(gguf, max_model_len=4096)
    async_engine = AsyncEngine(engine)
    served = loop.run(_start(engine, async_engine, limits=dataclasses.replace(LIMITS, stream_write_timeout=2.0)))
    try:
        greedy = S(n=16, max_tokens=4000, logprobs=20, temperature=0.8, ignore_eos=True)
        stuck = served.stub.Generate(pb.GenerateRequest(text="hello there", sampling=greedy))
        first = next(stuck)  # then nothing more, for now
        assert not first.finished
        other = served.stub.Complete(long_request(12))
        assert len(other.outputs[0].token_ids) == 12
        end = time.monotonic() + 20
        while (engine.has_unfinished_requests() or pages_in_use(engine)) and time.monotonic() < end:
            time.sleep(0.02)
        assert not engine.has_unfinished_requests() and pages_in_use(engine) == 0
        assert engine.stats().generation_tokens < 16 * 4000 // 4  # aborted long before its end
        err = rpc_error(lambda: list(stuck))  # what it finds when it reads again: the call ended, and why
        assert err.code() == Code.RESOURCE_EXHAUSTED and "read" in err.details(), err.details()
        end = time.monotonic() + 5
        while outcome_count(served.frontend, "slow_client") != 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert outcome_count(served.frontend, "slow_client") == 1
    finally:
        served.channel.close()
        loop.run(served.server.stop(0))
        async_engine.shutdown()
