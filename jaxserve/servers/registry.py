"""The models and versions one server serves, and which version answers a request (issue 17).

    name -> versions, each its own engine (own KV pages, own loop; the persistent compile cache shares the
            compiled buckets of versions with the same shapes)          split: {version: percent}, sums to 100
    route("name", key)        a ready version by the split; the same key always lands on the same version
                              while the split stands (sha256 of name and key -> a point in [0, 100))
    route("name@version")     that version, whatever the split (A/B tests, debugging)

Version states: available (in the repository, not loaded), loading (load, compile or cache read, warm-up: no
traffic yet), ready, draining (no new requests; in-flight ones finish on it), failed (the load or its engine
died; the reason is kept). A failed load leaves what was serving untouched.

Automatic rollback: every ended request is recorded against its version (ok or error, and its TTFT) in a
sliding window. A canary (a version with traffic that is not the split's largest) whose error rate exceeds
the stable version's by `error_margin`, or whose TTFT p99 exceeds the stable's by `ttft_margin` (a fraction),
over at least `min_requests` requests in the window, is set to 0% (its share goes to the stable version); the
reason goes to the log, the admin API's events and the `jaxserve_rollbacks` counter.

Everything here runs on the server's event loop (loads build their engine on a worker thread).
"""

from __future__ import annotations

import asyncio
import ctypes
import collections
import dataclasses
import gc
import hashlib
import logging
import os
import random
import re
import time
import weakref
from collections.abc import Callable
from typing import Any

from jaxserve.api.errors import CONFLICT, NOT_FOUND, UNAVAILABLE, VALIDATION, APIError, ValidationError

log = logging.getLogger("jaxserve.models")

STATES = ("available", "loading", "ready", "draining", "failed")
DEFAULT_VERSION = "1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")  # model names and versions (no '@', no spaces)
MAX_VERSIONS = 64  # per name: every admin-supplied size is bounded
MAX_HISTORY = 32  # earlier splits kept for rollback
MAX_EVENTS = 256
# What counts against a version's health: the server failed the request. A client's bad input, cancel or slow
# read says nothing about the version.
_FAILED = frozenset({"error", "deadline", "unavailable"})
_SUCCEEDED = frozenset({"stop", "length", "abort"})


def default_model_name(path: str) -> str:
    """The name clients use by default: the model file's stem ('SmolLM2-135M-Instruct.Q4_1') or directory."""
    base = os.path.basename(os.path.normpath(path))
    return base[: -len(".gguf")] if base.endswith(".gguf") else base


def check_name(value, field: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):  # (a ValueError too: the command line's flags)
        raise ValidationError(field, f"must be 1-128 characters of letters, digits and . _ : / - (got {value!r:.80})")
    return value


def parse_model_flag(value: str) -> tuple[str | None, str, str | None]:
    """`--model` values: 'PATH', 'NAME=PATH' or 'NAME=PATH@VERSION' -> (name or None, path, version or None).
    A path's own '@' survives when what follows it holds a '/' (then it is part of the path)."""
    name, sep, rest = value.partition("=")
    if not sep or "/" in name or not name:
        name, rest = None, value
    path, at, version = rest.rpartition("@")
    if not at or "/" in version or not path:
        path, version = rest, None
    if name is not None:
        check_name(name, "--model NAME")
    if version is not None:
        check_name(version, "--model @VERSION")
    return name, path, version


def _version_key(version: str):
    """Newest last: numbers by value ('10' after '9'), then the rest by name."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def scan_repository(root: str) -> dict[str, dict[str, str]]:
    """`DIR/NAME/VERSION/` -> {name: {version: model path}}: the version directory's single .gguf file, or the
    directory itself (an HF directory with config.json, or an orbax checkpoint with jaxserve.json)."""
    if not os.path.isdir(root):
        raise ValueError(f"--model-repository: {root!r} is not a directory")
    found: dict[str, dict[str, str]] = {}
    for name in sorted(os.listdir(root)):
        ndir = os.path.join(root, name)
        if not os.path.isdir(ndir) or name.startswith("."):
            continue
        check_name(name, f"--model-repository {name!r}")
        versions = {}
        for version in sorted(os.listdir(ndir), key=_version_key):
            vdir = os.path.join(ndir, version)
            if not os.path.isdir(vdir) or version.startswith("."):
                continue
            check_name(version, f"--model-repository {name}/{version!r}")
            ggufs = [f for f in os.listdir(vdir) if f.endswith(".gguf")]
            if len(ggufs) == 1:
                versions[version] = os.path.join(vdir, ggufs[0])
            elif any(os.path.exists(os.path.join(vdir, f)) for f in ("config.json", "jaxserve.json")):
                versions[version] = vdir
            else:
                raise ValueError(
                    f"--model-repository: {vdir!r} holds no model (one .gguf file, an HF directory with config.json "
                    f"or an orbax checkpoint with jaxserve.json); found {len(ggufs)} .gguf files"
                )
        if versions:
            found[name] = versions
    if not found:
        raise ValueError(f"--model-repository: no DIR/NAME/VERSION/ model under {root!r}")
    return found


# ---- health windows and the rollback rule ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RollbackPolicy:
    window_seconds: float = 60.0
    min_requests: int = 20  # in the window, for the canary (and the stable version, for the TTFT rule)
    error_margin: float = 0.05  # canary error rate > stable's + this -> rolled back
    ttft_margin: float = 0.5  # canary TTFT p99 > stable's * (1 + this) -> rolled back
    ttft_floor_seconds: float = 0.25  # ... and by at least this much (a few ms of jitter is not a slow canary)
    enabled: bool = True

    def __post_init__(self) -> None:
        if (
            not self.window_seconds > 0
            or self.min_requests < 1
            or self.error_margin < 0
            or self.ttft_margin < 0
            or self.ttft_floor_seconds < 0
        ):
            raise ValueError(
                "rollback: window_seconds > 0, min_requests >= 1, error_margin, ttft_margin and ttft_floor_seconds "
                f">= 0, got {self.window_seconds}, {self.min_requests}, {self.error_margin}, {self.ttft_margin}, "
                f"{self.ttft_floor_seconds}"
            )


@dataclasses.dataclass(frozen=True)
class Health:
    requests: int
    errors: int
    ttft_p99: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "ttft_p99": self.ttft_p99,
        }


class HealthWindow:
    """(time, failed, ttft) of the requests a version ended in the last `window` seconds (at most `limit`)."""

    def __init__(self, window: float, limit: int = 100_000):
        self.window = window
        self._events: collections.deque = collections.deque(maxlen=limit)

    def record(self, failed: bool, ttft: float | None, now: float | None = None) -> None:
        self._events.append((time.monotonic() if now is None else now, failed, ttft))

    def summary(self, now: float | None = None) -> Health:
        now = time.monotonic() if now is None else now
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()
        ttfts = sorted(t for _, failed, t in self._events if not failed and t is not None)
        p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None
        return Health(len(self._events), sum(1 for _, failed, _ in self._events if failed), p99)


def rollback_reason(canary: Health, stable: Health, policy: RollbackPolicy) -> str | None:
    """Why a canary with these figures must lose its traffic, or None."""
    if canary.requests < policy.min_requests:
        return None
    if canary.error_rate > stable.error_rate + policy.error_margin:
        return (
            f"error rate {canary.error_rate:.1%} over {canary.requests} requests vs the stable version's "
            f"{stable.error_rate:.1%} (margin {policy.error_margin:.1%})"
        )
    if (
        stable.requests >= policy.min_requests
        and canary.ttft_p99 is not None
        and stable.ttft_p99 is not None
        and canary.ttft_p99 > stable.ttft_p99 * (1 + policy.ttft_margin)
        and canary.ttft_p99 > stable.ttft_p99 + policy.ttft_floor_seconds
    ):
        return (
            f"TTFT p99 {canary.ttft_p99 * 1e3:.0f} ms vs the stable version's {stable.ttft_p99 * 1e3:.0f} ms "
            f"(margin {policy.ttft_margin:.0%})"
        )
    return None


# ---- versions and models --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ServedVersion:
    name: str
    version: str
    path: str
    state: str = "available"
    engine: Any = None  # a started AsyncEngine while loading is done and it is not unloaded
    error: str | None = None
    inflight: int = 0
    report: dict = dataclasses.field(default_factory=dict)  # load / unload figures
    health: HealthWindow | None = None
    # (the engine's card, fixed while that engine lives: read several times per request. A weak reference to the
    # engine it came from, so a replaced engine is noticed and an unloaded one is not kept alive by it)
    _card: tuple[weakref.ref, Any] | None = dataclasses.field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def card(self):
        if self._card is None or self._card[0]() is not self.engine:
            self._card = (weakref.ref(self.engine), self.engine.model_card())
        return self._card[1]

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def describe(self, weight: int, health: Health | None) -> dict:
        d = {"version": self.version, "state": self.state, "path": self.path, "traffic_percent": weight}
        d["inflight"] = self.inflight
        if self.error:
            d["error"] = self.error
        if self.engine is not None:
            card = self.card
            d["memory"] = {
                "weight_bytes": card.weight_bytes,
                "kv_cache_bytes": card.kv_cache_bytes,
                "total_bytes": card.weight_bytes + card.kv_cache_bytes,
            }
            d["kv_pages_in_use"] = self.engine.stats().kv_pages_in_use
            d["max_model_len"] = card.max_model_len
            d["dtype"] = card.dtype
        if health is not None:
            d["health"] = health.as_dict()
        if self.report:
            d["report"] = self.report
        return d


@dataclasses.dataclass(eq=False)
class ServedModel:
    name: str
    versions: dict[str, ServedVersion] = dataclasses.field(default_factory=dict)
    split: dict[str, int] = dataclasses.field(default_factory=dict)  # version -> percent (sums to 100, or empty)
    history: list[dict[str, int]] = dataclasses.field(default_factory=list)

    def stable(self) -> str | None:
        """The version with the largest share (the first such in the split's order)."""
        live = [(w, -i, v) for i, (v, w) in enumerate(self.split.items()) if w > 0]
        return max(live)[2] if live else None

    def stable_loaded(self) -> ServedVersion | None:
        """The stable version, if its engine is loaded."""
        stable = self.stable()
        v = None if stable is None else self.versions[stable]
        return v if v is not None and v.engine is not None else None


def _collect() -> None:
    """Free what an unloaded engine held, and hand it back to the OS: glibc keeps freed heap memory (buffers
    under its mmap threshold, which rises as large blocks are freed) in its arenas until malloc_trim."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ModelRegistry:
    """builder(path) -> a started engine (jaxserve.engine_api.Engine behind an AsyncEngine), run on a worker
    thread for loads. memory_budget: bytes of weights + KV every loaded version together may hold (None: no
    limit); a load past it is refused and freed."""

    def __init__(
        self,
        builder: Callable[[str], Any] | None = None,
        *,
        rollback: RollbackPolicy = RollbackPolicy(),
        memory_budget: int | None = None,
    ):
        self.builder = builder
        self.policy = rollback
        self.memory_budget = memory_budget
        self.models: dict[str, ServedModel] = {}  # insertion order: the first is the default model
        self.events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.rollbacks: collections.Counter = collections.Counter()  # (name, version) -> automatic rollbacks
        self._loads: set[asyncio.Task] = set()

    # ---- set-up ---------------------------------------------------------------------------------------------

    def _version(self, name: str, version: str, path: str) -> ServedVersion:
        model = self.models.setdefault(name, ServedModel(name))
        if version in model.versions:
            return model.versions[version]
        if len(model.versions) >= MAX_VERSIONS:
            raise APIError(CONFLICT, f"version: {name!r} already has {MAX_VERSIONS} versions; unload some", "version")
        v = ServedVersion(name, version, path, health=HealthWindow(self.policy.window_seconds))
        model.versions[version] = v
        return v

    def add_available(self, name: str, version: str, path: str) -> ServedVersion:
        """A version the admin API may load later (a repository's older versions)."""
        return self._version(check_name(name, "name"), check_name(version, "version"), path)

    def add_ready(self, name: str, version: str, engine, path: str | None = None) -> ServedVersion:
        """A started engine as a ready version; the first version of a name takes all its traffic."""
        v = self._version(check_name(name, "name"), check_name(version, "version"), path or engine.model_card().path)
        if v.state in ("loading", "ready", "draining"):
            raise APIError(CONFLICT, f"version: {v.label} is already {v.state}", "version")
        v.engine, v.state, v.error = engine, "ready", None
        self._check_budget(v)
        model = self.models[name]
        if not model.split:
            model.split = {version: 100}
        return v

    # ---- routing --------------------------------------------------------------------------------------------

    @property
    def default(self) -> ServedModel:
        return next(iter(self.models.values()))

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            served = ", ".join(repr(n) for n in self.models)
            raise APIError(NOT_FOUND, f"model: {name!r} is not served here (this server serves {served})", "model")
        return model

    def get_version(self, name: str, version: str) -> ServedVersion:
        model = self.get(name)
        v = model.versions.get(version)
        if v is None:
            have = ", ".join(repr(x) for x in model.versions)
            raise APIError(NOT_FOUND, f"model: {name!r} has no version {version!r} (it has {have})", "model")
        return v

    def route(self, model: str | None, key: str | None = None) -> ServedVersion:
        """The version that answers a request for `model` ('NAME', 'NAME@VERSION' or None: the default model);
        `key` (a user id, a session) makes the choice sticky."""
        if not model:
            entry = self.default
        else:
            name, at, version = model.rpartition("@") if "@" in model else (model, "", "")
            entry = self.get(name)
            if at:
                v = self.get_version(name, version)
                if v.state != "ready":
                    raise APIError(UNAVAILABLE, f"model: {v.label} is {v.state}, not serving", "model")
                return v
        live = [(v, w) for v, w in entry.split.items() if w > 0 and entry.versions[v].state == "ready"]
        if not live:
            raise APIError(UNAVAILABLE, f"model: no version of {entry.name!r} is ready to take traffic", "model")
        total = sum(w for _, w in live)
        if key is None:
            point = random.random() * total
        else:
            digest = hashlib.sha256(f"{entry.name}\x00{key}".encode("utf-8", "replace")).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * total
        for v, w in live:
            point -= w
            if point < 0:
                return entry.versions[v]
        return entry.versions[live[-1][0]]

    def reap(self) -> None:
        """Versions whose engine loop died: failed, their traffic to the stable version (or none left)."""
        from jaxserve.errors import ENGINE_STOPPED

        for model in self.models.values():
            for v in model.versions.values():
                if v.state == "ready" and v.engine is not None and not v.engine.is_running:
                    v.state, v.error = "failed", ENGINE_STOPPED
                    split = dict(model.split)
                    share = split.pop(v.version, 0)
                    split[v.version] = 0
                    live = [(w, -i, x) for i, (x, w) in enumerate(split.items()) if w > 0]
                    stable = max(live)[2] if live else None
                    if stable is not None and share:
                        split[stable] += share
                    model.split = split
                    self._event(model.name, v.version, "failed", f"its engine loop died ({v.engine.error!r})")
                    log.error("%s: the engine loop died (%r); its traffic went to %s", v.label, v.engine.error, stable)

    def ready_versions(self):
        for model in self.models.values():
            for v in model.versions.values():
                if v.engine is not None:
                    yield v

    # ---- health ---------------------------------------------------------------------------------------------

    def record(self, v: ServedVersion, outcome: str, ttft: float | None) -> None:
        """A request `v` answered ended with `outcome`; may roll a canary back."""
        if outcome in _FAILED:
            v.health.record(True, None)
        elif outcome in _SUCCEEDED:
            v.health.record(False, ttft)
        else:
            return
        if self.policy.enabled:
            self.check_canaries(self.models[v.name])

    def check_canaries(self, model: ServedModel) -> list[str]:
        """Roll back every canary of `model` the policy condemns; returns the versions rolled back."""
        stable = model.stable()
        if stable is None:
            return []
        base = model.versions[stable].health.summary()
        done = []
        for version, weight in list(model.split.items()):
            if version == stable or weight <= 0:
                continue
            reason = rollback_reason(model.versions[version].health.summary(), base, self.policy)
            if reason is None:
                continue
            split = dict(model.split)
            split[stable] += split[version]
            split[version] = 0
            self._set_split(model, split)
            self.rollbacks[(model.name, version)] += 1
            self._event(model.name, version, "rolled_back", f"automatic rollback to {stable!r}: {reason}")
            log.warning("automatic rollback of %s@%s (to %s): %s", model.name, version, stable, reason)
            done.append(version)
        return done

    def health(self, v: ServedVersion) -> Health:
        return v.health.summary()

    # ---- admin ----------------------------------------------------------------------------------------------

    def _event(self, name: str, version: str | None, kind: str, message: str) -> None:
        self.events.append({"time": time.time(), "model": name, "version": version, "event": kind, "message": message})

    def describe(self) -> list[dict]:
        return [
            {
                "name": m.name,
                "split": dict(m.split),
                "stable": m.stable(),
                "previous_split": m.history[-1] if m.history else None,
                "versions": [v.describe(m.split.get(v.version, 0), self.health(v)) for v in m.versions.values()],
            }
            for m in self.models.values()
        ]

    def memory_in_use(self) -> int:
        return sum(v.card.weight_bytes + v.card.kv_cache_bytes for v in self.ready_versions())

    def _check_budget(self, v: ServedVersion) -> None:
        if self.memory_budget is None:
            return
        used = self.memory_in_use()
        if used > self.memory_budget:
            card = v.card
            mine = card.weight_bytes + card.kv_cache_bytes
            raise APIError(
                CONFLICT,
                f"memory: {v.label} needs {mine / 2**20:.0f} MiB (weights and KV), which brings the loaded versions "
                f"to {used / 2**20:.0f} MiB, past the server's --memory-budget of {self.memory_budget / 2**20:.0f} "
                "MiB; unload a version first",
                "memory",
            )

    def load(self, name: str, version: str, path: str | None = None) -> ServedVersion:
        """Start loading a version in the background (load, compile or read the cache, warm up); it takes no
        traffic until it is ready and a split gives it some. A failed load leaves the version 'failed' with the
        reason and everything else as it was."""
        if self.builder is None:
            raise APIError(CONFLICT, "load: this server cannot load models (it was started without a builder)")
        check_name(name, "model")  # (the admin API's field)
        check_name(version, "version")
        model = self.models.get(name)
        v = model.versions.get(version) if model else None
        if path is None:
            if v is None:
                raise APIError(
                    VALIDATION, f"path: {name}@{version} is not in the repository; give the model's path", "path"
                )
            path = v.path
        if not isinstance(path, str) or not path or len(path) > 4096:
            raise APIError(VALIDATION, "path: must be a model file or directory path (at most 4096 characters)", "path")
        if not os.path.exists(path):
            raise APIError(VALIDATION, f"path: {path!r} does not exist on the server", "path")
        if v is not None and v.state in ("loading", "ready", "draining"):
            raise APIError(CONFLICT, f"version: {v.label} is {v.state}; unload it first", "version")
        v = self._version(name, version, path)
        v.path, v.state, v.error, v.report = path, "loading", None, {}
        self._event(name, version, "loading", f"loading {path}")
        task = asyncio.get_running_loop().create_task(self._load(v))
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return v

    async def _load(self, v: ServedVersion) -> None:
        from jaxserve.compile_stats import compile_counter

        counter = compile_counter()
        compiles0, hits0 = counter.snapshot()
        start = time.perf_counter()
        try:
            engine = await asyncio.to_thread(self.builder, v.path)
        except Exception as e:  # the reason is the version's; nothing else changes
            v.state, v.error = "failed", f"load failed: {type(e).__name__}: {e}"[:2000]
            self._event(v.name, v.version, "failed", v.error)
            log.error("loading %s from %s failed: %s", v.label, v.path, v.error)
            return
        compiles, hits = counter.snapshot()
        v.engine, v.state = engine, "ready"
        v.report = {
            "load_seconds": round(time.perf_counter() - start, 3),
            "compilations": compiles - compiles0,
            "compilation_cache_hits": hits - hits0,
        }
        try:
            self._check_budget(v)
        except APIError as e:
            v.engine, v.state, v.error = None, "failed", e.message
            await asyncio.to_thread(engine.shutdown)
            self._event(v.name, v.version, "failed", e.message)
            log.error("refused %s: %s", v.label, e.message)
            return
        model = self.models[v.name]
        if not any(w > 0 for w in model.split.values()):  # a name's first ready version serves it
            self._set_split(model, {**model.split, v.version: 100})
        self._event(v.name, v.version, "ready", f"ready in {v.report['load_seconds']:.1f}s: {v.report}")
        log.info("%s ready (%s)", v.label, v.report)

    def check_split(self, model: ServedModel, split) -> dict[str, int]:
        if not isinstance(split, dict) or not split or len(split) > MAX_VERSIONS:
            raise APIError(
                VALIDATION, 'split: must be an object of version -> percent, e.g. {"1": 90, "2": 10}', "split"
            )
        out = {}
        for version, weight in split.items():
            if version not in model.versions:
                raise APIError(NOT_FOUND, f"split: {model.name!r} has no version {version!r}", "split")
            if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100:
                raise APIError(VALIDATION, f"split.{version}: must be an integer percent in [0, 100]", "split")
            if weight > 0 and model.versions[version].state != "ready":
                raise APIError(
                    CONFLICT, f"split.{version}: {model.name}@{version} is {model.versions[version].state}", "split"
                )
            out[version] = weight
        if sum(out.values()) != 100:
            raise APIError(VALIDATION, f"split: the percents must sum to 100, got {sum(out.values())}", "split")
        return out

    def _set_split(self, model: ServedModel, split: dict[str, int]) -> None:
        if split != model.split:
            model.history.append(dict(model.split))
            del model.history[:-MAX_HISTORY]
            model.split = split

    def set_split(self, name: str, split) -> dict[str, int]:
        model = self.get(name)
        new = self.check_split(model, split)
        self._set_split(model, new)
        self._event(name, None, "split", f"split {new}")
        log.info("%s: split %s", name, new)
        return new

    def promote(self, name: str, version: str) -> dict[str, int]:
        """All of `name`'s traffic to `version`."""
        self.get_version(name, check_name(version, "version"))
        return self.set_split(name, {version: 100})

    def rollback(self, name: str) -> dict[str, int]:
        """Back to the split before the last change (a rollback can itself be rolled back)."""
        model = self.get(name)
        while model.history:
            previous = model.history[-1]
            if not previous or any(
                w > 0 and (v not in model.versions or model.versions[v].state == "available")
                for v, w in previous.items()
            ):
                model.history.pop()  # (an empty start, or a split of versions since unloaded)
                continue
            live = {v: w for v, w in previous.items() if v in model.versions}
            try:
                new = self.check_split(model, live)
            except APIError as e:
                raise APIError(CONFLICT, f"rollback: the previous split {previous} cannot serve: {e.message}") from None
            current = dict(model.split)
            model.history.pop()
            model.split = new
            model.history.append(current)
            self._event(name, None, "rollback", f"split {current} -> {new}")
            log.info("%s: rolled back to split %s", name, new)
            return new
        raise APIError(CONFLICT, f"rollback: {name!r} has no earlier split", "model")

    async def unload(self, name: str, version: str, timeout: float = 60.0) -> dict:
        """Drain a version (no new requests; in-flight ones finish on it, for up to `timeout` s), then stop its
        engine and free its weights and pages. Refused while the split gives it traffic."""
        model = self.get(name)
        v = self.get_version(name, check_name(version, "version"))
        if model.split.get(version, 0) > 0:
            raise APIError(
                CONFLICT,
                f"version: {v.label} takes {model.split[version]}% of {name!r}'s traffic; set the split first",
                "version",
            )
        if v.state not in ("ready", "failed"):
            raise APIError(CONFLICT, f"version: {v.label} is {v.state}", "version")
        engine, v.state = v.engine, "draining"
        self._event(name, version, "draining", f"draining {v.inflight} requests")
        end = time.monotonic() + timeout
        while v.inflight and time.monotonic() < end:
            await asyncio.sleep(0.02)
        report = {"drained_requests_left": v.inflight}
        if engine is not None:
            stats = engine.stats()
            card = engine.model_card()
            report.update(
                kv_pages_in_use_at_stop=stats.kv_pages_in_use,
                weight_bytes=card.weight_bytes,
                kv_cache_bytes=card.kv_cache_bytes,
            )
            rss0 = _rss_bytes()
            v.engine = None
            await asyncio.to_thread(engine.shutdown)
            del engine, stats, card  # the last references here: its weights and pages go with them
            await asyncio.to_thread(_collect)
            rss1 = _rss_bytes()
            if rss0 is not None and rss1 is not None:
                report["rss_freed_bytes"] = rss0 - rss1
        model.split.pop(version, None)
        # (inflight is left as is: requests still holding it past the timeout release it as they end)
        v.state, v.report = "available", {**v.report, "unload": report}
        self._event(name, version, "unloaded", f"unloaded: {report}")
        log.info("%s unloaded: %s", v.label, report)
        return report

    def shutdown(self) -> None:
        """Stop every loaded version's engine (a server's exit)."""
        for v in list(self.ready_versions()):
            engine, v.engine, v.state = v.engine, None, "available"
            engine.shutdown()

    async def close(self) -> None:
        for task in list(self._loads):
            task.cancel()
        await asyncio.to_thread(self.shutdown)


# ---- a server's start-up --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StartSpec:
    name: str
    version: str
    path: str | None  # None: the default model (SmolLM2)
    load: bool  # loaded at start (else listed as available)


def start_specs(models: list[str] | None, repository: str | None, served_model_name: str | None) -> list[StartSpec]:
    """What a server starts with: every `--model [NAME=]PATH[@VERSION]` (loaded; a name without a version
    gets 1, 2, ... in order), and each repository model's versions (the newest loaded, the others available, as
    Triton's default version policy). No model at all: the default model, named --served-model-name or its file's
    stem."""
    specs: list[StartSpec] = []
    seen: set[tuple[str, str]] = set()

    def add(spec: StartSpec) -> None:
        if (spec.name, spec.version) in seen:
            raise ValueError(f"--model: {spec.name}@{spec.version} is given twice")
        seen.add((spec.name, spec.version))
        specs.append(spec)

    for i, value in enumerate(models or ()):
        name, path, version = parse_model_flag(value)
        if name is None:
            name = served_model_name if served_model_name and i == 0 else default_model_name(path)
        if version is None:
            version = str(1 + sum(1 for s in specs if s.name == name))
        add(StartSpec(check_name(name, "--model NAME"), version, path, True))
    if repository:
        for name, versions in scan_repository(repository).items():
            newest = list(versions)[-1]
            for version, path in versions.items():
                add(StartSpec(name, version, path, version == newest))
    if not specs:
        from models.loader import default_model_path

        path = default_model_path()
        add(StartSpec(served_model_name or default_model_name(path), DEFAULT_VERSION, None, True))
    return specs


def policy_from_flags(flags) -> RollbackPolicy:
    """The rollback policy of a command line (argparse's namespace or absl's flags: the same names)."""
    return RollbackPolicy(
        window_seconds=flags.rollback_window,
        min_requests=flags.rollback_min_requests,
        error_margin=flags.rollback_error_margin,
        ttft_margin=flags.rollback_ttft_margin,
        ttft_floor_seconds=flags.rollback_ttft_floor,
        enabled=flags.auto_rollback,
    )


def engine_builder(options: dict, max_buffered_tokens: int) -> Callable:
    """path -> a started AsyncEngine with these engine options (jaxserve.llm.build_engine's): what a server
    loads its further versions with."""
    from jaxserve.async_engine import AsyncEngine
    from jaxserve.llm import build_engine

    def build(path: str):
        return AsyncEngine(build_engine(model=path, **options, quiet=True), max_buffered_tokens=max_buffered_tokens)

    return build


def build_registry(
    specs: list[StartSpec], first_engine, builder: Callable | None, *, rollback: RollbackPolicy, memory_budget=None
) -> ModelRegistry:
    """A server's registry at start: `first_engine` (built by the caller, e.g. over a multi-host mesh) serves the
    first loaded spec, `builder` (path -> AsyncEngine; None: no admin loads) builds the other loaded ones, the rest
    are listed as available. An engine that fails to build stops the start, the ones built so far shut down."""
    registry = ModelRegistry(builder, rollback=rollback, memory_budget=memory_budget)
    loaded = [s for s in specs if s.load]
    try:
        registry.add_ready(loaded[0].name, loaded[0].version, first_engine)
        for spec in loaded[1:]:
            registry.add_ready(spec.name, spec.version, builder(spec.path))
    except BaseException:
        for v in list(registry.ready_versions()):
            if v.engine is not first_engine:
                v.engine.shutdown()
        raise
    for spec in specs:
        if not spec.load:
            registry.add_available(spec.name, spec.version, spec.path)
    return registry
