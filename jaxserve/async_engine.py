"""`AsyncEngine`: the engine loop on a background thread, streams to asyncio callers.

    engine = AsyncEngine.start()                       # loads the default model, compiles, then serves
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].delta_text, end="")
    await engine.abort("r1")                           # from anywhere; the stream ends with finish_reason "abort"

The loop thread owns the engine: callers never touch it, they post commands (add, abort) to a queue that the
loop drains between steps, and get outputs through their own stream. A caller that stops iterating (client
gone, task cancelled) aborts its request, so its pages come back. If a step fails, every stream gets
`EngineDeadError` and the engine stops.

A caller that reads slower than the engine produces never makes the loop wait: the outputs it has not taken
are folded into one (`RequestOutput.add`), so a slow reader gets one output covering all it missed. What that
one output may hold is bounded (`max_buffered_tokens`): past it the stream ends with `SlowConsumerError` and
the request is aborted, so a client that stops reading costs the host a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence

from jaxserve.engine_api import Engine, EngineStats, ModelCard
from jaxserve.errors import ENGINE_STOPPED, EngineDeadError, SlowConsumerError
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

# Tokens (each logprob alternative counts as one more) an unread stream may hold before it is ended: ~ 200 bytes
# each, so ~ 6 MiB per stream at most.
MAX_BUFFERED_TOKENS = 32768

log = logging.getLogger("jaxserve.async_engine")


class AsyncEngine:
    def __init__(self, engine: Engine, *, max_buffered_tokens: int = MAX_BUFFERED_TOKENS):
        """max_buffered_tokens: what one stream may hold that its reader has not taken (tokens, each logprob
        alternative counting one more); past it the stream ends with SlowConsumerError and its request aborts."""
        if not isinstance(max_buffered_tokens, int) or max_buffered_tokens < 1:
            raise ValueError(f"max_buffered_tokens={max_buffered_tokens!r}: must be a positive integer")
        self.engine = engine
        self.max_buffered_tokens = max_buffered_tokens
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, OutputStream] = {}
        self._ids = itertools.count()
        self._dead: BaseException | None = None
        self._stopping = False
        # monotonic time of the loop's last progress: a step that ran work, or work arriving at an idle loop
        self.last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, model: str | None = None, **options) -> AsyncEngine:
        """Load a model and start serving it; options as `jaxserve.llm.build_engine`."""
        from jaxserve.llm import build_engine

        return cls(build_engine(model, **options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def model_card(self) -> ModelCard:
        return self.engine.model_card()

    def stats(self) -> EngineStats:
        """The engine's counters, read from the caller's thread while the loop runs (plain ints: a moment's
        values, each consistent on its own)."""
        return self.engine.stats()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def error(self) -> BaseException | None:
        """What stopped the loop, if it died."""
        return self._dead

    def stalled_for(self) -> float:
        """Seconds the loop has had work but not finished a step that ran any (0 while idle or moving): a step
        stuck on the device or in a broadcast, or steps that schedule nothing, both count."""
        if not self.engine.has_unfinished_requests():
            return 0.0
        return max(0.0, time.monotonic() - self.last_progress)

    # ---- the caller's side (any event loop) -----------------------------------------------------------------

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream this request's outputs (each carries the text so far and the delta); the last has
        finished=True. Bad input raises ValueError naming the field before the first output."""
        self._check_alive()
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        added: asyncio.Future = loop.create_future()
        params = params or SamplingParams()
        aggregate = params.output_kind is RequestOutputKind.DELTA
        stream = OutputStream(loop, self.max_buffered_tokens, aggregate)
        options = {"priority": priority, "cache_salt": cache_salt}
        self._commands.put(("add", (request_id, prompt, params, options, loop, stream, added)))
        finished = admitted = False
        try:
            try:
                await added  # raises the engine's validation / admission error, if any
            except asyncio.CancelledError:
                admitted = True  # the add may still go through: abort it (commands run in order)
                raise
            admitted = True
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = isinstance(item, SlowConsumerError)  # (the loop aborted it already)
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if admitted and not finished:  # only this caller's own request: never another of the same id
                self._commands.put(("abort_own", (request_id, stream)))

    async def abort(self, request_id: str) -> None:
        """End a request; its stream yields a last output with finish_reason "abort" (unless already done)."""
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(ENGINE_STOPPED) from self._dead
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")

    # ---- the loop thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                # Block for a command only when there is nothing to step: no busy wait.
                block = not engine.has_unfinished_requests()
                while True:
                    try:
                        kind, arg = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if not engine.has_unfinished_requests():  # work starts now: so does the stall clock
                        self.last_progress = time.monotonic()
                    if kind == "stop":
                        self._fail_all(EngineDeadError("the engine was shut down"))
                        return
                    self._handle(kind, arg)
                if engine.has_unfinished_requests():
                    steps = engine.stats().steps
                    outs = engine.step()
                    for out in outs:
                        self._deliver(out)
                    if outs or engine.stats().steps != steps:  # a step that ran work (an empty one is no progress)
                        self.last_progress = time.monotonic()
        except BaseException as e:  # the device step failed: nothing can be served any more
            log.exception("engine loop died")
            self._dead = e
            dead = EngineDeadError(ENGINE_STOPPED)
            dead.__cause__ = e  # (Python API callers read the cause; servers send only the message)
            self._fail_all(dead)

    def _handle(self, kind: str, arg) -> None:
        if kind == "add":
            request_id, prompt, params, options, loop, stream, added = arg
            try:
                if request_id in self._streams:
                    raise ValueError(f"request_id={request_id!r} is already in use")
                self.engine.add_request(request_id, prompt, params, **options)
            except Exception as e:  # validation / admission: this caller's error only
                _post(loop, _set_exception, added, e)
                return
            if not _post(loop, _set_result, added, None):  # its event loop closed meanwhile: nobody will read
                self.engine.abort_request(request_id)
                return
            self._streams[request_id] = stream
        elif kind in ("abort", "abort_own"):
            if kind == "abort_own":  # (a caller whose add was refused as a duplicate id owns no request)
                arg, stream = arg
                if self._streams.get(arg) is not stream:
                    return
            out = self.engine.abort_request(arg)
            if out is not None:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        if not stream.put(out):  # the caller's loop is closed, or it left too much unread: abort what it left
            self._streams.pop(out.request_id, None)
            self.engine.abort_request(out.request_id)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.fail(error)
        self._streams.clear()
        while True:  # callers waiting on an add
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                _post(arg[4], _set_exception, arg[6], error)


class OutputStream:
    """One request's outputs, from the loop thread to the caller's event loop. What the caller has not taken
    yet is one output (later ones are folded into it), of at most `limit` tokens; past that the stream fails."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, aggregate: bool):
        self.loop = loop
        self.limit = limit
        self.aggregate = aggregate  # DELTA outputs: text and tokens join when folded
        self._lock = threading.Lock()
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._buffered = 0  # tokens (+ logprob alternatives) in _pending
        self._woken = False  # a wake-up is posted and the caller has not taken what it announced
        self._ready = asyncio.Event()

    # the loop thread

    def put(self, out: RequestOutput) -> bool:
        """Hand over an output; False when the stream cannot take it (closed loop, or over the bound: the caller
        then gets SlowConsumerError) and the request should be aborted."""
        size = sum(len(c.delta_token_ids) * (1 + _alternatives(c)) for c in out.outputs)
        with self._lock:
            if self._error is not None:
                return False
            if self._pending is None:
                self._pending, self._buffered = out, size
            else:
                self._pending.add(out, self.aggregate)
                self._buffered += size
            taken = self._buffered <= self.limit or out.finished
            if taken:
                wake, self._woken = not self._woken, True
            else:
                wake = self._end_locked(
                    SlowConsumerError(
                        f"the stream was ended: its reader fell {self._buffered} tokens behind (the limit is "
                        f"{self.limit}; logprob alternatives count as tokens)"
                    )
                )
        if wake and not _post(self.loop, self._ready.set):
            return False
        return taken

    def fail(self, error: BaseException) -> None:
        with self._lock:
            wake = self._end_locked(error)
        if wake:
            _post(self.loop, self._ready.set)

    def _end_locked(self, error: BaseException) -> bool:
        """End the stream with `error` (under the lock); whether the caller needs a wake-up."""
        self._pending, self._error = None, error
        wake, self._woken = not self._woken, True
        return wake

    # the caller's event loop

    async def get(self) -> RequestOutput | BaseException:
        while True:
            with self._lock:
                item = self._pending if self._pending is not None else self._error
                if item is not None:
                    self._pending, self._buffered, self._woken = None, 0, False
                    return item
                self._ready.clear()
            await self._ready.wait()


def _alternatives(comp) -> int:
    """Logprob entries per token of a completion (0 without logprobs)."""
    return len(comp.logprobs[-1]) if comp.logprobs else 0


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Run fn(*args) on a caller's event loop; False if that loop is closed (the caller is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, error: BaseException) -> None:
    if not fut.done():
        fut.set_exception(error)
