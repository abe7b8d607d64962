"""What every RPC handler shares: the server's state, deadlines, and the error/metrics wrapper."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import grpc

from resserve.serve.errors import ShuttingDown, to_status
from resserve.serve.metrics import Metrics
from resserve.serve.repository import ModelRepository
from resserve.serve.settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)
    repository: ModelRepository | None = None  # None while models load
    ready: bool = False  # every model loaded and warmed, and not draining
    accepting: bool = True  # False once the drain is over: new requests get UNAVAILABLE
    in_flight: int = 0  # requests accepted and not yet answered
    answered: Counter = field(default_factory=Counter)  # status code name -> requests answered

    def model_label(self, requested: str) -> str:
        """The metrics label for a requested model name: bounded, so clients cannot mint labels."""
        if self.repository is None:
            return "unknown"
        name = requested or self.repository.default
        return name if name in self.repository.models else "unknown"

    def models(self) -> ModelRepository:
        if self.repository is None:
            raise ShuttingDown("models are still loading; retry shortly")
        return self.repository


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the time.monotonic() clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def rpc(api: str, model_of: Callable[[object], str]):
    """Wrap a servicer method: typed errors become their status codes, and every answer is counted.

    This is the one place where exceptions meet gRPC: the client gets a status code and a
    message written for it; unexpected errors are logged and answered INTERNAL, generically.
    """

    def decorate(method):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            state: ServerState = self.state
            model = state.model_label(model_of(request))
            started = time.monotonic()
            code = grpc.StatusCode.OK
            state.in_flight += 1
            try:
                if not state.accepting:
                    raise ShuttingDown("the server is shutting down; retry on another replica")
                return await method(self, request, context)
            except asyncio.CancelledError:  # the client went away; its batch-mates carry on
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                code, message = to_status(exc)
                await context.abort(code, message)
            finally:
                state.in_flight -= 1
                state.answered[code.name] += 1
                state.metrics.requests.labels(api, model, code.name).inc()
                state.metrics.latency.labels(api, model).observe(time.monotonic() - started)

        return handler

    return decorate
