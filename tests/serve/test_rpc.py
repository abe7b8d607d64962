"""serve/rpc.py: how a call is answered as its deadline passes, on a real grpc.aio server (its own
event loop, in a thread of this process), and in the server's log (serve/logs.py); the api
label every call is counted under."""

import asyncio
import gc
import logging
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc._cython.cygrpc import ExecuteBatchError

from resserve.serve.errors import DeadlineExpired
from resserve.serve.rpc import rpc
from resserve.serve.settings import ServerSettings
from resserve.serve.state import API_LABELS, ServerState
from resserve.serve.stream import InferStream
from resserve.serve.stubs import grpc_service_pb2 as pb

SERVICE, METHOD = "test.Deadlines", "Answer"
CALLS, AT_ONCE = 400, 4


class AtTheDeadline:
    """A servicer that works until its client's deadline, give or take a millisecond, and then
    finds it passed, as the server's own deadline checks do."""

    plane = SimpleNamespace(state=ServerState(ServerSettings()))

    @rpc("classify", model_of=lambda request: "")
    async def answer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.to_thread(time.sleep, max(0.0, context.time_remaining() + random.uniform(-0.001, 0.001)))
        raise DeadlineExpired("the deadline passed")


class ServerThread(threading.Thread):
    """A grpc.aio server on a loopback port until ``stop``; ``ended`` counts how its handler ended."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.port = 0
        self.ended: Counter = Counter()
        self.started = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stopping: asyncio.Future | None = None

    def run(self) -> None:
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._counted(AtTheDeadline().answer))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.stopping = self.loop.create_future()
        self.started.set()
        await self.stopping
        await server.stop(None)

    def _counted(self, method):
        async def handle(request, context):
            try:
                return await method(request, context)
            except BaseException as exc:
                self.ended[type(exc).__name__] += 1
                raise

        return handle

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set_result, None)
        self.join(timeout=10)


def test_a_call_answered_as_its_deadline_passes_ends_quietly(caplog):
    """gRPC core may end a call at its deadline while the server sends its status (a few calls in
    a hundred here). The handler must then end as grpc.aio takes quietly (aborted, or cancelled
    as if the client had gone): grpc.aio logs the send's ExecuteBatchError with a traceback
    otherwise."""
    server = ServerThread()
    server.start()
    server.started.wait(timeout=10)
    with caplog.at_level(logging.DEBUG, logger="grpc"), grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        codes = Counter()
        for _ in range(CALLS // AT_ONCE):
            for future in [call.future(b"", timeout=0.03) for _ in range(AT_ONCE)]:
                codes[future.code()] += 1
        time.sleep(0.1)  # the server's last answers
        server.stop()
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED: CALLS}
    assert set(server.ended) <= {"AbortError", "CancelledError"}, server.ended
    assert sum(server.ended.values()) >= CALLS // 2  # a call may end before its handler starts
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


class EndedStream:
    """A stream call that gRPC core has ended (its deadline passed, or the client went away) as its
    first two answers go out: both sends fail, as grpc.aio's do then (ExecuteBatchError), and the
    call stays open for reading until grpc.aio, told of the end, cancels the handler. Too rare to
    time on a real server (1 stream in 3,500 under random deadlines and cancellations, here)."""

    def __init__(self) -> None:
        self.requests = [pb.ModelInferRequest(id=str(number)) for number in range(2)]
        self.tried = 0

    async def read(self) -> pb.ModelInferRequest:
        if self.requests:
            return self.requests.pop()
        await asyncio.Event().wait()  # the client sends nothing more

    async def write(self, response: pb.ModelStreamInferResponse) -> None:
        self.tried += 1
        raise ExecuteBatchError("Failed \"execute_batch\"")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def test_a_stream_whose_answers_meet_the_end_of_its_call_ends_quietly(caplog):
    """Its answers' tasks end cancelled, as the stream does: they ended with the send's error,
    which no one awaited once the stream was cancelled (asyncio's "Task exception was never
    retrieved", with a traceback, in the server's log)."""
    async def infer(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        return pb.ModelInferResponse(id=request.id)

    async def stream_ends() -> None:
        stream = EndedStream()
        handler = asyncio.create_task(InferStream(AtTheDeadline.plane.state, stream, infer).run())
        while stream.tried < 2:
            await asyncio.sleep(0.01)
        handler.cancel()  # as grpc.aio does once it hears that the call ended
        with pytest.raises(asyncio.CancelledError):
            await handler

    with caplog.at_level(logging.DEBUG):
        asyncio.run(stream_ends())
        gc.collect()  # asyncio tells of an exception never retrieved when its task is collected
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert caplog.messages.count("the call ended (deadline, or the client went away) before a stream's answer "
                                 "could be sent") == 2


GRPC_LOGS_AN_ANSWER_NOT_SENT = textwrap.dedent("""
    import logging, sys
    from resserve.serve.logs import LogSettings, configure_logging
    configure_logging(LogSettings(verbose_level=int(sys.argv[1])))
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    try:
        raise RuntimeError("core refused the batch")
    except RuntimeError:  # as grpc.aio logs them (server.pyx.pxi, _handle_exceptions)
        grpc_log.exception("ExecuteBatchError raised in core by servicer method [/test.Deadlines/Answer]")
        grpc_log.exception("Unexpected [RuntimeError] raised by servicer method [/test.Deadlines/Answer]")
""")


def logged(verbose_level: int) -> str:
    result = subprocess.run([sys.executable, "-c", GRPC_LOGS_AN_ANSWER_NOT_SENT, str(verbose_level)],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stderr


def test_an_answer_grpc_could_not_send_as_its_call_ended_is_a_debug_line_not_an_error():
    """What grpc.aio logs when a handler's answer meets the end of its call (twice in 40,000
    requests with deadlines from 1 ms, too rare to time here), through the server's logging;
    grpc's other errors are logged as they were."""
    quiet = logged(verbose_level=0)
    assert "ExecuteBatchError" not in quiet
    assert quiet.count("Traceback") == 1 and "ERROR grpc._cython.cygrpc: Unexpected [RuntimeError]" in quiet
    assert ("DEBUG resserve.serve: the call ended (deadline, or the client went away) before its answer could be "
            "sent: [/test.Deadlines/Answer]") in logged(1)


def test_every_api_label_is_documented_and_another_is_refused():
    """A call counted under a label no dashboard knows of would drop out of its panels unseen."""
    serving = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    metrics = serving.split("\n## Metrics")[1].split("\n## ")[0]
    assert [api for api in sorted(API_LABELS) if f"`{api}`" not in metrics] == []
    with pytest.raises(ValueError, match="'kserve_metdata' is not an api label"):
        rpc("kserve_metdata", model_of=lambda request: "")
