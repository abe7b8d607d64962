"""Errors that users see, and the one place they become status codes (gRPC, and HTTP from those).

``ResserveError`` is the base of every expected failure (bad input, missing data, a refused
file). The CLI prints its message as one line and exits non-zero; the server answers with the
class's status code and the message: over gRPC as it is, over HTTP as the HTTP status that
``HTTP_STATUS`` pairs with it (as Triton and KServe pair them). Anything else is a bug: the server logs it and answers
INTERNAL with a generic message, never a stack trace or an internal path.
"""

from __future__ import annotations

import logging

import grpc
from pydantic import ValidationError

log = logging.getLogger("resserve.serve")


class ResserveError(Exception):
    """An expected failure with a message written for the user."""

    exit_code: int = 1
    status: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
    http_status: int | None = None  # where HTTP has a more precise status than ``status`` pairs with


class InvalidInput(ResserveError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class TooManyImages(InvalidInput):
    """More images in one request than --max-images-per-request, said in one wording on every API:
    the clients read the limit from it to send the request again in parts (serve/client/base.py)."""

    def __init__(self, limit: int, count: int | None = None) -> None:
        held = f"more than {limit}" if count is None else str(count)  # None: a form, refused before it is read whole
        super().__init__(f"{held} images in one request; the limit is {limit}")


class UnsupportedMediaType(InvalidInput):
    """A request body in a Content-Type or Content-Encoding the endpoint does not read (RFC 9110's 415)."""

    http_status = 415


class Unsupported(ResserveError):
    """A part of the KServe v2 / Triton protocol this server leaves out (CUDA shared memory, tracing),
    or one it serves only when started so (client shared memory)."""

    status = grpc.StatusCode.UNIMPLEMENTED


class ModelNotFound(ResserveError):
    status = grpc.StatusCode.NOT_FOUND


class RegionNotFound(ResserveError):
    """A shared memory region no client registered (serve/sharedmemory.py)."""

    status = grpc.StatusCode.NOT_FOUND


class RegionExists(ResserveError):
    status = grpc.StatusCode.ALREADY_EXISTS


class Forbidden(ResserveError):
    """Not for this client, whatever its token (a remote client registering shared memory)."""

    status = grpc.StatusCode.PERMISSION_DENIED


class QueueFull(ResserveError):
    """Retryable: the client should back off and try again (Triton answers the same)."""

    status = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(ResserveError):
    status = grpc.StatusCode.UNAVAILABLE


SHUTTING_DOWN_MESSAGE = "the server is shutting down; retry on another replica"


class DeadlineExpired(ResserveError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class TooLarge(ResserveError):
    """A request body over the size limit (gRPC refuses those itself, before the server sees them)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class BodyTimeout(ResserveError):
    """An HTTP request body that stopped arriving (RFC 9110's 408: the client may send it again)."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408


class Busy(ResserveError):
    """Retryable: the in-flight request budget is spent (gRPC core answers the same for its RPCs)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


MAX_MESSAGE_CHARS = 1000  # messages may quote client input; trailers must stay small


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc``."""
    if isinstance(exc, ResserveError):
        message = str(exc)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f"... ({len(message) - MAX_MESSAGE_CHARS:,} more characters)"
        return exc.status, message
    log.exception("internal error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error (details are in the server log)"


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's first error as ``field a.0.b: what is wrong`` (a count when there are more)."""
    errors = exc.errors()
    first = errors[0]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    if not first["loc"] and first["type"] == "value_error":  # a check across fields says it in its own words
        return f"{first['ctx']['error']}{more}"
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = {"missing": "missing", "extra_forbidden": "unknown field"}.get(first["type"], first["msg"])
    return f"field {field}: {message}{more}"


# The HTTP status each gRPC code is answered with over REST (Triton's and KServe's pairing).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client closed the request (nginx's convention)
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def to_http_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and message a REST client gets for ``exc``: ``to_status``, mapped."""
    code, message = to_status(exc)
    return getattr(exc, "http_status", None) or HTTP_STATUS.get(code, 500), message
