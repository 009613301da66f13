"""Counts XLA compilations in this process (from jax.monitoring events), so the engine can prove that
nothing compiles after warm-up and report persistent-cache hits."""

from __future__ import annotations

import threading

import jax

# Fired around every backend compile request (a real compile or a load from the persistent cache).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    """Process-wide counters; jax.monitoring listeners cannot be removed, so there is one instance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compiles = 0
        self.cache_hits = 0
        self.compile_seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == COMPILE_EVENT:
            with self._lock:
                self.compiles += 1
                self.compile_seconds += duration

    def _on_event(self, event: str, **_) -> None:
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.compiles, self.cache_hits


_counter: CompileCounter | None = None
_counter_lock = threading.Lock()


def compile_counter() -> CompileCounter:
    global _counter
    with _counter_lock:
        if _counter is None:
            _counter = CompileCounter()
        return _counter
