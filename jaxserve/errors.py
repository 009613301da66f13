"""The engine's own exceptions, in a leaf module (no jax): the API error mapping matches them by class without
importing the engine."""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """The waiting queue is at max_waiting_requests (admission: HTTP 429 / RESOURCE_EXHAUSTED)."""


ENGINE_STOPPED = "the engine stopped (the server log has its error)"  # what clients are told; never the error


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can be served (HTTP 503 / UNAVAILABLE)."""


class SlowConsumerError(RuntimeError):
    """A stream's reader fell too far behind (it stopped reading): the stream ended and its request was aborted
    (HTTP 408 / gRPC RESOURCE_EXHAUSTED, to a client that may never read it)."""
