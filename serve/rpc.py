"""The wrapper every gRPC method goes through: typed errors become status codes, answers are counted.

This is the one place where exceptions meet gRPC: the client gets a status code and a message
written for it; unexpected errors are logged and answered INTERNAL, generically.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Callable

import grpc

from resserve.serve.errors import to_status


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the time.monotonic() clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def rpc(api: str, model_of: Callable[[object], str], inference: bool = False):
    """Wrap a servicer method of a class with a ``plane`` (DataPlane) attribute; ``inference``
    methods count in the model's statistics too."""

    def decorate(method):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            state = self.plane.state
            model = state.model_label(model_of(request))
            started = state.admit()
            code = grpc.StatusCode.OK
            try:
                state.check_accepting()
                return await method(self, request, context)
            except asyncio.CancelledError:  # the client went away; its batch-mates carry on
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                code, message = to_status(exc)
                await context.abort(code, message)
            finally:
                state.finish("grpc", api, model, code.name, code == grpc.StatusCode.OK, started, inference)

        return handler

    return decorate
