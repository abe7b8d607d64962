"""Triton's streaming inference (``ModelStreamInfer``): many inference requests on one gRPC call.

A unary call pays gRPC's per-call cost (a new HTTP/2 stream, headers, trailers, and in grpc.aio
several hops between its poller thread and the event loop) for every request: on two CPUs that
cost, not the model, is what a Python server runs out of first (docs/benchmarks.md). On a stream
each request is one message each way. Every request gets exactly one response, written as soon
as it is computed (so not necessarily in the order sent: a client matches them by ``id``, as
with Triton), and the requests of one stream run concurrently, so they batch with each other and
with everyone else's. A request's error is its response's ``error_message`` and the stream
carries on; the stream itself ends OK when the client closes its side and every response is out.
Each response says it is its request's last (``triton_final_response``), as Triton's do.

A stream has at most ``--max-batch-size`` requests and ``--max-message-bytes`` of them in
flight (enough to fill a batch on its own), plus the one it has just read, which waits for room;
meanwhile nothing more is read and gRPC's flow control holds the client back, rather than the
queue overflowing. So a stream costs what two unary calls at most do in memory.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import grpc

from resserve.serve.rpc import Malformed, answer, unless_ended
from resserve.serve.state import ServerState
from resserve.serve.stubs import grpc_service_pb2 as pb

Infer = Callable[[pb.ModelInferRequest], Awaitable[pb.ModelInferResponse]]

# Set on every response, as Triton sets it on each of a stream's responses (true on the last of a
# request's, and a request here gets one): Triton's streaming clients, written for models that
# answer a request with several responses, read until it is true (with or without
# enable_empty_final_response), and would wait for ever, or fail on its absence, without it.
FINAL_RESPONSE = "triton_final_response"


class Window:
    """What one stream may have in flight: at most ``max_requests`` requests and ``max_bytes`` of
    them (a single larger request goes alone). Waiting for room stops the stream's reading."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = self.bytes = 0
        self._changed = asyncio.Condition()

    def _room_for(self, size: int) -> bool:
        return self.requests == 0 or (self.requests < self.max_requests and self.bytes + size <= self.max_bytes)

    async def acquire(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._room_for(size))
            self.requests += 1
            self.bytes += size

    async def release(self, size: int) -> None:
        async with self._changed:
            self.requests -= 1
            self.bytes -= size
            self._changed.notify_all()


def _depth(state: ServerState) -> int:
    """Requests one stream may have in flight: a largest batch's worth, within the queue's size."""
    models = state.repository.models if state.repository else ()
    largest = max((model.batcher.config.max_batch_size for model in models), default=1)
    return max(1, min(largest, state.settings.batching.max_queue_size))


class InferStream:
    """One ``ModelStreamInfer`` call: reads requests, runs each with ``infer``, writes each answer."""

    def __init__(self, state: ServerState, context: grpc.aio.ServicerContext, infer: Infer) -> None:
        self.state = state
        self.context = context
        self.infer = infer
        self.window = Window(_depth(state), state.settings.max_message_bytes)
        self.writing = asyncio.Lock()  # gRPC sends one message at a time per call
        self.running: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Until the client closes its side; then every response is written and the call ends OK.
        Cancelled (the client went away, or its deadline passed): the requests still running are
        cancelled with it, and their batch-mates carry on."""
        try:
            while (request := await self.context.read()) is not grpc.aio.EOF:
                if isinstance(request, Malformed):  # answered at once; the stream carries on
                    await self._write(pb.ModelStreamInferResponse(error_message=request.reason))
                    continue
                size = request.ByteSize()
                await self.window.acquire(size)
                task = asyncio.create_task(self._answer(request, size))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
            await asyncio.gather(*self.running)
        finally:
            for task in self.running:
                task.cancel()

    async def _answer(self, request: pb.ModelInferRequest, size: int) -> None:
        try:
            await self._write(await self._response(request))
        finally:
            await self.window.release(size)

    async def _write(self, response: pb.ModelStreamInferResponse) -> None:
        async with self.writing:
            with unless_ended("a stream's answer"):
                await self.context.write(response)

    async def _response(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        model = self.state.model_label("kserve_stream", request.model_name)
        response, outcome = await answer(self.state, "kserve_stream", model, self.context.peer,
                                         lambda: self.infer(request))
        error = "" if response is not None else outcome.message
        if response is None:
            response = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                             id=request.id)
        response.parameters[FINAL_RESPONSE].bool_param = True
        return pb.ModelStreamInferResponse(error_message=error, infer_response=response)
