"""Where gRPC requests are admitted and counted, and typed errors become status codes.

This is the one place where exceptions meet gRPC: the client gets a status code and a message
written for it; unexpected errors are logged and answered INTERNAL, generically. A unary method
goes through ``rpc``; each request on an inference stream (serve/stream.py) through ``answer``.
Every service (ours, health, reflection) is registered through ``Registrar``, so a request
message that does not parse is answered INVALID_ARGUMENT too (grpc.aio's own answer is UNKNOWN,
with a traceback in the log for every such message).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from resserve.serve.errors import log, to_status
from resserve.serve.state import ServerState, check_api_label

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the time.monotonic() clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def metadata_of(context: grpc.aio.ServicerContext) -> Callable[[], dict[str, str]]:
    """The call's metadata (its text entries), read only when asked: by a trace that may continue
    its caller's (serve/tracing.py)."""
    return lambda: {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


def peer_host(peer: str) -> str | None:
    """The client's IP address in gRPC's ``context.peer()`` ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000",
    which newer gRPC writes "ipv6:%5B::1%5D:5000"); None for other transports."""
    kind, _, address = urllib.parse.unquote(peer).partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0]
    if kind == "ipv6":
        return address.rpartition(":")[0].strip("[]")
    return None


@contextmanager
def unless_ended(what: str) -> Iterator[None]:
    """Send ``what`` within: when gRPC core has just ended the call (its deadline passed, or the
    client went away), the send fails (ExecuteBatchError, an InternalError), and grpc.aio, when its
    notice of the end comes later, logs that failure with a traceback; a stream's answering task
    ended with it, which no one awaited any more. The client has its status or is gone, so the
    sender ends as one whose client went away: cancelled, with a debug line."""
    try:
        yield
    except grpc.aio.InternalError as exc:
        log.debug("the call ended (deadline, or the client went away) before %s could be sent", what)
        raise asyncio.CancelledError from exc


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and ``message`` (``context.abort``), also when gRPC core has just
    ended it (a deadline that passes as the server answers, the server's own deadline check most
    often): then as ``unless_ended`` says."""
    with unless_ended(f"its status {code.name}"):
        await context.abort(code, message)


@dataclass
class Outcome:
    """How a request was answered: OK, or a status code and the message for the client."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


async def answer(state: ServerState, api: str, model: str, peer: Callable[[], str],
                 work: Callable[[], Awaitable[T]]) -> tuple[T | None, Outcome]:
    """Admit a request from ``peer()`` (refused once the server stops accepting), run ``work``, and
    count the request out with its outcome. An error is not raised: it becomes the outcome's code and
    message, for the caller to answer with; a cancellation (the client went away) propagates."""
    outcome = Outcome()
    started = state.admit()
    try:
        state.check_accepting()
        return await work(), outcome
    except asyncio.CancelledError:  # its batch-mates carry on
        outcome.code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to a status here
        outcome.code, outcome.message = to_status(exc)
        return None, outcome
    finally:
        state.finish("grpc", api, model, outcome.code.name, started, peer, outcome.message)


def rpc(api: str, model_of: Callable[[object], str]):
    """Wrap a unary servicer method of a class with a ``plane`` (DataPlane) attribute."""
    check_api_label(api)

    def decorate(method):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            state = self.plane.state
            response, outcome = await answer(state, api, state.model_label(api, model_of(request)), context.peer,
                                             lambda: method(self, request, context))
            if outcome.code != grpc.StatusCode.OK:
                await abort(context, outcome.code, outcome.message)
            return response

        return handler

    return decorate


@dataclass(frozen=True)
class Malformed:
    """A request message that did not parse: what a method gets in its place (see ``Registrar``)."""

    reason: str


def _tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return Malformed(f"the request message does not parse: {exc}")

    return parse


def _refusing_malformed(behavior):
    """A method with one request that never sees ``Malformed``: the client gets INVALID_ARGUMENT."""

    async def handle(request, context: grpc.aio.ServicerContext):
        if isinstance(request, Malformed):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        return await behavior(request, context)

    return handle


def _ending_at_malformed(behavior):
    """A bidirectional stream (an async generator, as grpc_reflection's) that never sees
    ``Malformed``: the stream ends INVALID_ARGUMENT at the first message that does not parse."""
    if not inspect.isasyncgenfunction(behavior):
        raise TypeError(f"{behavior!r}: a stream that does not read Malformed must be an async generator")

    async def parsed(requests, context: grpc.aio.ServicerContext):
        async for request in requests:
            if isinstance(request, Malformed):
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            yield request

    async def handle(requests, context: grpc.aio.ServicerContext):
        async for response in behavior(parsed(requests, context), context):
            yield response

    return handle


class Registrar:
    """Stands for the server in a generated ``add_*Servicer_to_server``: registers the service's
    methods with request deserializers that do not raise. A method with one request (unary, or
    server-streaming like health's Watch) answers a message that does not parse INVALID_ARGUMENT;
    a bidirectional stream ends with it, or, with ``streams_read_malformed``, its handler reads
    the message as ``Malformed`` (our inference stream answers it in-stream and carries on)."""

    def __init__(self, server: grpc.aio.Server, streams_read_malformed: bool = False) -> None:
        self.server = server
        self.streams_read_malformed = streams_read_malformed

    def add_generic_rpc_handlers(self, handlers) -> None:
        """The generated code's generic handler holds the raw methods: the one made in
        ``add_registered_method_handlers`` replaces it."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        guarded = {name: self._guarded(handler) for name, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        self.server.add_registered_method_handlers(service, guarded)

    def _guarded(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        tolerant = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary:
            return tolerant._replace(unary_unary=_refusing_malformed(handler.unary_unary))
        if handler.unary_stream:
            return tolerant._replace(unary_stream=_refusing_malformed(handler.unary_stream))
        if handler.stream_stream and self.streams_read_malformed:
            return tolerant
        if handler.stream_stream:
            return tolerant._replace(stream_stream=_ending_at_malformed(handler.stream_stream))
        return handler
