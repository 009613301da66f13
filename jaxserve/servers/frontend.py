"""What the HTTP and gRPC servers share: one engine, admission, readiness, drain, deadlines and metrics.

    server handler -> api.validation (fields) -> Frontend.generate(GenerateRequest)
        -> render chat / tokenize -> check prompt and context -> AsyncEngine.generate -> RequestOutput stream

Every error leaves here as an `APIError` (kind -> HTTP status / gRPC code, see jaxserve.api.errors). A request
that fails, times out or is cancelled ends alone; its pages are freed by the engine's abort. Every outcome
is counted once in the server's metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence

from jaxserve.api.errors import (
    DEADLINE,
    FORBIDDEN,
    INTERNAL,
    SLOW_CLIENT,
    UNAUTHENTICATED,
    UNAVAILABLE,
    APIError,
    to_api_error,
)
from jaxserve.api.validation import (
    GenerateRequest,
    Limits,
    check_prompt_text,
    check_request_size,
    tokenize_request,
)
from jaxserve.errors import ENGINE_STOPPED
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.servers.metrics import ServerMetrics
from jaxserve.servers.registry import DEFAULT_VERSION, ModelRegistry, ServedVersion, default_model_name

_OUTCOME_OF_KIND = {
    "validation": "invalid",
    "too_large": "invalid",
    "headers": "invalid",
    "admission": "rejected",
    "unavailable": "unavailable",
    "not_found": "not_found",
    "unauthenticated": "unauthenticated",
    "deadline": "deadline",
    "cancelled": "cancelled",
    "slow_client": "slow_client",
}


def api_keys_from(flag_values, env: str = "JAXSERVE_API_KEY") -> tuple[str, ...]:
    """The server's API keys: the --api-key flags, else $JAXSERVE_API_KEY (none: the server is open); or, with
    env="JAXSERVE_ADMIN_KEY", the admin keys (none: the admin API is off)."""
    keys = list(flag_values or ())
    if not keys and os.environ.get(env):
        keys = [os.environ[env]]
    return tuple(keys)


class Frontend:
    def __init__(
        self,
        engine=None,
        *,
        registry: ModelRegistry | None = None,
        model_name: str | None = None,
        version: str = DEFAULT_VERSION,
        limits: Limits = Limits(),
        stall_timeout: float = 120.0,
        api_keys: Sequence[str] = (),
        prefix_cache_per_key: bool = False,
        admin_keys: Sequence[str] = (),
        sticky_header: str | None = None,
    ):
        """engine: a started AsyncEngine (so warm: every bucket compiled), served as `model_name`@`version`; or
        registry: several models and versions (jaxserve.servers.registry), the first model the default.
        stall_timeout: seconds an engine may hold work without finishing a step before the server reports not
        ready. api_keys: when any, every model request must bring one of them (`Authorization: Bearer <key>`;
        health, readiness and metrics are open). prefix_cache_per_key: the prefix cache is split by API key (each
        key's requests share pages only among themselves, on top of any cache_salt they send). admin_keys: the
        admin API's keys (none: the admin API is off); a user's API key never opens it. sticky_header: a request
        header (gRPC metadata key) whose value routes a client to one version (else the body's `user`)."""
        if registry is None:
            if engine is None:
                raise ValueError("Frontend: give an engine or a registry")
            registry = ModelRegistry()
            registry.add_ready(model_name or default_model_name(engine.model_card().path), version, engine)
        elif engine is not None or model_name is not None:
            raise ValueError("Frontend: give an engine (and its model_name) or a registry, not both")
        if not registry.models or not any(True for _ in registry.ready_versions()):
            raise ValueError("Frontend: the registry has no ready version")
        self.registry = registry
        self.limits = limits
        self.stall_timeout = stall_timeout
        self._api_keys = _keys(api_keys, "api_keys")
        self._admin_keys = _keys(admin_keys, "admin_keys")
        if set(self._api_keys) & set(self._admin_keys):
            raise ValueError("admin_keys: an admin key must not also be a user's API key")
        if prefix_cache_per_key and not api_keys:
            raise ValueError("prefix_cache_per_key: needs api_keys")
        if sticky_header is not None and (not sticky_header or not sticky_header.isprintable() or " " in sticky_header):
            raise ValueError("sticky_header: a header name")
        self.sticky_header = sticky_header.lower() if sticky_header else None
        self.prefix_cache_per_key = prefix_cache_per_key
        self.metrics = ServerMetrics(registry)
        self.draining = False
        self._inflight: dict[object, asyncio.Task | None] = {}
        # tasks the server ended, and why (the drain's timeout, a client that stopped reading): see generate (weak:
        # a task whose generate had already returned drops out when it is done)
        self._ended: weakref.WeakKeyDictionary[asyncio.Task, APIError] = weakref.WeakKeyDictionary()
        self._started = time.time()

    # ---- the default model (the first one's serving version): what single-model callers see -------------------

    @property
    def primary(self) -> ServedVersion:
        return self.registry.default.stable_loaded() or next(self.registry.ready_versions())

    @property
    def engine(self):
        return self.primary.engine

    @property
    def card(self):
        return self.primary.card

    @property
    def tokenizer(self):
        return self.primary.tokenizer

    @property
    def model_name(self) -> str:
        return self.registry.default.name

    @property
    def max_model_len(self) -> int:
        """The longest context of any loaded version (a bound for parsing; each version checks its own)."""
        return max(v.card.max_model_len for v in self.registry.ready_versions())

    @property
    def vocab_size(self) -> int:
        return self.primary.card.vocab_size

    # ---- state ------------------------------------------------------------------------------------------------

    def liveness(self) -> tuple[str, str]:
        """("ok" | "dead" | "stalled", why). A version whose engine died is failed and loses its traffic to the
        stable version (registry.reap); the server is dead when a model has no live version left, and stalled
        when an engine that takes traffic holds work without progress past the stall timeout."""
        self.registry.reap()
        for model in self.registry.models.values():
            live = [model.versions[v] for v, w in model.split.items() if w > 0]
            if not live:
                return "dead", ENGINE_STOPPED
            for v in live:
                stalled = v.engine.stalled_for()
                if stalled > self.stall_timeout:
                    which = f" ({v.label})" if len(self.registry.models) > 1 or len(model.versions) > 1 else ""
                    return "stalled", f"the engine{which} made no progress for {stalled:.0f}s with work pending"
        return "ok", "ok"

    def ready(self) -> tuple[bool, str]:
        """(serving?, why not). Warm by construction; not while draining, dead or stalled."""
        status, why = self.liveness()
        if status != "ok":
            return False, why
        if self.draining:
            return False, "draining"
        return True, "ok"

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def check_api_key(self, authorization: str | None) -> int | None:
        """`authorization`: the request's Authorization header (HTTP) or metadata (gRPC). Every key is compared,
        each in constant time, so the time taken says nothing about any key. Returns the key's index (None when
        the server has no keys): the tenant whose prefix-cache pool the request uses under prefix_cache_per_key."""
        if not self._api_keys:
            return None
        index = _match(self._api_keys, authorization)
        if index is None:
            raise APIError(
                UNAUTHENTICATED, "authorization: missing or invalid API key (send 'Bearer <key>')", "authorization"
            )
        return index

    def check_admin_key(self, authorization: str | None) -> None:
        """The admin API's guard: off without admin keys; a user's API key is not an admin key."""
        if not self._admin_keys:
            raise APIError(FORBIDDEN, "admin: the admin API is off (start the server with --admin-key)")
        if _match(self._admin_keys, authorization) is None:
            raise APIError(
                UNAUTHENTICATED,
                "authorization: missing or invalid admin key (send 'Bearer <admin key>')",
                "authorization",
            )

    def route(self, model: str | None, key: str | None = None) -> ServedVersion:
        """The version that answers (NAME, NAME@VERSION or None: the default model; `key`: sticky)."""
        return self.registry.route(model, key)

    def acquire(self, model: str | None, key: str | None = None) -> ServedVersion:
        """route(), holding the version: it is not stopped (unloaded) until release()."""
        served = self.route(model, key)
        served.inflight += 1
        return served

    @staticmethod
    def release(served: ServedVersion) -> None:
        served.inflight -= 1

    def sticky_key(self, req: GenerateRequest, headers) -> str | None:
        """The routing key of a request: the sticky header's value when the server names one and the request
        has it, else the body's `user`."""
        if self.sticky_header is not None and headers is not None:
            value = headers.get(self.sticky_header)
            if value:
                return value[:256]
        return req.user

    def model_cards(self) -> list[dict]:
        """/v1/models and ListModels: every model (its serving version's card) with its versions."""
        out = []
        for model in self.registry.models.values():
            served = model.stable_loaded() or next((v for v in model.versions.values() if v.engine is not None), None)
            if served is not None:
                out.append(self.model_card(served))
            else:  # (nothing loaded: only its versions are known)
                out.append({"id": model.name, "max_model_len": 0, "vocab_size": 0, "dtype": "", "num_parameters": 0})
                out[-1].update(architecture="llama", created=int(self._started), versions=self._versions(model))
        return out

    @staticmethod
    def _versions(model) -> list[dict]:
        return [
            {"version": v.version, "state": v.state, "traffic_percent": model.split.get(v.version, 0)}
            for v in model.versions.values()
        ]

    def model_card(self, served: ServedVersion | None = None) -> dict:
        """One version's card, with every version of its model."""
        served = served or self.primary
        card = served.card
        return {
            "id": served.name,
            "version": served.version,
            "max_model_len": card.max_model_len,
            "vocab_size": card.vocab_size,
            "dtype": card.dtype,
            "architecture": "llama",
            "created": int(self._started),
            "num_parameters": card.num_parameters,
            "versions": self._versions(self.registry.models[served.name]),
        }

    # ---- requests ---------------------------------------------------------------------------------------------

    def tokenize(
        self, text, add_special_tokens: bool = True, field: str = "text", served: ServedVersion | None = None
    ) -> list[int]:
        check_prompt_text(text, self.limits, field)
        return (served or self.primary).tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_size(
        self, requests: Sequence[GenerateRequest], *, stream: bool, served: ServedVersion | None = None
    ) -> None:
        max_len = served.card.max_model_len if served is not None else self.max_model_len
        check_request_size(requests, stream=stream, limits=self.limits, max_model_len=max_len)

    @staticmethod
    def prepare(req: GenerateRequest, served: ServedVersion) -> tuple[str | None, list[int]]:
        card = served.card
        return tokenize_request(req, served.tokenizer, max_model_len=card.max_model_len, vocab_size=card.vocab_size)

    def cache_salt(self, req: GenerateRequest, tenant: int | None) -> str | None:
        """The salt the engine gets: the client's cache_salt, inside its API key's own pool under
        prefix_cache_per_key (the NUL bytes make it a salt no client can send: theirs must be printable)."""
        if not self.prefix_cache_per_key or tenant is None:
            return req.cache_salt
        return f"\x00key {tenant}\x00{req.cache_salt or ''}"

    async def generate(
        self,
        req: GenerateRequest,
        *,
        id_prefix: str = "req",
        tenant: int | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.DELTA,
        served: ServedVersion | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs: deltas (each output carries only what is new; a consumer that falls behind
        gets the steps it missed folded into one), or FINAL_ONLY (one output at the end). Raises APIError (before
        the first output for bad input or admission; later for a deadline, a dead engine, a consumer that fell
        too far behind, or a bug). Cancelling the consumer aborts the request. served: the version that answers
        (the caller's acquire()); else routed here by req.model and req.user. It runs on that version to its end,
        whatever the split does meanwhile."""
        outcome, last, held, own = "error", None, None, served is None
        try:
            self._check_accepting()
            if own:  # (else the caller's acquire() holds it: one request, counted once)
                served = self.acquire(req.model, req.user)
            held = served
            if not served.engine.is_running:
                raise APIError(UNAVAILABLE, ENGINE_STOPPED)
            # Render and tokenize on a worker thread: a slow template or a megabyte prompt never stalls the event
            # loop every connection shares (the render itself is bounded in time and size: models.tokenizer).
            _, ids = await asyncio.to_thread(self.prepare, req, served)
            # The engine's id is always made here, unique: a client's request_id is only echoed back on its own
            # outputs, so no client can name (abort, probe or collide with) another client's request.
            engine_id = f"{id_prefix}-{uuid.uuid4().hex}"
            echo_id = req.request_id or engine_id
            deadline = None if req.timeout is None else time.monotonic() + req.timeout
            stream = served.engine.generate(
                ids,
                dataclasses.replace(req.params, output_kind=output_kind),
                request_id=engine_id,
                priority=req.priority,
                cache_salt=self.cache_salt(req, tenant),
            )
            token = object()  # (not the request id: a refused duplicate id must not untrack the original)
            self._inflight[token] = asyncio.current_task()
            try:
                while True:
                    if asyncio.current_task() in self._ended:
                        # end() cancelled this task but the cancel was swallowed on the way (Python 3.11's
                        # wait_for returns its inner result when that completes as the cancel lands, e.g. a
                        # gRPC write): act on it now, or the request would run to the end unnoticed.
                        raise asyncio.CancelledError
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise asyncio.TimeoutError
                    try:
                        out = await asyncio.wait_for(stream.__anext__(), remaining)
                    except StopAsyncIteration:
                        break
                    last = out
                    if out.error is not None:
                        outcome = "error"
                        raise APIError(INTERNAL, out.error)
                    if out.finished:
                        outcome = out.outputs[0].finish_reason or "stop"
                    yield out if echo_id is engine_id else dataclasses.replace(out, request_id=echo_id)
                    if out.finished:
                        break
            except asyncio.TimeoutError:
                outcome = "deadline"
                raise APIError(
                    DEADLINE, f"timeout: the request ran past its deadline of {req.timeout:g}s", "timeout"
                ) from None
            finally:
                self._inflight.pop(token, None)
                await stream.aclose()  # aborts the request in the engine unless it finished
        except (asyncio.CancelledError, GeneratorExit) as e:
            ended = self._ended.pop(asyncio.current_task(), None)
            if ended is not None:  # the server ended it (see end): counted as why, and a cancel says why
                outcome = _OUTCOME_OF_KIND.get(ended.kind.name, "error")
                if isinstance(e, asyncio.CancelledError):
                    raise ended from None
                raise
            # (a consumer that closes the stream after the finished output is not a cancel)
            if last is None or not last.finished:
                outcome = "cancelled"
            raise
        except APIError as e:
            outcome = _OUTCOME_OF_KIND.get(e.kind.name, outcome)
            raise
        except Exception as e:
            err = to_api_error(e)
            outcome = _OUTCOME_OF_KIND.get(err.kind.name, "error")
            raise err from None
        finally:
            self._ended.pop(asyncio.current_task(), None)
            self.metrics.observe(outcome, last, held)
            if held is not None:
                if own:
                    self.release(held)
                self.registry.record(held, outcome, last.metrics.ttft if last is not None else None)

    def count_refusal(self, err: APIError) -> None:
        """Count a request a server refused before it reached `generate` (which counts its own outcomes)."""
        self.metrics.observe(_OUTCOME_OF_KIND.get(err.kind.name, "error"))

    async def complete(
        self,
        req: GenerateRequest,
        *,
        id_prefix: str = "req",
        tenant: int | None = None,
        served: ServedVersion | None = None,
    ) -> RequestOutput:
        """The request's final output, whole (nothing is copied per step on the way)."""
        last = None
        async for out in self.generate(
            req, id_prefix=id_prefix, tenant=tenant, output_kind=RequestOutputKind.FINAL_ONLY, served=served
        ):
            last = out
        return last

    def end(self, tasks: Sequence[asyncio.Task], error: APIError) -> None:
        """End requests for a server-side reason (the drain timed out, the client stopped reading): each task's
        `generate` counts `error`'s outcome and, if it was waiting on the engine, raises `error` so the client
        hears why. The calling task itself is only marked (it ends its own stream by closing it)."""
        me = asyncio.current_task()
        for task in tasks:
            if task is not None and not task.done():
                self._ended[task] = error
                if task is not me:
                    task.cancel()

    def _check_accepting(self) -> None:
        if self.draining:
            raise APIError(UNAVAILABLE, "server is draining: not accepting new requests")

    # ---- drain ------------------------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> int:
        """Stop admitting, wait up to `timeout` s for in-flight requests, then cancel the rest; returns how
        many were cancelled."""
        self.draining = True
        end = time.monotonic() + timeout
        while self._inflight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        left = [t for t in self._inflight.values() if t is not None]
        # (the clients hear why: an SSE error event, a 503, UNAVAILABLE; not silence)
        self.end(left, APIError(UNAVAILABLE, DRAIN_TIMED_OUT))
        if left:
            await asyncio.sleep(0.1)  # let the cancelled streams post their aborts
        return len(left)


def _keys(keys: Sequence[str], field: str) -> tuple[bytes, ...]:
    if any(not isinstance(k, str) or not k or not k.isprintable() for k in keys):
        raise ValueError(f"{field}: each key must be a non-empty printable string")
    return tuple(k.encode() for k in keys)


def _match(keys: tuple[bytes, ...], authorization: str | None) -> int | None:
    """The index of the bearer key `authorization` brings, or None. Every key is compared, each in constant time."""
    scheme, _, presented = (authorization or "").partition(" ")
    given = presented.strip().encode("utf-8", "replace")
    index = None
    for i, key in enumerate(keys):
        if hmac.compare_digest(given, key) and index is None:
            index = i
    return index if scheme.lower() == "bearer" else None


DRAIN_TIMED_OUT = "server shutting down: the request did not finish within the drain timeout"


def stalled_write(timeout: float) -> APIError:
    """Why a stream ends when a write to its client waited `timeout` s (--stream-write-timeout): it reads nothing."""
    return APIError(SLOW_CLIENT, f"stream: the client read nothing for {timeout:g}s")
