"""A server's life after start-up, shared by the HTTP and gRPC servers: serve until SIGTERM / SIGINT (or a
stop event), then drain; or until the engine loop dies or stalls (work pending, no progress for the stall
timeout), then exit non-zero."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

log = logging.getLogger("jaxserve.server")


async def wait_for_shutdown(frontend, stop_event: asyncio.Event | None = None, poll: float = 0.25) -> int:
    """Block until asked to stop (returns 0) or the engine dies (returns 1). Signal handlers are installed
    only on the main thread (tests run servers on other threads and stop them with `stop_event`)."""
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop_event.set)
    try:
        while not stop_event.is_set():
            status, why = frontend.liveness()  # (a version that died alone is failed; its traffic moved on)
            if status == "dead":
                log.error("the engine loop died (%r): shutting down", frontend.engine.error)
                return 1
            if status == "stalled":  # liveness: a wedged engine is as dead as a crashed one
                log.error("%s: shutting down", why)
                return 1
            try:
                await asyncio.wait_for(stop_event.wait(), poll)
            except asyncio.TimeoutError:
                pass
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def drain(frontend, timeout: float) -> None:
    """Stop admitting, let in-flight requests finish for up to `timeout` seconds, cancel the rest."""
    log.info("draining: %d requests in flight, up to %.0fs", frontend.num_inflight, timeout)
    cancelled = await frontend.drain(timeout)
    if cancelled:
        log.warning("drain timeout: cancelled %d requests", cancelled)
