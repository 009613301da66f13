"""Multi-model serving (issue 17) over fake engines (tests.fake_engine, no model compiled): the registry's routing
(split, sticky keys, NAME@VERSION), the admin API over HTTP (/admin/...) and gRPC (jaxserve.v1.Admin) behind its key,
background loads, split / promote / rollback, drain-then-unload, automatic canary rollback on errors and on TTFT, and
the version every answer and metric names.

Each server test builds its own registry and serves it over HTTP and gRPC at once (one Frontend, on a loop thread);
the tests are plain blocking clients. A version's engine is an AsyncEngine over a FakeEngine whose every step takes
`step_seconds`: a slow canary, or a stream still running when the test unloads its version, is a property of the
engine, not timing luck."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import gc
import json
import threading
import time
import uuid
import weakref

import grpc
import pytest

from jaxserve.api.errors import APIError
from jaxserve.async_engine import AsyncEngine
from jaxserve.servers import http_server
from jaxserve.servers.frontend import Frontend
from jaxserve.servers.grpc_server import build_server
from jaxserve.servers.registry import (
    Health,
    HealthWindow,
    ModelRegistry,
    RollbackPolicy,
    parse_model_flag,
    rollback_reason,
    scan_repository,
    start_specs,
)
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc
from tests.serving import LoopThread, fake_engine, http_request, metric_value, tiny_gguf
from tests.test_grpc_server import err_field, rpc_error

ADMIN, USER = "admin-secret", "user-secret"
STEP = 0.002  # seconds an engine step takes on a healthy version
VERSION_HEADER = "x-jaxserve-model-version"
Code = grpc.StatusCode


# ---- engines, builder and servers -----------------------------------------------------------------------------


class TrackedEngine(AsyncEngine):
    """An AsyncEngine that calls `on_shutdown` when it is shut down (so a test can tell, keeping no reference)."""

    def __init__(self, engine, on_shutdown=None):
        super().__init__(engine)
        self.on_shutdown = on_shutdown

    def shutdown(self, timeout: float | None = 10.0) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        super().shutdown(timeout)


def _refuse(*args, **kwargs):
    raise RuntimeError("the canary's weights are broken")


def started(gguf, step_seconds: float = STEP, failing: bool = False, on_shutdown=None) -> TrackedEngine:
    """A started engine over a FakeEngine; failing: it fails every request (a server error: HTTP 500)."""
    engine = fake_engine(gguf, step_seconds=step_seconds)
    if failing:
        engine.add_request = _refuse
    return TrackedEngine(engine, on_shutdown)


class Builder:
    """The registry's builder (path -> a started engine) for paths a test plans: each engine's step time, whether
    its requests fail, whether the build waits for the test (`release`) or raises. It keeps no engine (the unload
    test checks that the engine is freed), only the paths whose engine was shut down (`stopped`)."""

    def __init__(self, gguf: str, directory):
        self.gguf, self.directory = gguf, directory
        self.plans: dict[str, dict] = {}
        self.building: dict[str, threading.Event] = {}  # set when a build of that path starts
        self.stopped: list[str] = []

    def plan(self, name: str, *, step_seconds=STEP, failing=False, gate=False, error=None) -> str:
        path = self.directory / f"{name}.gguf"
        path.write_bytes(b"")  # (a load checks that its path exists; the fake engine reads nothing)
        gate = threading.Event() if gate else None
        self.plans[str(path)] = dict(step_seconds=step_seconds, failing=failing, gate=gate, error=error)
        self.building[str(path)] = threading.Event()
        return str(path)

    def release(self, path: str) -> None:
        self.plans[path]["gate"].set()

    def __call__(self, path: str):
        plan = self.plans[path]
        self.building[path].set()
        if plan["gate"] is not None and not plan["gate"].wait(30):
            raise TimeoutError("the test never released the build")
        if plan["error"] is not None:
            raise plan["error"]
        return started(self.gguf, plan["step_seconds"], plan["failing"], lambda: self.stopped.append(path))


NO_ROLLBACK = RollbackPolicy(enabled=False)


def model_m(gguf, versions=("1",), *, split=None, builder=None, policy=NO_ROLLBACK, steps=None, failing=()):
    """A registry serving model "m" with `versions` ready (steps: {version: step seconds}; failing: versions whose
    requests all fail) and `split` (else the first version takes all the traffic). Automatic rollback is off unless
    the test is about it: the fake engines' millisecond TTFTs are mostly scheduling jitter, which the TTFT rule
    would read as a slow canary once a test has sent enough requests."""
    reg = ModelRegistry(builder, rollback=policy)
    for version in versions:
        reg.add_ready("m", version, started(gguf, (steps or {}).get(version, STEP), version in failing))
    if split is not None:
        reg.set_split("m", split)
    return reg


class Stack:
    """One Frontend over a registry, served over HTTP and gRPC on the test loop."""

    def __init__(self, loop: LoopThread, registry: ModelRegistry, **frontend_options):
        self.loop, self.registry = loop, registry
        self.frontend = Frontend(registry=registry, **frontend_options)
        self.runner, self.port = loop.run(http_server.start(self.frontend))
        self.grpc_server, grpc_port, _ = loop.run(build_server(self.frontend))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub, self.admin_stub = pb_grpc.JaxServeStub(self.channel), pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.grpc_server.stop(0))
        self.loop.run(self.runner.cleanup())
        self.loop.run(self.registry.close())

    def request(self, method, path, body=None, headers=None):
        return http_request(self.port, method, path, body, headers)

    def complete(self, model="m", headers=None, **fields):
        """POST /v1/completions: (status, body, the x-jaxserve-model-version header or None)."""
        body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0, **fields}
        status, got, response_headers = self.request("POST", "/v1/completions", body, headers)
        return status, got, response_headers.get(VERSION_HEADER)

    def admin(self, action: str, body=None, key=ADMIN):
        """POST /admin/<action> (GET /admin/models for "models"), with `key` as the bearer: (status, body)."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        method = "GET" if action == "models" else "POST"
        status, got, _ = self.request(method, f"/admin/{action}", body, headers)
        return status, got

    def grpc_admin(self, method: str, request, key=ADMIN) -> dict:
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        return json.loads(getattr(self.admin_stub, method)(request, metadata=metadata).json)

    def model(self, name="m") -> dict:
        status, got = self.admin("models")
        assert status == 200, got
        (model,) = [m for m in got["models"] if m["name"] == name]
        return model

    def version(self, version: str, name="m") -> dict:
        """The version's entry in GET /admin/models."""
        (v,) = [v for v in self.model(name)["versions"] if v["version"] == version]
        return v

    def events(self, version: str) -> list[dict]:
        return [e for e in self.admin("models")[1]["events"] if e["version"] == version]

    def wait_state(self, version: str, state: str, timeout: float = 10.0) -> dict:
        end = time.monotonic() + timeout
        while (v := self.version(version))["state"] != state and time.monotonic() < end:
            time.sleep(0.02)
        assert v["state"] == state, v
        return v

    def metric(self, spec: str) -> float:
        return metric_value(self.request("GET", "/metrics")[1].decode(), spec)


def grpc_request(model="m", max_tokens=2, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, text="hello", sampling=pb.SamplingParams(max_tokens=max_tokens), **kw)


def sse_events(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("lifecycle"))


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def serve(loop):
    """serve(registry, **Frontend options) -> a Stack; each is closed (its engines shut down) after the test."""
    stacks = []

    def make(registry, **options) -> Stack:
        stacks.append(Stack(loop, registry, **options))
        return stacks[-1]

    yield make
    for s in stacks:
        s.close()


@pytest.fixture
def builder(gguf, tmp_path):
    return Builder(gguf, tmp_path)


# ---- 1. routing -------------------------------------------------------------------------------------------------


def test_a_split_routes_by_percent_and_a_key_always_lands_on_one_version(gguf):
    reg = ModelRegistry()
    for version in ("1", "2"):
        reg.add_ready("m", version, fake_engine(gguf))  # (routing reads only the registry: no engine loop needed)
    reg.set_split("m", {"1": 70, "2": 30})
    keys = [uuid.uuid4().hex for _ in range(2000)]
    routed = {k: reg.route("m", k).version for k in keys}
    keyed = collections.Counter(routed.values())
    unkeyed = collections.Counter(reg.route("m").version for _ in range(2000))
    for share in (keyed, unkeyed):  # (binomial: one standard deviation is 1%)
        assert set(share) == {"1", "2"} and abs(share["1"] / 2000 - 0.70) < 0.04, share
    assert all(reg.route("m", k).version == v for k, v in routed.items())
    assert all(reg.route("m", k).version == v for k, v in reversed(routed.items()))
    assert reg.route(None, keys[0]) is reg.route("m", keys[0])  # no model: the first one
    reg.set_split("m", {"1": 100, "2": 0})
    assert {reg.route("m", k).version for k in keys} == {"1"}
    assert reg.route("m@2", keys[0]).version == "2"  # a pin ignores the split
    reg.add_available("m", "3", "/nowhere.gguf")
    for model, kind in (("nope", "not_found"), ("m@9", "not_found"), ("m@3", "unavailable"), ("nope@1", "not_found")):
        with pytest.raises(APIError) as info:
            reg.route(model)
        assert (info.value.kind.name, info.value.field) == (kind, "model"), model


def test_sticky_keys_pins_and_routing_errors_over_http_and_grpc(gguf, serve):
    reg = model_m(gguf, ("1", "2"), split={"1": 70, "2": 30})
    reg.add_available("m", "3", gguf)
    s = serve(reg, sticky_header="X-Session")
    users = [f"user-{i}" for i in range(100)]
    on = {v: [u for u in users if reg.route("m", u).version == v][:3] for v in ("1", "2")}
    for version, keys in on.items():
        assert len(keys) == 3
        for key in keys:
            for _ in range(2):
                status, got, header = s.complete(user=key)
                assert (status, header, got["model_version"]) == (200, version, version), got
                assert s.stub.Complete(grpc_request(user=key)).model_version == version
                metadata = (("x-session", key),)
                assert s.stub.Complete(grpc_request(), metadata=metadata).model_version == version
    a, b = on["1"][0], on["2"][0]
    # The sticky header, when the request has it, routes before the body's user.
    assert s.complete(user=a, headers={"X-Session": b})[2] == "2"
    assert s.complete(user=b, headers={"x-session": a})[2] == "1"
    assert s.stub.Complete(grpc_request(user=b), metadata=(("x-session", a),)).model_version == "1"
    # NAME@VERSION pins, whatever the key.
    for key in (a, b):
        for version in ("1", "2"):
            assert s.complete(model=f"m@{version}", user=key)[2] == version
            assert s.stub.Complete(grpc_request(f"m@{version}", user=key)).model_version == version
    for model, status, code in (
        ("nope", 404, Code.NOT_FOUND),
        ("m@9", 404, Code.NOT_FOUND),
        ("m@3", 503, Code.UNAVAILABLE),  # in the repository, not loaded
    ):
        got_status, got, header = s.complete(model=model)
        assert (got_status, got["error"]["param"], header) == (status, "model", None), got
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        got_status, got, _ = s.request("POST", "/v1/chat/completions", chat)
        assert (got_status, got["error"]["param"]) == (status, "model"), got
        for call in (
            lambda m=model: s.stub.Complete(grpc_request(m)),
            lambda m=model: list(s.stub.Generate(grpc_request(m))),
        ):
            err = rpc_error(call)
            assert (err.code(), err_field(err)) == (code, "model"), err
    assert s.complete(user=a)[0] == 200  # (the refusals cost nothing)


def test_several_models_the_first_is_the_default(gguf, serve):
    reg = model_m(gguf)
    reg.add_ready("other", "7", started(gguf))
    s = serve(reg)
    status, got, header = s.complete(model=None)
    assert (status, got["model"], header) == (200, "m", "1")
    status, got, header = s.complete(model="other")
    assert (status, got["model"], header) == (200, "other", "7")
    listed = s.request("GET", "/v1/models")[1]["data"]
    assert [(m["id"], [v["version"] for v in m["versions"]]) for m in listed] == [("m", ["1"]), ("other", ["7"])]
    assert [(m.id, m.versions[0].version) for m in s.stub.ListModels(pb.ListModelsRequest()).models] == [
        ("m", "1"),
        ("other", "7"),
    ]


# ---- 2. the admin key -------------------------------------------------------------------------------------------


def test_the_admin_api_is_off_without_an_admin_key(gguf, serve):
    s = serve(model_m(gguf), api_keys=(USER,))
    errors = s.metric('jaxserve_requests_total{outcome="error"}')
    for key in (None, USER, ADMIN):
        status, got = s.admin("models", key=key)
        assert (status, got["error"]["type"]) == (403, "permission_error"), got
        assert s.admin("promote", {"model": "m", "version": "1"}, key=key)[0] == 403
        for method, request in (
            ("ListVersions", pb.ListVersionsRequest()),
            ("Rollback", pb.RollbackRequest(model="m")),
        ):
            err = rpc_error(lambda: s.grpc_admin(method, request, key=key))
            assert err.code() == Code.PERMISSION_DENIED, err
    assert s.complete(headers={"Authorization": f"Bearer {USER}"})[0] == 200
    # (refused admin calls are not model requests that failed)
    assert s.metric('jaxserve_requests_total{outcome="error"}') == errors


def test_only_the_admin_key_opens_the_admin_api_and_it_is_no_user_key(gguf, serve):
    s = serve(model_m(gguf), api_keys=(USER,), admin_keys=(ADMIN,))
    refused = s.metric('jaxserve_requests_total{outcome="unauthenticated"}')
    for key in (None, USER, "wrong"):
        for action, body in (("models", None), ("split", {"model": "m", "split": {"1": 100}})):
            status, got = s.admin(action, body, key=key)
            assert (status, got["error"]["param"]) == (401, "authorization"), (key, got)
            assert USER not in json.dumps(got) and ADMIN not in json.dumps(got)
        err = rpc_error(lambda: s.grpc_admin("ListVersions", pb.ListVersionsRequest(), key=key))
        assert (err.code(), err_field(err)) == (Code.UNAUTHENTICATED, "authorization")
    assert s.admin("models")[0] == 200
    assert [m["name"] for m in s.grpc_admin("ListVersions", pb.ListVersionsRequest())["models"]] == ["m"]
    # The admin key is not a user's API key: model requests with it are refused like any wrong key.
    status, got, _ = s.complete(headers={"Authorization": f"Bearer {ADMIN}"})
    assert (status, got["error"]["param"]) == (401, "authorization")
    err = rpc_error(lambda: s.stub.Complete(grpc_request(), metadata=(("authorization", f"Bearer {ADMIN}"),)))
    assert err.code() == Code.UNAUTHENTICATED
    assert s.complete(headers={"Authorization": f"Bearer {USER}"})[0] == 200
    # Counted: the two refused model requests, not the refused admin calls.
    assert s.metric('jaxserve_requests_total{outcome="unauthenticated"}') == refused + 2


def test_an_open_server_still_guards_its_admin_api(gguf, serve):
    """Without API keys every model request is served, whatever it brings (the admin key too); the admin API
    still needs the admin key."""
    s = serve(model_m(gguf), admin_keys=(ADMIN,))
    for headers in ({}, {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": "Bearer whatever"}):
        assert s.complete(headers=headers)[0] == 200
    assert s.admin("models", key=None)[0] == 401
    assert s.admin("models", key="whatever")[0] == 401
    assert s.admin("models")[0] == 200


def test_frontend_options_are_checked(gguf):
    reg = model_m(gguf)
    try:
        with pytest.raises(ValueError, match="admin_keys"):
            Frontend(registry=reg, api_keys=("same",), admin_keys=("same",))
        with pytest.raises(ValueError, match="admin_keys"):
            Frontend(registry=reg, admin_keys=("",))
        with pytest.raises(ValueError, match="sticky_header"):
            Frontend(registry=reg, sticky_header="x session")
        with pytest.raises(ValueError, match="registry"):
            Frontend(registry=ModelRegistry())
    finally:
        for v in reg.ready_versions():
            v.engine.shutdown()


# ---- 3. loads ---------------------------------------------------------------------------------------------------


def test_a_background_load_takes_traffic_only_once_ready(gguf, serve, builder):
    path = builder.plan("v2", gate=True)
    s = serve(model_m(gguf, builder=builder), admin_keys=(ADMIN,))
    status, got = s.admin("load", {"model": "m", "version": "2", "path": path})
    assert (status, got) == (200, {"model": "m", "version": "2", "state": "loading", "path": path})
    assert builder.building[path].wait(10)  # the build runs on a worker thread, and waits for the test
    loading_since = time.monotonic()
    assert s.version("2")["state"] == "loading"
    # Meanwhile the traffic stays on the serving version, and version 2 answers nothing.
    assert {s.complete(user=f"u{i}")[2] for i in range(10)} == {"1"}
    status, got, _ = s.complete(model="m@2")
    assert (status, got["error"]["param"]) == (503, "model") and "loading" in got["error"]["message"]
    status, got = s.admin("split", {"model": "m", "split": {"1": 50, "2": 50}})
    assert (status, got["error"]["param"]) == (409, "split")
    status, got = s.admin("load", {"model": "m", "version": "2", "path": path})
    assert (status, got["error"]["param"]) == (409, "version")
    status, got = s.admin("unload", {"model": "m", "version": "2"})
    assert (status, got["error"]["param"]) == (409, "version")
    time.sleep(0.2)
    held_for = time.monotonic() - loading_since
    builder.release(path)
    v = s.wait_state("2", "ready")
    assert v["report"]["load_seconds"] >= held_for >= 0.2  # the load took as long as its build
    assert v["traffic_percent"] == 0 and s.model()["split"] == {"1": 100}  # ready is not serving: a split does that
    assert {s.complete(user=f"u{i}")[2] for i in range(10)} == {"1"}
    assert s.complete(model="m@2")[2] == "2"
    assert [e["event"] for e in s.events("2")] == ["loading", "ready"]
    assert s.admin("split", {"model": "m", "split": {"1": 50, "2": 50}})[0] == 200
    assert {s.complete(user=f"u{i}")[2] for i in range(20)} == {"1", "2"}


def test_a_failed_load_leaves_the_serving_version_untouched(gguf, serve, builder):
    broken = builder.plan("broken", error=RuntimeError("no tensor named 'output.weight'"))
    s = serve(model_m(gguf, builder=builder), admin_keys=(ADMIN,))
    assert s.admin("load", {"model": "m", "version": "2", "path": broken})[1]["state"] == "loading"
    v = s.wait_state("2", "failed")
    assert "RuntimeError" in v["error"] and "output.weight" in v["error"] and v["traffic_percent"] == 0
    assert [(e["event"], "output.weight" in e["message"]) for e in s.events("2")] == [
        ("loading", False),
        ("failed", True),
    ]
    assert s.model()["split"] == {"1": 100}
    assert s.complete()[::2] == (200, "1")
    assert s.stub.Complete(grpc_request()).model_version == "1"
    status, got, _ = s.complete(model="m@2")
    assert (status, got["error"]["param"]) == (503, "model")
    assert s.admin("promote", {"model": "m", "version": "2"})[1]["error"]["param"] == "split"
    # A failed version may be loaded again (from a good path).
    fixed = builder.plan("fixed")
    assert s.admin("load", {"model": "m", "version": "2", "path": fixed})[0] == 200
    assert "error" not in s.wait_state("2", "ready")
    assert s.complete(model="m@2")[2] == "2"


def test_load_checks_its_fields(gguf, serve, builder, tmp_path):
    path = builder.plan("v2")
    s = serve(model_m(gguf, builder=builder), admin_keys=(ADMIN,))
    for body, status, param in (
        ({"version": "2", "path": path}, 400, "model"),
        ({"model": "m", "path": path}, 400, "version"),
        ({"model": "m", "version": "2"}, 400, "path"),  # not in the repository: the path is needed
        ({"model": "m", "version": "2", "path": str(tmp_path / "missing.gguf")}, 400, "path"),
        ({"model": "m", "version": "2", "path": 7}, 400, "path"),
        ({"model": "m", "version": "two words", "path": path}, 400, "version"),
        ({"model": "m@2", "version": "2", "path": path}, 400, "model"),
        ({"model": "m", "version": "1", "path": path}, 409, "version"),  # ready already
    ):
        got_status, got = s.admin("load", body)
        assert (got_status, got["error"]["param"]) == (status, param), (body, got)
    err = rpc_error(lambda: s.grpc_admin("LoadVersion", pb.LoadVersionRequest(model="m", version="2")))
    assert (err.code(), err_field(err)) == (Code.INVALID_ARGUMENT, "path")
    assert [v["version"] for v in s.model()["versions"]] == ["1"]
    loaded = s.grpc_admin("LoadVersion", pb.LoadVersionRequest(model="m", version="2", path=path))
    assert loaded["state"] == "loading"
    s.wait_state("2", "ready")


def test_a_server_without_a_builder_cannot_load(gguf, serve):
    s = serve(model_m(gguf), admin_keys=(ADMIN,))
    status, got = s.admin("load", {"model": "m", "version": "2", "path": gguf})
    assert status == 409 and "builder" in got["error"]["message"]


# ---- 4. split, promote, rollback --------------------------------------------------------------------------------


def test_a_split_is_checked_before_it_takes_effect(gguf, serve):
    reg = model_m(gguf, ("1", "2"))
    reg.add_available("m", "3", gguf)
    s = serve(reg, admin_keys=(ADMIN,))
    for split, status in (
        ({"1": 60, "2": 30}, 400),
        ({"1": 60, "2": 50}, 400),
        ({"1": 110, "2": -10}, 400),
        ({"1": 50.5, "2": 49.5}, 400),
        ({"1": True, "2": 99}, 400),
        ({"1": "50", "2": 50}, 400),
        ({}, 400),
        ([100], 400),
        (None, 400),
        ({"1": 50, "9": 50}, 404),  # no such version
        ({"1": 50, "3": 50}, 409),  # in the repository, not loaded
    ):
        got_status, got = s.admin("split", {"model": "m", "split": split})
        assert (got_status, got["error"]["param"]) == (status, "split"), (split, got)
    for split, code in (({"1": 110, "2": -10}, Code.INVALID_ARGUMENT), ({"1": 50, "9": 50}, Code.NOT_FOUND)):
        err = rpc_error(lambda: s.grpc_admin("SetSplit", pb.SetSplitRequest(model="m", split=split)))
        assert (err.code(), err_field(err)) == (code, "split")
    status, got = s.admin("split", {"model": "nope", "split": {"1": 100}})
    assert (status, got["error"]["param"]) == (404, "model")
    assert s.model()["split"] == {"1": 100}  # nothing refused changed anything
    assert s.admin("split", {"model": "m", "split": {"1": 0, "2": 100, "3": 0}}) == (
        200,
        {"model": "m", "split": {"1": 0, "2": 100, "3": 0}},
    )
    assert {s.complete(user=f"u{i}")[2] for i in range(10)} == {"2"}
    assert s.grpc_admin("SetSplit", pb.SetSplitRequest(model="m", split={"1": 40, "2": 60}))["split"] == {
        "1": 40,
        "2": 60,
    }


def test_promote_moves_all_traffic_and_rollback_restores_the_split(gguf, serve):
    reg = model_m(gguf, ("1", "2"), split={"1": 70, "2": 30})
    s = serve(reg, admin_keys=(ADMIN,))
    users = [f"user-{i}" for i in range(30)]
    before = {u: s.complete(user=u)[2] for u in users}
    assert set(before.values()) == {"1", "2"}
    assert s.admin("promote", {"model": "m", "version": "2"}) == (200, {"model": "m", "split": {"2": 100}})
    assert {s.complete(user=u)[2] for u in users} == {"2"}
    assert s.model()["previous_split"] == {"1": 70, "2": 30}
    assert s.admin("rollback", {"model": "m"}) == (200, {"model": "m", "split": {"1": 70, "2": 30}})
    assert {u: s.complete(user=u)[2] for u in users} == before  # every key lands where it did
    assert s.grpc_admin("Rollback", pb.RollbackRequest(model="m"))["split"] == {"2": 100}  # (a rollback's rollback)
    assert s.grpc_admin("Promote", pb.PromoteRequest(model="m", version="1"))["split"] == {"1": 100}
    status, got = s.admin("promote", {"model": "m", "version": "9"})
    assert (status, got["error"]["param"]) == (404, "model")
    status, got = s.admin("promote", {"model": "m"})
    assert (status, got["error"]["param"]) == (400, "version")


def test_rollback_without_an_earlier_split_is_refused(gguf, serve):
    s = serve(model_m(gguf), admin_keys=(ADMIN,))
    status, got = s.admin("rollback", {"model": "m"})
    assert (status, got["error"]["param"]) == (409, "model")
    err = rpc_error(lambda: s.grpc_admin("Rollback", pb.RollbackRequest(model="m")))
    assert err.code() == Code.FAILED_PRECONDITION


def test_rollback_skips_splits_of_versions_since_unloaded(gguf, serve):
    reg = model_m(gguf, ("1", "2", "3"), split={"1": 50, "2": 50})
    s = serve(reg, admin_keys=(ADMIN,))
    assert s.admin("split", {"model": "m", "split": {"1": 50, "3": 50}})[0] == 200
    assert s.admin("promote", {"model": "m", "version": "1"})[0] == 200
    assert s.admin("unload", {"model": "m", "version": "3"})[0] == 200
    # The split before holds version 3, unloaded: the rollback goes past it to the one before, which serves.
    assert s.admin("rollback", {"model": "m"}) == (200, {"model": "m", "split": {"1": 50, "2": 50}})
    assert {s.complete(user=f"u{i}")[2] for i in range(20)} == {"1", "2"}


# ---- 5. unload --------------------------------------------------------------------------------------------------


def test_unload_drains_then_stops_and_frees_the_engine(gguf, serve, builder):
    path = builder.plan("v2", step_seconds=0.05)  # a 16-token stream takes 0.8 s on it
    reg = model_m(gguf, builder=builder)
    s = serve(reg, admin_keys=(ADMIN,))
    assert s.admin("load", {"model": "m", "version": "2", "path": path})[0] == 200
    s.wait_state("2", "ready")
    assert s.admin("split", {"model": "m", "split": {"1": 50, "2": 50}})[0] == 200
    status, got = s.admin("unload", {"model": "m", "version": "2"})
    assert (status, got["error"]["param"]) == (409, "version") and "50%" in got["error"]["message"]
    err = rpc_error(lambda: s.grpc_admin("UnloadVersion", pb.UnloadVersionRequest(model="m", version="2")))
    assert (err.code(), err_field(err)) == (Code.FAILED_PRECONDITION, "version")
    assert s.version("2")["state"] == "ready"
    engine = weakref.ref(reg.models["m"].versions["2"].engine)
    stream = {"model": "m@2", "prompt": "hello", "max_tokens": 16, "stream": True, "ignore_eos": True}
    stream["stream_options"] = {"include_usage": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(s.request, "POST", "/v1/completions", stream)
        wait_until(lambda: engine().engine.has_unfinished_requests())  # the stream runs on version 2
        assert s.admin("split", {"model": "m", "split": {"1": 100, "2": 0}})[0] == 200
        unloading = pool.submit(s.admin, "unload", {"model": "m", "version": "2", "timeout": 30})
        wait_until(lambda: s.version("2")["state"] == "draining")
        assert not streaming.done() and s.version("2")["inflight"] == 1  # one request, counted once
        status, got, _ = s.complete(model="m@2")  # draining: no new request
        assert (status, got["error"]["param"]) == (503, "model")
        assert s.admin("split", {"model": "m", "split": {"1": 50, "2": 50}})[1]["error"]["param"] == "split"
        status, answer = unloading.result(30)
        assert streaming.done()  # the unload waited for it
        status_stream, raw, headers = streaming.result()
    assert status == 200 and answer["state"] == "available", answer
    report = answer["report"]
    assert report["drained_requests_left"] == 0 and report["kv_pages_in_use_at_stop"] == 0, report
    events = sse_events(raw)
    assert status_stream == 200 and headers[VERSION_HEADER] == "2"
    assert all("error" not in e for e in events) and b"data: [DONE]" in raw
    assert events[-1]["usage"]["completion_tokens"] == 16
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"
    assert builder.stopped == [path]  # shut down, once
    gc.collect()
    assert engine() is None  # its weights and pages went with it
    v = s.version("2")
    assert v["state"] == "available" and "memory" not in v and v["report"]["unload"] == report
    assert "2" not in s.model()["split"]
    assert [e["event"] for e in s.events("2")][-2:] == ["draining", "unloaded"]
    # Unloaded, it is in the repository again: a load needs no path now.
    assert s.admin("load", {"model": "m", "version": "2"})[0] == 200
    s.wait_state("2", "ready")
    assert s.complete(model="m@2", max_tokens=1)[2] == "2"


def test_a_request_past_the_drain_timeout_leaves_the_count_honest(gguf, loop, builder):
    """An unload whose drain times out stops the engine under a request that still holds the version; when that
    request ends the version's in-flight count is 0 again, so the next drain of it does not wait for nobody."""
    path = builder.plan("v2")
    reg = model_m(gguf, ("1",), builder=builder)
    frontend = Frontend(registry=reg)

    async def story():
        reg.load("m", "2", path)
        while reg.models["m"].versions["2"].state != "ready":
            await asyncio.sleep(0.01)
        served = frontend.acquire("m@2")  # a request holds version 2 (as the HTTP and gRPC handlers do)
        first = await reg.unload("m", "2", timeout=0)
        frontend.release(served)  # ... and ends after the engine stopped
        held = served.inflight
        reg.load("m", "2")
        while reg.models["m"].versions["2"].state != "ready":
            await asyncio.sleep(0.01)
        start = time.monotonic()
        second = await reg.unload("m", "2", timeout=2)
        return first, held, second, time.monotonic() - start

    try:
        first, held, second, took = loop.run(story())
    finally:
        loop.run(reg.close())
    assert first["drained_requests_left"] == 1
    assert held == 0
    assert second["drained_requests_left"] == 0 and took < 1.0
    assert builder.stopped == [path, path]


# ---- 6. automatic rollback --------------------------------------------------------------------------------------

POLICY = RollbackPolicy(window_seconds=30.0, min_requests=4, error_margin=0.05, ttft_margin=1.0, ttft_floor_seconds=0.1)


def drive(s: Stack, n: int) -> list[tuple[int, str | None]]:
    """n requests one after another, each from its own user (the same users every time): (status, version)."""
    return [s.complete(user=f"client-{i}", max_tokens=1)[::2] for i in range(n)]


def test_a_canary_that_fails_its_requests_is_rolled_back(gguf, serve):
    reg = model_m(gguf, ("1", "2"), split={"1": 70, "2": 30}, policy=POLICY, failing=("2",))
    s = serve(reg, admin_keys=(ADMIN,))
    answers = drive(s, 40)
    failed = [i for i, (status, _) in enumerate(answers) if status != 200]
    # The canary failed min_requests requests, and no more: the last of them rolled it back.
    assert len(failed) == POLICY.min_requests and {answers[i][0] for i in failed} == {500}, answers
    assert all(a == (200, "1") for a in answers[failed[-1] + 1 :]), answers
    model = s.model()
    assert model["split"] == {"1": 100, "2": 0} and model["stable"] == "1"
    canary = s.version("2")
    assert canary["state"] == "ready" and canary["traffic_percent"] == 0
    assert canary["health"]["errors"] == POLICY.min_requests and canary["health"]["error_rate"] == 1.0
    (event,) = [e for e in s.events("2") if e["event"] == "rolled_back"]
    assert "error rate 100.0%" in event["message"] and "'1'" in event["message"], event
    assert s.metric('jaxserve_rollbacks_total{model="m",version="2"}') == 1
    assert s.metric('jaxserve_rollbacks_total{model="m",version="1"}') == 0
    assert s.metric('jaxserve_model_traffic_percent{model="m",version="2"}') == 0
    assert s.metric('jaxserve_model_traffic_percent{model="m",version="1"}') == 100
    assert s.metric('jaxserve_requests_total{model="m",version="2",outcome="error"}') == POLICY.min_requests
    # An admin rollback undoes the automatic one (the canary is still loaded).
    assert s.admin("rollback", {"model": "m"})[1]["split"] == {"1": 70, "2": 30}


def test_a_slow_canary_is_rolled_back_on_ttft(gguf, serve):
    reg = model_m(gguf, ("1", "2"), split={"1": 70, "2": 30}, policy=POLICY, steps={"1": 0.04, "2": 0.3})
    s = serve(reg, admin_keys=(ADMIN,))
    answers = drive(s, 30)
    assert all(status == 200 for status, _ in answers)
    on_canary = [i for i, (_, version) in enumerate(answers) if version == "2"]
    assert len(on_canary) >= POLICY.min_requests, answers
    assert all(version == "1" for _, version in answers[on_canary[-1] + 1 :])
    assert s.model()["split"] == {"1": 100, "2": 0}
    (event,) = [e for e in s.events("2") if e["event"] == "rolled_back"]
    assert "TTFT p99" in event["message"], event
    health = s.version("2")["health"]
    assert health["errors"] == 0 and health["ttft_p99"] >= 0.3
    assert s.metric('jaxserve_rollbacks_total{model="m",version="2"}') == 1


def test_a_healthy_canary_is_never_rolled_back(gguf, serve):
    reg = model_m(gguf, ("1", "2"), split={"1": 70, "2": 30}, policy=POLICY, steps={"1": 0.04, "2": 0.04})
    s = serve(reg, admin_keys=(ADMIN,))
    answers = drive(s, 30)
    assert all(status == 200 for status, _ in answers)
    assert sum(version == "2" for _, version in answers) >= POLICY.min_requests  # the rule had its evidence
    assert s.model()["split"] == {"1": 70, "2": 30}
    assert not [e for e in s.events("2") if e["event"] == "rolled_back"]
    assert s.metric('jaxserve_rollbacks_total{model="m",version="2"}') == 0
    health = s.version("2")["health"]
    assert health["requests"] >= POLICY.min_requests and health["errors"] == 0


def test_the_rollback_rule(gguf):
    policy = RollbackPolicy(window_seconds=10, min_requests=4, error_margin=0.1, ttft_margin=0.5, ttft_floor_seconds=0)
    stable = Health(requests=10, errors=1, ttft_p99=0.1)
    assert rollback_reason(Health(3, 3, None), stable, policy) is None  # too few requests to judge
    assert rollback_reason(Health(10, 2, 0.1), stable, policy) is None  # 20% <= 10% + 10%
    assert "error rate" in rollback_reason(Health(10, 3, 0.1), stable, policy)
    assert rollback_reason(Health(10, 0, 0.15), stable, policy) is None  # <= 0.1 * 1.5
    assert "TTFT" in rollback_reason(Health(10, 0, 0.16), stable, policy)
    assert rollback_reason(Health(10, 0, 1.0), Health(3, 0, 0.1), policy) is None  # the stable's figure is too thin
    floored = dataclasses.replace(policy, ttft_floor_seconds=0.25)  # 2x slower but by 10 ms: jitter, not a fault
    assert rollback_reason(Health(10, 0, 0.02), Health(10, 0, 0.01), floored) is None
    assert "TTFT" in rollback_reason(Health(10, 0, 0.4), Health(10, 0, 0.1), floored)
    window = HealthWindow(10.0)
    for t in range(5):
        window.record(t == 0, 0.01 * t, now=100.0 + t)
    assert window.summary(now=104.0) == Health(5, 1, 0.04)
    assert window.summary(now=111.5) == Health(3, 0, 0.04)  # what ended more than 10 s ago is forgotten
    assert window.summary(now=200.0) == Health(0, 0, None) and Health(0, 0, None).error_rate == 0.0
    bad_ones = (dict(window_seconds=0), dict(min_requests=0), dict(error_margin=-0.1), dict(ttft_margin=-1))
    for bad in (*bad_ones, dict(ttft_floor_seconds=-1)):
        with pytest.raises(ValueError, match="rollback"):
            RollbackPolicy(**bad)


# ---- 7. answers and metrics name the version --------------------------------------------------------------------


def test_answers_and_metrics_name_the_version(gguf, serve):
    reg = model_m(gguf, ("1", "2"), split={"1": 70, "2": 30})
    s = serve(reg, admin_keys=(ADMIN,))
    for version in ("1", "2"):
        status, got, header = s.complete(model=f"m@{version}")
        assert (status, got["model"], got["model_version"], header) == (200, "m", version, version)
        chat = {"model": f"m@{version}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, got, headers = s.request("POST", "/v1/chat/completions", chat)
        assert (status, got["model_version"], headers[VERSION_HEADER]) == (200, version, version)
        status, raw, headers = s.request("POST", "/v1/chat/completions", {**chat, "stream": True})
        chunks = sse_events(raw)
        assert headers[VERSION_HEADER] == version and chunks and all(c["model_version"] == version for c in chunks)
        assert s.stub.Complete(grpc_request(f"m@{version}")).model_version == version
        messages = list(s.stub.Generate(grpc_request(f"m@{version}", max_tokens=4)))
        assert messages and {m.model_version for m in messages} == {version}
    # One more completion on each side of the split, counted under the version that answered.
    users = {v: next(u for u in (f"u{i}" for i in range(100)) if reg.route("m", u).version == v) for v in "12"}
    before = {v: s.metric(f'jaxserve_requests_total{{model="m",version="{v}",outcome="length"}}') for v in "12"}
    assert s.complete(user=users["2"])[2] == "2"
    after = {v: s.metric(f'jaxserve_requests_total{{model="m",version="{v}",outcome="length"}}') for v in "12"}
    assert (after["1"] - before["1"], after["2"] - before["2"]) == (0, 1)
    assert s.complete(user=users["1"])[2] == "1"
    assert s.metric('jaxserve_requests_total{model="m",version="1",outcome="length"}') == after["1"] + 1
    assert s.metric('jaxserve_time_to_first_token_seconds_count{model="m",version="2"}') == after["2"]
    for version, percent in (("1", 70), ("2", 30)):
        assert s.metric(f'jaxserve_model_traffic_percent{{model="m",version="{version}"}}') == percent
        assert s.metric(f'jaxserve_model_version_state{{model="m",version="{version}",state="ready"}}') == 1
        assert s.metric(f'jaxserve_num_requests_running{{model="m",version="{version}"}}') == 0


# ---- flags and the model repository -----------------------------------------------------------------------------


def test_parse_model_flag():
    assert parse_model_flag("models/a.gguf") == (None, "models/a.gguf", None)
    assert parse_model_flag("chat=/models/a.gguf") == ("chat", "/models/a.gguf", None)
    assert parse_model_flag("chat=/models/a.gguf@2") == ("chat", "/models/a.gguf", "2")
    assert parse_model_flag("/models/a.gguf@v2.1") == (None, "/models/a.gguf", "v2.1")
    assert parse_model_flag("/data/x@y/a.gguf") == (None, "/data/x@y/a.gguf", None)  # the path's own '@'
    assert parse_model_flag("/data/k=v/a.gguf") == (None, "/data/k=v/a.gguf", None)  # the path's own '='
    for bad, field in (("two words=/a.gguf", "--model NAME"), ("m=/a.gguf@bad version", "--model @VERSION")):
        with pytest.raises(ValueError, match=field):  # (a ValueError: the command line prints it, no traceback)
            parse_model_flag(bad)


def test_scan_repository_and_start_specs(tmp_path):
    root = tmp_path / "repo"
    for name, version, file in (
        ("chat", "1", "model.gguf"),
        ("chat", "10", "model.gguf"),
        ("chat", "2", "config.json"),
        ("embed", "a", "jaxserve.json"),
        ("chat", ".partial", "model.gguf"),
        (".cache", "1", "model.gguf"),
    ):
        (root / name / version).mkdir(parents=True, exist_ok=True)
        (root / name / version / file).write_text("")
    found = scan_repository(str(root))
    assert found == {
        "chat": {
            "1": str(root / "chat/1/model.gguf"),
            "2": str(root / "chat/2"),
            "10": str(root / "chat/10/model.gguf"),
        },
        "embed": {"a": str(root / "embed/a")},
    }
    specs = start_specs(["first=/m/a.gguf", "first=/m/b.gguf", "/m/c.gguf@7"], str(root), None)
    assert [(s.name, s.version, s.path, s.load) for s in specs] == [
        ("first", "1", "/m/a.gguf", True),
        ("first", "2", "/m/b.gguf", True),
        ("c", "7", "/m/c.gguf", True),
        ("chat", "1", found["chat"]["1"], False),
        ("chat", "2", found["chat"]["2"], False),
        ("chat", "10", found["chat"]["10"], True),  # the newest is loaded, the rest are available
        ("embed", "a", found["embed"]["a"], True),
    ]
    assert [s.name for s in start_specs(["/m/a.gguf", "/m/b.gguf"], None, "served")] == ["served", "b"]
    with pytest.raises(ValueError, match="twice"):
        start_specs(["x=/m/a.gguf@1", "x=/m/b.gguf@1"], None, None)
    (root / "chat" / "3").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        scan_repository(str(root))
    with pytest.raises(ValueError, match="not a directory"):
        scan_repository(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DIR/NAME/VERSION"):
        scan_repository(str(tmp_path / "empty"))
    (tmp_path / "odd" / "bad name" / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match="--model-repository"):
        scan_repository(str(tmp_path / "odd"))
