"""The OpenAI-compatible HTTP server (`jaxserve serve`), on aiohttp.

    POST /v1/completions        POST /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models             POST /tokenize
    GET  /health (live)         GET  /ready (warm, not draining, making progress)     GET /metrics
    admin (the admin key, never a user's API key; jaxserve.servers.registry):
    GET  /admin/models          POST /admin/load {model, version, path?}   POST /admin/unload {model, version}
    POST /admin/split {model, split: {version: percent}}    POST /admin/promote {model, version}
    POST /admin/rollback {model}

A request's `model` is NAME (a version by the split; sticky by `user` or the --sticky-header header) or
NAME@VERSION (pinned); the answer names its version (`model_version`, header x-jaxserve-model-version).

Errors are OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with the status of
jaxserve.api.errors' table; `param` names the field. Bodies and headers are bounded before they are read.
A client that disconnects mid-stream cancels its handler, which aborts the request (its pages are freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import struct
import uuid

from aiohttp import web

from jaxserve.api.errors import HEADERS, NOT_FOUND, TOO_LARGE, VALIDATION, APIError, internal_error
from jaxserve.api.openai_protocol import ChatShape, CompletionShape, OpenAIRequest, parse_chat, parse_completion
from jaxserve.api.validation import parse_json_body
from jaxserve.servers import lifecycle
from jaxserve.servers.admin import ADMIN_ACTIONS, admin_action, admin_state
from jaxserve.servers.frontend import Frontend, stalled_write

log = logging.getLogger("jaxserve.http")

_FRONTEND = web.AppKey("frontend", Frontend)
_COUNTED = web.RequestKey("counted", bool)  # Frontend.generate counts this request's outcome
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
_VERSION_HEADER = "x-jaxserve-model-version"  # the version that answered


def build_app(frontend: Frontend) -> web.Application:
    app = web.Application(middlewares=[_errors_and_limits], client_max_size=frontend.limits.max_body_bytes)
    app[_FRONTEND] = frontend
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/models", _admin_models)
    for action in ADMIN_ACTIONS:
        app.router.add_post(f"/admin/{action}", _admin)
    return app


async def start(frontend: Frontend, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner (call `.cleanup()` to stop) and the bound port."""
    # The parser's own limits are a backstop above ours, so that our middleware answers with a JSON 431.
    backstop = 4 * frontend.limits.max_header_bytes
    runner = web.AppRunner(
        build_app(frontend), handler_cancellation=True, access_log=None, max_line_size=backstop, max_field_size=backstop
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    return runner, bound


async def serve(
    frontend: Frontend,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    drain_timeout: float = 30.0,
    stop_event=None,
    ready_callback=None,
) -> int:
    """Serve until SIGTERM/SIGINT (drain, then 0) or engine death (1)."""
    runner, bound = await start(frontend, host, port)
    log.info("serving %s on http://%s:%d", frontend.model_name, host, bound)
    if ready_callback is not None:
        ready_callback(bound)
    code = await lifecycle.wait_for_shutdown(frontend, stop_event)
    if code == 0:
        await lifecycle.drain(frontend, drain_timeout)
    await runner.cleanup()
    return code


# ---- middleware ---------------------------------------------------------------------------------------------


def _error_response(err: APIError) -> web.Response:
    return web.json_response(err.openai_body(), status=err.kind.http_status)


_TENANT = web.RequestKey("tenant", object)  # the index of the API key a request came with (its prefix-cache pool)
_OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes need no API key


@web.middleware
async def _errors_and_limits(request: web.Request, handler):
    frontend = request.app[_FRONTEND]
    try:
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if header_bytes > frontend.limits.max_header_bytes:
            raise APIError(
                HEADERS,
                f"headers: {header_bytes} bytes exceeds the limit of {frontend.limits.max_header_bytes}",
                "headers",
            )
        if request.path.startswith("/admin/"):
            request[_COUNTED] = True  # (admin calls, refused ones too, are not model requests)
            frontend.check_admin_key(request.headers.get("Authorization"))
        elif request.path not in _OPEN_PATHS:
            request[_TENANT] = frontend.check_api_key(request.headers.get("Authorization"))
        return await handler(request)
    except APIError as e:
        _count_refusal(frontend, e, request)
        return _error_response(e)
    except web.HTTPRequestEntityTooLarge:
        e = APIError(TOO_LARGE, f"body: more than {frontend.limits.max_body_bytes} bytes", "body")
        _count_refusal(frontend, e, request)
        return _error_response(e)
    except web.HTTPException as e:  # 404 / 405 from the router: OpenAI's error shape too
        if e.status == 404:
            return _error_response(APIError(NOT_FOUND, f"path: no route {request.method} {request.path}", "path"))
        if e.status >= 400:
            return web.json_response(
                {"error": {"message": e.reason, "type": "invalid_request_error", "param": None, "code": e.status}},
                status=e.status,
            )
        raise
    except Exception as e:  # a bug: this request ends, the server goes on
        return _error_response(internal_error(e, f"{request.method} {request.path}"))


def _count_refusal(frontend: Frontend, err: APIError, request: web.Request) -> None:
    # Frontend.generate counts the outcomes of requests it saw; refusals before it are counted here.
    if not request.get(_COUNTED):
        frontend.count_refusal(err)


async def _json_body(request: web.Request) -> dict:
    frontend = request.app[_FRONTEND]
    limit = frontend.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise APIError(TOO_LARGE, f"body: {request.content_length} bytes exceeds the limit of {limit}", "body")
    # Only JSON: a browser page may send text/plain (or a typeless Blob: aiohttp reads that as octet-stream)
    # cross-origin without a CORS preflight, so accepting those would let any web page use this server.
    ctype = request.content_type
    if ctype != "application/json":
        raise APIError(VALIDATION, f"content-type: need application/json, got {ctype!r}", "content-type")
    return parse_json_body(await request.read(), frontend.limits)


# ---- generation -----------------------------------------------------------------------------------------------


async def _completions(request: web.Request) -> web.StreamResponse:
    frontend = request.app[_FRONTEND]
    body = await _json_body(request)
    parsed = parse_completion(body, frontend.limits, max_prompt_tokens=frontend.max_model_len)
    return await _generate(request, frontend, parsed, f"cmpl-{uuid.uuid4().hex}")


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    frontend = request.app[_FRONTEND]
    parsed = parse_chat(await _json_body(request), frontend.limits)
    return await _generate(request, frontend, parsed, f"chatcmpl-{uuid.uuid4().hex}")


async def _generate(request: web.Request, frontend: Frontend, parsed: OpenAIRequest, rid: str):
    """Run the request's prompt(s) on one version of the model and answer whole or as server-sent events.
    Prompt i's completion k is choice i * n + k; each prompt runs as its own engine request, all at once."""
    served = frontend.acquire(parsed.request.model, frontend.sticky_key(parsed.request, request.headers))
    try:
        return await _answer(request, frontend, parsed, rid, served)
    finally:
        frontend.release(served)


async def _answer(request: web.Request, frontend: Frontend, parsed: OpenAIRequest, rid: str, served):
    frontend.check_size(parsed.requests, stream=parsed.stream, served=served)
    many = len(parsed.requests) > 1
    reqs = [
        r if r.request_id else dataclasses.replace(r, request_id=f"{rid}-{i}" if many else rid)
        for i, r in enumerate(parsed.requests)
    ]
    request[_COUNTED] = True
    shapes = [(ChatShape if parsed.chat else CompletionShape)(served.name, rid, served.version) for _ in reqs]
    n = reqs[0].params.n
    version_header = {_VERSION_HEADER: served.version}
    if not parsed.stream:
        tasks = [asyncio.ensure_future(frontend.complete(r, tenant=request.get(_TENANT), served=served)) for r in reqs]
        try:
            outs = await asyncio.gather(*tasks)
        finally:  # one prompt failed (or the client left): the others stop too
            for task in tasks:
                task.cancel()
        bodies = [_reindex(shape.final(out), i * n) for i, (shape, out) in enumerate(zip(shapes, outs))]
        body = bodies[0]
        body["choices"] = [c for b in bodies for c in b["choices"]]
        body["usage"] = _sum_usage([b["usage"] for b in bodies])
        return web.json_response(body, headers=version_header)
    # One slot per prompt: a pump waits for the writer, so what a slow client has not read stays folded in the
    # engine's bounded stream (one output per prompt), never in a queue here.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(reqs))
    tasks = [
        asyncio.ensure_future(_pump(frontend.generate(r, tenant=request.get(_TENANT), served=served), i, queue))
        for i, r in enumerate(reqs)
    ]
    timeout = frontend.limits.stream_write_timeout
    response = None
    try:
        index, item = await queue.get()
        if isinstance(item, APIError):  # before any output: still a plain HTTP error response
            raise item
        response = web.StreamResponse(headers={**_SSE_HEADERS, **version_header})
        await response.prepare(request)
        writer = _Writer(response, timeout)
        await writer.send(shapes[0].start(item) if len(reqs) == 1 else _start_all(shapes, item, n, len(reqs)))
        last, left = {}, len(reqs)
        while True:
            if isinstance(item, APIError):  # mid-stream: an error event, then the end
                await writer.send(item.openai_body())
                break
            for chunk in shapes[index].chunks(item, parsed.include_usage):
                await writer.send(_reindex(chunk, index * n))
            if item.finished:
                last[index] = item
                left -= 1
                if not left:
                    if parsed.include_usage:
                        usage_chunk = shapes[0].usage_chunk(last[0])
                        usage_chunk["usage"] = _sum_usage([shapes[i].usage_chunk(o)["usage"] for i, o in last.items()])
                        await writer.send(usage_chunk)
                    break
            index, item = await queue.get()
        await writer.write(b"data: [DONE]\n\n")
        await asyncio.wait_for(response.write_eof(), timeout)
    except asyncio.TimeoutError:
        # The client stopped reading: its requests end now (their pages come back) and so does the connection;
        # nothing more can reach it.
        err = stalled_write(timeout)
        frontend.end(tasks, err)
        _reset(request.transport)
        log.info("ended a stream to %s: %s", request.remote, err.message)
    except ConnectionError:  # the client went away mid-write: its requests end (counted cancelled), quietly
        if response is None:
            raise
    finally:
        for task in tasks:
            task.cancel()
    return response


def _reset(transport) -> None:
    """Drop a connection at once with a reset: what the kernel still holds for a client that does not read is
    freed now (a plain close would queue the FIN behind it and keep the socket, and its buffers, for minutes)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Writer:
    """Server-sent events to one client, each write bounded in time: a client that does not read for
    `timeout` seconds makes it raise TimeoutError (the kernel's and aiohttp's buffers are full by then)."""

    def __init__(self, response: web.StreamResponse, timeout: float):
        self.response, self.timeout = response, timeout

    async def write(self, data: bytes) -> None:
        await asyncio.wait_for(self.response.write(data), self.timeout)

    async def send(self, obj) -> None:
        if obj is not None:
            await self.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")


async def _pump(stream, index: int, queue: asyncio.Queue) -> None:
    """Move one prompt's outputs (or its APIError) to the shared queue, tagged with the prompt's index."""
    try:
        async for out in stream:
            await queue.put((index, out))
    except APIError as e:
        await queue.put((index, e))
    finally:
        await stream.aclose()  # aborts the request in the engine unless it finished


def _start_all(shapes, out, n: int, num_prompts: int) -> dict | None:
    """The role chunk for every choice (chat only; completions have none)."""
    first = shapes[0].start(out)
    if first is not None:
        first["choices"] = [dict(first["choices"][0], index=i) for i in range(n * num_prompts)]
    return first


def _reindex(body: dict | None, offset: int) -> dict | None:
    if body is not None and offset:
        body["choices"] = [dict(c, index=c["index"] + offset) for c in body["choices"]]
    return body


def _sum_usage(usages: list[dict]) -> dict:
    total = {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    total["prompt_tokens_details"] = {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)}
    return total


# ---- the rest -------------------------------------------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    cards = request.app[_FRONTEND].model_cards()
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": card["id"],
                    "object": "model",
                    "created": card["created"],
                    "owned_by": "jaxserve",
                    "max_model_len": card["max_model_len"],
                    "versions": card["versions"],
                }
                for card in cards
            ],
        }
    )


async def _tokenize(request: web.Request) -> web.Response:
    frontend = request.app[_FRONTEND]
    body = await _json_body(request)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(VALIDATION, "model: must be a string", "model")
    served = frontend.route(model)
    add_special = body.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise APIError(VALIDATION, "add_special_tokens: must be a boolean", "add_special_tokens")
    ids = await asyncio.to_thread(frontend.tokenize, body.get("prompt"), add_special, "prompt", served)  # off the loop
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": served.card.max_model_len})


# ---- admin ----------------------------------------------------------------------------------------------------


async def _admin_models(request: web.Request) -> web.Response:
    return web.json_response(admin_state(request.app[_FRONTEND]))


async def _admin(request: web.Request) -> web.Response:
    frontend = request.app[_FRONTEND]
    action = request.path.rsplit("/", 1)[1]
    body = await _json_body(request)
    return web.json_response(await admin_action(frontend, action, body))


async def _health(request: web.Request) -> web.Response:
    status, why = request.app[_FRONTEND].liveness()
    if status != "ok":
        return web.json_response({"status": status, "error": why}, status=503)
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    ok, why = request.app[_FRONTEND].ready()
    return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, ctype = request.app[_FRONTEND].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": ctype})
