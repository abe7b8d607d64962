"""Errors that users see, and the one place they become gRPC status codes.

``ResserveError`` is the base of every expected failure (bad input, missing data, a refused
file). The CLI prints its message as one line and exits non-zero; the server answers with the
class's status code and the message. Anything else is a bug: the server logs it and answers
INTERNAL with a generic message, never a stack trace or an internal path.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger("resserve.serve")


class ResserveError(Exception):
    """An expected failure with a message written for the user."""

    exit_code: int = 1
    status: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION


class InvalidInput(ResserveError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ResserveError):
    status = grpc.StatusCode.NOT_FOUND


class QueueFull(ResserveError):
    """Retryable: the client should back off and try again (Triton answers the same)."""

    status = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(ResserveError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExpired(ResserveError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class TooLarge(ResserveError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ResserveError):
    status = grpc.StatusCode.UNAUTHENTICATED


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
