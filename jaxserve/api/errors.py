"""One table of error kinds for every front end (Python API, HTTP, gRPC, batch).

    kind         HTTP  gRPC                 when
    validation   400   INVALID_ARGUMENT     a bad field, too long, out of range (the message names the field)
    too_large    413   RESOURCE_EXHAUSTED   the request body is over the limit
    headers      431   RESOURCE_EXHAUSTED   the request headers are over the limit
    admission    429   RESOURCE_EXHAUSTED   the waiting queue is full (refused at once, never queued)
    unavailable  503   UNAVAILABLE          draining, not warm yet, or the engine loop died
    not_found    404   NOT_FOUND            an unknown model (or path)
    conflict     409   FAILED_PRECONDITION  an admin action the model's state does not allow (unload a version
                                            that takes traffic, load one that is loading)
    forbidden    403   PERMISSION_DENIED    the admin API without the admin key (or with a user's API key)
    unauthenticated 401 UNAUTHENTICATED     --api-key is set and the request brings no key or a wrong one
    deadline     504   DEADLINE_EXCEEDED    the request's own timeout passed (its pages are freed)
    cancelled    499   CANCELLED            the client went away (nobody reads the answer)
    slow_client  408   RESOURCE_EXHAUSTED   a stream's client stopped reading (its buffer bound or write timeout)
    internal     500   INTERNAL             a bug; that request ends, the engine goes on

Front ends raise or catch `APIError`; `to_api_error` maps the engine's own exceptions onto the table. A bug's
text never reaches a client: it gets an incident id, the server log the exception (`internal_error`).
This module imports neither grpc nor an HTTP framework: servers look the codes up by name.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from jaxserve.errors import EngineDeadError, QueueFullError, SlowConsumerError


@dataclasses.dataclass(frozen=True)
class ErrorKind:
    name: str
    http_status: int
    grpc_code: str  # a grpc.StatusCode member name
    openai_type: str  # the OpenAI error object's "type"


VALIDATION = ErrorKind("validation", 400, "INVALID_ARGUMENT", "invalid_request_error")
TOO_LARGE = ErrorKind("too_large", 413, "RESOURCE_EXHAUSTED", "invalid_request_error")
HEADERS = ErrorKind("headers", 431, "RESOURCE_EXHAUSTED", "invalid_request_error")
ADMISSION = ErrorKind("admission", 429, "RESOURCE_EXHAUSTED", "rate_limit_error")
UNAVAILABLE = ErrorKind("unavailable", 503, "UNAVAILABLE", "service_unavailable")
NOT_FOUND = ErrorKind("not_found", 404, "NOT_FOUND", "not_found_error")
CONFLICT = ErrorKind("conflict", 409, "FAILED_PRECONDITION", "conflict_error")
FORBIDDEN = ErrorKind("forbidden", 403, "PERMISSION_DENIED", "permission_error")
UNAUTHENTICATED = ErrorKind("unauthenticated", 401, "UNAUTHENTICATED", "authentication_error")
DEADLINE = ErrorKind("deadline", 504, "DEADLINE_EXCEEDED", "timeout_error")
CANCELLED = ErrorKind("cancelled", 499, "CANCELLED", "cancelled")
SLOW_CLIENT = ErrorKind("slow_client", 408, "RESOURCE_EXHAUSTED", "slow_client_error")
INTERNAL = ErrorKind("internal", 500, "INTERNAL", "internal_error")


class APIError(Exception):
    """An error a client sees: its kind (status codes), a message and the field it is about (or None)."""

    def __init__(self, kind: ErrorKind, message: str, field: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"APIError({self.kind.name}, {self.message!r}, field={self.field!r})"

    def openai_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind.openai_type,
                "param": self.field,
                "code": self.kind.http_status,
            }
        }


class ValidationError(APIError, ValueError):
    """A bad request field. Also a ValueError, so Python API callers can catch it as one."""

    def __init__(self, field: str | None, message: str):
        super().__init__(VALIDATION, f"{field}: {message}" if field else message, field)


def field_of(message: str) -> str | None:
    """The field a ValueError message names: 'SamplingParams.top_p=2: ...' -> 'top_p', 'prompt: empty' ->
    'prompt'. Every validator in jaxserve starts its messages this way."""
    head = message.split(":", 1)[0].split("=", 1)[0].strip()
    head = head.rsplit(".", 1)[-1] if head.startswith(("SamplingParams.", "SchedulerConfig.")) else head
    return head if head and len(head) <= 64 and all(c.isalnum() or c in "_.[]" for c in head) else None


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception from validation or the engine onto the table (unknown exceptions are bugs)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(ADMISSION, f"server busy: {exc}; retry later")
    if isinstance(exc, EngineDeadError):
        return APIError(UNAVAILABLE, str(exc))
    if isinstance(exc, SlowConsumerError):
        return APIError(SLOW_CLIENT, str(exc))
    if isinstance(exc, ValueError):  # the engine's and SamplingParams' own checks name their field first
        message = str(exc)
        return APIError(VALIDATION, message, field_of(message))
    return internal_error(exc)


log = logging.getLogger("jaxserve.errors")


def internal_error(exc: BaseException, where: str = "a request") -> APIError:
    """A bug: logged here with its traceback under a fresh incident id; the client's message names only the id."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s: %s: %s", incident, where, type(exc).__name__, exc, exc_info=exc)
    return APIError(INTERNAL, f"internal error (incident {incident}; the server log has the details)")
