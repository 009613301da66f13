"""jaxserve's gRPC server (`jaxserve-grpc`): the `jaxserve.v1.JaxServe` service over a `Frontend`, on grpc.aio.

    jaxserve-grpc --model path/to/model.gguf --port 50051
    grpcurl -plaintext -d '{"text": "Hi", "sampling": {"max_tokens": 8}}' localhost:50051 jaxserve.v1.JaxServe/Generate

Every request goes through the shared validators (jaxserve.api.validation) and every error through the shared
table (jaxserve.api.errors): the status code comes from the error's kind, the details start with the field's
name, and the field also travels in the trailing metadata `jaxserve-field`. Alongside the service run the
standard health service (SERVING only while the Frontend is ready) and server reflection.

Shutdown: SIGTERM / SIGINT (or `stop_event`) -> health NOT_SERVING, new requests UNAVAILABLE, in-flight ones get
`drain_timeout` seconds to finish, then the server stops and `serve` returns 0. If the engine loop dies,
`serve` stops the server and returns 1, so a supervisor restarts the process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.api.errors import UNAVAILABLE, VALIDATION, APIError, internal_error
from jaxserve.api.validation import (
    GenerateRequest,
    Limits,
    ValidationError,
    check_cache_salt,
    check_messages,
    check_priority,
    check_prompt_text,
    check_request_id,
    check_timeout,
    check_token_id_list,
    check_user,
    sampling_params,
)
from jaxserve.async_engine import MAX_BUFFERED_TOKENS
from jaxserve.outputs import new_choices
from jaxserve.servers import lifecycle
from jaxserve.api.openai_protocol import usage
from jaxserve.servers.admin import admin_action, admin_state
from jaxserve.servers.frontend import DRAIN_TIMED_OUT, Frontend, api_keys_from, stalled_write
from jaxserve.v1 import jaxserve_pb2 as pb
from jaxserve.v1 import jaxserve_pb2_grpc as pb_grpc

log = logging.getLogger("jaxserve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JaxServe"].full_name  # "jaxserve.v1.JaxServe"
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name
FIELD_METADATA_KEY = "jaxserve-field"
HEALTH_INTERVAL_S = 0.5
STOP_GRACE_S = 2.0  # after the drain: lets the last responses flush before connections close
_OPTIONAL_SAMPLING = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.has_presence)
_FINISH = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


class _Undecodable:
    """What the request deserializer hands over for bytes that are not a valid message (bad UTF-8 in a string
    field, truncated fields): grpc.aio would otherwise fail the RPC with a generic status naming no field."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(message_cls):
    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return _Undecodable(e)

    return deserialize


def _renamed(err: APIError, renames: dict[str, str]) -> APIError:
    """The Frontend names fields as the Python API does; rename them to this request's proto fields."""
    new = renames.get(err.field or "")
    if not new:
        return err
    message = new + err.message[len(err.field) :] if err.message.startswith(err.field) else err.message
    return APIError(err.kind, message, new)


class JaxServeServicer(pb_grpc.JaxServeServicer):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    # ---- request conversion -----------------------------------------------------------------------------------

    def _to_request(self, request: pb.GenerateRequest) -> GenerateRequest:
        fe = self.frontend
        which = request.WhichOneof("prompt")
        prompt = ids = messages = None
        if which == "text":
            prompt = check_prompt_text(request.text, fe.limits, "prompt")
        elif which == "token_ids":
            ids = check_token_id_list(list(request.token_ids.ids), fe.max_model_len, "token_ids")
        elif which == "chat":
            raw = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            messages = check_messages(raw, fe.limits, "chat.messages")
        else:
            raise ValidationError("prompt", "missing: set one of text, token_ids or chat")
        s = request.sampling
        fields = {name: getattr(s, name) for name in _OPTIONAL_SAMPLING if s.HasField(name)}
        if s.stop:  # repeated fields have no presence: empty means "none"
            fields["stop"] = list(s.stop)
        if s.stop_token_ids:
            fields["stop_token_ids"] = list(s.stop_token_ids)
        if s.logit_bias:  # (a map: empty means "none")
            fields["logit_bias"] = dict(s.logit_bias)
        return GenerateRequest(
            params=sampling_params(fields),
            prompt=prompt,
            prompt_token_ids=ids,
            messages=messages,
            request_id=check_request_id(request.request_id, fe.limits) if request.request_id else None,
            model=request.model or None,
            user=check_user(request.user) if request.user else None,
            priority=check_priority(request.priority),
            cache_salt=check_cache_salt(request.cache_salt) if request.cache_salt else None,
            timeout=check_timeout(request.timeout_seconds, fe.limits, "timeout_seconds")
            if request.timeout_seconds != 0
            else None,
        )

    @staticmethod
    def _renames(request) -> dict[str, str]:
        renames = {"timeout": "timeout_seconds"}
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            renames["prompt"] = "token_ids"
        elif which == "chat":
            renames.update(prompt="chat.messages", messages="chat.messages")
        return renames

    # ---- errors -----------------------------------------------------------------------------------------------

    async def _abort(self, context, err: APIError):
        metadata = ((FIELD_METADATA_KEY, err.field),) if err.field else ()
        await context.abort(grpc.StatusCode[err.kind.grpc_code], err.message, metadata)

    def _parse(self, request, *, stream: bool) -> GenerateRequest:
        try:
            req = self._to_request(request)
            self.frontend.check_size([req], stream=stream)
            return req
        except APIError as e:
            self.frontend.count_refusal(e)
            raise

    def _acquire(self, req: GenerateRequest, context):
        """The version that answers (held until released), by the request's model and sticky key."""
        try:
            return self.frontend.acquire(req.model, self.frontend.sticky_key(req, _metadata(context)))
        except APIError as e:
            self.frontend.count_refusal(e)
            raise

    def _tenant(self, context) -> int | None:
        """The API key the call came with (raises UNAUTHENTICATED when keys are required and it has none)."""
        return self.frontend.check_api_key(_metadata(context).get("authorization"))

    async def _run(self, request, context, body, generation: bool = False):
        """Run a handler body, turning every failure into a status: APIError by its kind, bugs as INTERNAL (this
        request ends, the server goes on), and a cancel from the drain as UNAVAILABLE."""
        try:
            self._tenant(context)
        except APIError as e:
            if generation:
                self.frontend.count_refusal(e)
            await self._abort(context, e)
        if isinstance(request, _Undecodable):
            err = APIError(VALIDATION, f"request: not a valid message ({request.error})", "request")
            if generation:
                self.frontend.count_refusal(err)
            await self._abort(context, err)
        try:
            return await body()
        except grpc.aio.AbortError:
            raise
        except APIError as e:
            renames = self._renames(request) if isinstance(request, pb.GenerateRequest) else {}
            await self._abort(context, _renamed(e, renames))
        except asyncio.CancelledError:
            # The client went away or its deadline passed (grpc.aio cancels this task; nobody hears an answer),
            # or the drain timed out and cancelled what was left: tell that client why.
            if self.frontend.draining and not context.done():
                await self._abort(
                    context,
                    APIError(UNAVAILABLE, DRAIN_TIMED_OUT),
                )
            raise
        except Exception as e:  # a bug: that call ends with INTERNAL and an incident id; the log has the rest
            await self._abort(context, internal_error(e, f"gRPC {type(request).__name__}"))

    # ---- RPCs -------------------------------------------------------------------------------------------------

    async def Generate(self, request, context):
        async def body():
            req = self._parse(request, stream=True)
            num_top = req.params.logprobs or 0
            timeout = self.frontend.limits.stream_write_timeout
            tenant = self._tenant(context)  # (before the version is held: nothing between acquire and try raises)
            served = self._acquire(req, context)
            stream = self.frontend.generate(req, id_prefix="grpc", tenant=tenant, served=served)
            sent_finish: set[int] = set()
            try:
                async for out in stream:
                    msg = pb.GenerateResponse(
                        request_id=out.request_id, finished=out.finished, model_version=served.version
                    )
                    msg.outputs.extend(_delta(c, num_top) for c in new_choices(out, sent_finish))
                    if out.finished:
                        msg.usage.CopyFrom(pb.Usage(**usage(out)))
                    if msg.outputs or out.finished:
                        try:  # (a client that reads nothing must not hold the call, or its request, forever)
                            await asyncio.wait_for(context.write(msg), timeout)
                        except asyncio.TimeoutError:
                            err = stalled_write(timeout)
                            self.frontend.end([asyncio.current_task()], err)  # (counted as slow_client)
                            raise err from None
            finally:
                # Cancelled while waiting in context.write, the Frontend's generator sits at a yield: close it
                # now (not at garbage collection) so the engine aborts the request and frees its pages at once.
                await stream.aclose()
                self.frontend.release(served)

        await self._run(request, context, body, generation=True)

    async def Complete(self, request, context):
        async def body():
            req = self._parse(request, stream=False)
            served = self._acquire(req, context)
            try:
                out = await self.frontend.complete(req, id_prefix="grpc", tenant=self._tenant(context), served=served)
            finally:
                self.frontend.release(served)
            m, num_top = out.metrics, req.params.logprobs or 0
            return pb.CompleteResponse(
                model_version=served.version,
                request_id=out.request_id,
                outputs=[_completion(c, num_top) for c in out.outputs],
                usage=pb.Usage(**usage(out)),
                time_to_first_token_seconds=m.ttft or 0.0,
                time_per_output_token_seconds=m.tpot or 0.0,
            )

        return await self._run(request, context, body, generation=True)

    async def Tokenize(self, request, context):
        async def body():
            served = self.frontend.route(request.model or None)
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await asyncio.to_thread(self.frontend.tokenize, request.text, add, "text", served)  # off the loop
            return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=served.card.max_model_len)

        return await self._run(request, context, body)

    async def ListModels(self, request, context):
        async def body():
            return pb.ListModelsResponse(models=[_card(c) for c in self.frontend.model_cards()])

        return await self._run(request, context, body)

    async def ModelInfo(self, request, context):
        async def body():
            served = self.frontend.route(request.model or None)
            card = served.card
            return pb.ModelInfoResponse(
                model=_card(self.frontend.model_card(served)),
                max_num_seqs=card.max_num_seqs,
                max_num_batched_tokens=card.max_num_batched_tokens,
                page_size=card.page_size,
                num_kv_pages=card.num_kv_pages,
                has_chat_template=card.has_chat_template,
            )

        return await self._run(request, context, body)


def _card(card: dict) -> pb.ModelCard:
    return pb.ModelCard(
        id=card["id"],
        max_model_len=card["max_model_len"],
        vocab_size=card["vocab_size"],
        dtype=str(card["dtype"]),
        architecture=card["architecture"],
        num_parameters=card["num_parameters"],
        versions=[pb.ModelVersion(**v) for v in card.get("versions", ())],
    )


def _metadata(context) -> dict:
    return dict(context.invocation_metadata() or ())


class AdminServicer(pb_grpc.AdminServicer):
    """jaxserve.v1.Admin: the HTTP admin API's actions (jaxserve.servers.admin), guarded by the admin key."""

    def __init__(self, frontend: Frontend):
        self.frontend = frontend

    async def _call(self, context, action: str, body: dict | None = None):
        try:
            self.frontend.check_admin_key(_metadata(context).get("authorization"))
            result = admin_state(self.frontend) if action == "list" else await admin_action(self.frontend, action, body)
        except APIError as e:
            metadata = ((FIELD_METADATA_KEY, e.field),) if e.field else ()
            await context.abort(grpc.StatusCode[e.kind.grpc_code], e.message, metadata)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # a bug: INTERNAL with an incident id
            err = internal_error(e, f"gRPC Admin {action}")
            await context.abort(grpc.StatusCode[err.kind.grpc_code], err.message)
        return pb.AdminResponse(json=json.dumps(result))

    async def ListVersions(self, request, context):
        return await self._call(context, "list")

    async def LoadVersion(self, request, context):
        body = {"model": request.model, "version": request.version, "path": request.path or None}
        return await self._call(context, "load", body)

    async def UnloadVersion(self, request, context):
        body = {"model": request.model, "version": request.version}
        if request.HasField("timeout_seconds"):
            body["timeout"] = request.timeout_seconds
        return await self._call(context, "unload", body)

    async def SetSplit(self, request, context):
        return await self._call(context, "split", {"model": request.model, "split": dict(request.split)})

    async def Promote(self, request, context):
        return await self._call(context, "promote", {"model": request.model, "version": request.version})

    async def Rollback(self, request, context):
        return await self._call(context, "rollback", {"model": request.model})


# ---- output conversion ------------------------------------------------------------------------------------------


def _logprob(token_id: int, lp) -> pb.Logprob:
    return pb.Logprob(token_id=token_id, token=lp.decoded_token, logprob=lp.logprob, rank=lp.rank)


def _token_logprobs(entries, token_ids, num_top: int) -> list[pb.TokenLogprobs]:
    """Engine logprobs ({token_id: Logprob} per token: the sampled one and the top `num_top`) -> proto. `top`
    is the top `num_top` by rank, the sampled token included when it is among them (as the proto says)."""
    out = []
    for entry, tid in zip(entries, token_ids):
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        top = [_logprob(t, lp) for t, lp in ranked if lp.rank <= num_top][:num_top]
        out.append(pb.TokenLogprobs(sampled=_logprob(tid, entry[tid]), top=top))
    return out


def _stop(msg, stop_reason) -> None:
    if isinstance(stop_reason, str):
        msg.stop_string = stop_reason
    elif isinstance(stop_reason, int):
        msg.stop_token_id = stop_reason


def _delta(c, num_top: int) -> pb.CompletionDelta:
    msg = pb.CompletionDelta(
        index=c.index, text=c.delta_text, token_ids=c.delta_token_ids, finish_reason=_FINISH[c.finish_reason]
    )
    if c.logprobs is not None and c.delta_token_ids:
        msg.logprobs.extend(_token_logprobs(c.logprobs[-len(c.delta_token_ids) :], c.delta_token_ids, num_top))
    _stop(msg, c.stop_reason)
    return msg


def _completion(c, num_top: int) -> pb.Completion:
    msg = pb.Completion(
        index=c.index,
        text=c.text,
        token_ids=c.token_ids,
        finish_reason=_FINISH[c.finish_reason],
        cumulative_logprob=c.cumulative_logprob or 0.0,
    )
    if c.logprobs is not None:
        msg.logprobs.extend(_token_logprobs(c.logprobs, c.token_ids, num_top))
    _stop(msg, c.stop_reason)
    return msg


# ---- server -----------------------------------------------------------------------------------------------------


_METHODS = {  # name: (handler kind, request, response)
    "Generate": (grpc.unary_stream_rpc_method_handler, pb.GenerateRequest, pb.GenerateResponse),
    "Complete": (grpc.unary_unary_rpc_method_handler, pb.GenerateRequest, pb.CompleteResponse),
    "Tokenize": (grpc.unary_unary_rpc_method_handler, pb.TokenizeRequest, pb.TokenizeResponse),
    "ListModels": (grpc.unary_unary_rpc_method_handler, pb.ListModelsRequest, pb.ListModelsResponse),
    "ModelInfo": (grpc.unary_unary_rpc_method_handler, pb.ModelInfoRequest, pb.ModelInfoResponse),
}


def _method_handlers(servicer: JaxServeServicer) -> dict:
    """The generated handlers, but with request deserializers that never raise (see _Undecodable)."""
    return {
        name: kind(
            getattr(servicer, name),
            request_deserializer=_lenient(request),
            response_serializer=response.SerializeToString,
        )
        for name, (kind, request, response) in _METHODS.items()
    }


async def update_health(frontend: Frontend, health_servicer) -> bool:
    """Publish the Frontend's readiness for "" and the JaxServe service; returns it."""
    ready, _ = frontend.ready()
    status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)
    return ready


async def build_server(frontend: Frontend, host: str = "127.0.0.1", port: int = 0):
    """Create, bind and start the server (call on the event loop that will run it). Returns (server, the bound
    port, the health servicer)."""
    options = [
        ("grpc.max_receive_message_length", frontend.limits.max_body_bytes),  # larger -> RESOURCE_EXHAUSTED
        ("grpc.max_send_message_length", 256 << 20),  # logprobs of long completions are big, but bounded
        # Both limits: between grpc's soft and hard limit, headers are refused only with some probability.
        ("grpc.max_metadata_size", frontend.limits.max_header_bytes),
        ("grpc.absolute_max_metadata_size", frontend.limits.max_header_bytes),
        ("grpc.so_reuseport", 0),  # a port already taken must fail to bind, not be silently shared
    ]
    server = grpc.aio.server(options=options)
    handlers = _method_handlers(JaxServeServicer(frontend))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # what the generated stubs call
    pb_grpc.add_AdminServicer_to_server(AdminServicer(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health_name, reflection.SERVICE_NAME), server
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise OSError(f"cannot bind {host}:{port}: {e}") from None
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await update_health(frontend, health_servicer)
    await server.start()
    return server, bound, health_servicer


async def _keep_health(frontend: Frontend, health_servicer) -> None:
    while True:  # readiness changes without a request (a stall, the engine dying): poll it
        await update_health(frontend, health_servicer)
        await asyncio.sleep(HEALTH_INTERVAL_S)


async def serve(
    frontend: Frontend,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    drain_timeout: float = 30.0,
    metrics_port: int | None = None,
    ready_callback=None,
    stop_event: asyncio.Event | None = None,
) -> int:
    """Serve until SIGTERM / SIGINT (handled only on the main thread) or `stop_event`, then drain and return 0;
    return 1 if the engine loop dies. ready_callback(port) is called once the server listens."""
    server, bound, health_servicer = await build_server(frontend, host, port)
    metrics_http = None
    if metrics_port:
        from prometheus_client import start_http_server

        metrics_http, _ = start_http_server(metrics_port, addr=host, registry=frontend.metrics.registry)
    log.info("serving %r over gRPC on %s:%d", frontend.model_name, host, bound)
    if ready_callback is not None:
        ready_callback(bound)
    health_task = asyncio.create_task(_keep_health(frontend, health_servicer))
    try:
        code = await lifecycle.wait_for_shutdown(frontend, stop_event)
        health_task.cancel()
        await health_servicer.enter_graceful_shutdown()  # NOT_SERVING from now on: balancers stop sending
        if code == 0:
            await lifecycle.drain(frontend, drain_timeout)
        await server.stop(STOP_GRACE_S)  # (after an engine death: new requests get UNAVAILABLE meanwhile)
        return code
    finally:
        health_task.cancel()
        if metrics_http is not None:
            metrics_http.shutdown()


# ---- command line -----------------------------------------------------------------------------------------------


def define_flags(fv=None) -> None:
    """The command line's flags (on absl's global FLAGS unless `fv` is given): the engine options of
    jaxserve.options, and the server's own."""
    from absl import flags

    from jaxserve.options import define_absl_flags

    fv = flags.FLAGS if fv is None else fv
    define_absl_flags(fv)
    fv.__delattr__("model")  # repeatable here, as `jaxserve serve --model`
    flags.DEFINE_multi_string(
        "model",
        None,
        "[NAME=]PATH[@VERSION]: a model version to serve (repeatable; the first version of a name takes its "
        "traffic). PATH: GGUF file, HF directory or orbax checkpoint (default: SmolLM2-135M-Instruct)",
        flag_values=fv,
    )
    _define_lifecycle_flags(fv)
    text, integer, number = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float
    for define, name, default, doc in [
        (text, "model_name", None, "the name clients use (default: the model's)"),
        (text, "host", "127.0.0.1", "address to listen on"),
        (integer, "port", 50051, "port to listen on (0: any free one)"),
        (number, "drain_timeout", 30.0, "seconds in-flight requests get after SIGTERM"),
        (integer, "metrics_port", None, "Prometheus /metrics port (default: off)"),
        (number, "stall_timeout", 120.0, "seconds without engine progress before health turns NOT_SERVING"),
    ]:
        define(name, default, doc, flag_values=fv)
    flags.DEFINE_integer(
        "max_seqs_per_request", Limits.max_seqs_per_request, "sequences (n) one request may add", flag_values=fv
    )
    flags.DEFINE_integer(
        "max_response_bytes",
        Limits.max_response_bytes,
        "largest Complete answer, estimated up front from n, max_tokens and logprobs",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "stream_write_timeout",
        Limits.stream_write_timeout,
        "seconds a Generate message may wait on a client that reads nothing; then the call and its request end",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "stream_buffer_tokens",
        MAX_BUFFERED_TOKENS,
        "tokens (each logprob alternative counts one more) a stream may hold unread before the call is ended",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "prefix_cache_per_key", False, "split the prefix cache by API key (needs --api_key)", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "api_key",
        None,
        "require 'authorization: Bearer <key>' metadata on every JaxServe RPC (repeat for several keys; default: "
        "$JAXSERVE_API_KEY; health and reflection stay open)",
        flag_values=fv,
    )


def _define_lifecycle_flags(fv) -> None:
    """Several models and versions, the admin service's key, routing and the canary policy (as `jaxserve serve`)."""
    from absl import flags

    from jaxserve.servers.registry import RollbackPolicy

    d = RollbackPolicy()
    flags.DEFINE_string(
        "model_repository", None, "DIR laid out DIR/NAME/VERSION/: each name's newest version is loaded", flag_values=fv
    )
    flags.DEFINE_multi_string(
        "admin_key",
        None,
        "the jaxserve.v1.Admin service's key ('authorization: Bearer <key>' metadata; repeatable; default "
        "$JAXSERVE_ADMIN_KEY; none: the admin service refuses every call)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "sticky_metadata", None, "a metadata key whose value routes a client to one version (default: `user`)",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string("memory_budget", None, "bytes of weights + KV all loaded versions may hold", flag_values=fv)
    flags.DEFINE_float("rollback_window", d.window_seconds, "seconds of canary health kept", flag_values=fv)
    flags.DEFINE_integer("rollback_min_requests", d.min_requests, "requests before judging a canary", flag_values=fv)
    flags.DEFINE_float("rollback_error_margin", d.error_margin, "error-rate margin over the stable", flag_values=fv)
    flags.DEFINE_float("rollback_ttft_margin", d.ttft_margin, "TTFT p99 margin over the stable", flag_values=fv)
    flags.DEFINE_float("rollback_ttft_floor", d.ttft_floor_seconds, "... and by at least these seconds", flag_values=fv)
    flags.DEFINE_bool("auto_rollback", d.enabled, "roll a failing canary back to 0% by itself", flag_values=fv)


def engine_options_from_flags(fv) -> dict:
    """Parsed flags -> keyword arguments of jaxserve.llm.build_engine."""
    from jaxserve.options import engine_options_from_absl

    options = engine_options_from_absl(fv)
    options["compile_cache_dir"] = options["compile_cache_dir"] or None
    return options


def main(argv) -> None:
    from absl import app, flags

    from jaxserve.async_engine import AsyncEngine
    from jaxserve.llm import build_engine
    from jaxserve.multihost import follow_or_none, initialize, release_followers
    from jaxserve.config import parse_bytes
    from jaxserve.servers.registry import build_registry, engine_builder, policy_from_flags, start_specs

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fv = flags.FLAGS
    try:
        options = engine_options_from_flags(fv)
        specs = start_specs(fv.model, fv.model_repository, fv.model_name)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        memory_budget = None if fv.memory_budget is None else parse_bytes(fv.memory_budget)
    except ValueError as e:
        raise app.UsageError(f"--memory_budget: {e}") from None
    if fv.multihost:
        if len(specs) > 1:
            raise app.UsageError("--multihost: serves one model version (give one --model)")
        initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    options.pop("model")
    loaded = [s for s in specs if s.load]
    core = build_engine(model=loaded[0].path, **options)
    if follow_or_none(core) is None:  # processes other than 0 replay process 0's steps
        sys.exit(0)

    builder = engine_builder(options, fv.stream_buffer_tokens)
    policy = policy_from_flags(fv)
    first, registry = AsyncEngine(core, max_buffered_tokens=fv.stream_buffer_tokens), None
    try:
        registry = build_registry(
            specs, first, None if fv.multihost else builder, rollback=policy, memory_budget=memory_budget
        )
    except BaseException:
        first.shutdown()
        release_followers(core)
        raise
    limits = Limits(
        max_seqs_per_request=fv.max_seqs_per_request,
        max_response_bytes=fv.max_response_bytes,
        stream_write_timeout=fv.stream_write_timeout,
    )
    frontend = Frontend(
        registry=registry,
        stall_timeout=fv.stall_timeout,
        api_keys=api_keys_from(fv.api_key),
        limits=limits,
        prefix_cache_per_key=fv.prefix_cache_per_key,
        admin_keys=api_keys_from(fv.admin_key, "JAXSERVE_ADMIN_KEY"),
        sticky_header=fv.sticky_metadata,
    )

    def ready(port: int) -> None:
        print(f"[jaxserve-grpc] serving {frontend.model_name!r} on {fv.host}:{port}", file=sys.stderr, flush=True)

    try:
        code = asyncio.run(
            serve(
                frontend,
                fv.host,
                fv.port,
                drain_timeout=fv.drain_timeout,
                metrics_port=fv.metrics_port or None,
                ready_callback=ready,
            )
        )
    finally:
        registry.shutdown()
        release_followers(core)
    sys.exit(code)


def run(argv: list[str] | None = None) -> None:
    """Console entry point `jaxserve-grpc` (and `jaxserve grpc ...`, which passes its own argv)."""
    from absl import app

    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
