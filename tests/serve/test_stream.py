"""Triton's streaming inference (ModelStreamInfer) on a real server: tritonclient's stream API and
grpcio's, pipelined requests, errors per request, cancellation, the token check and SIGTERM."""

import asyncio
import queue
import re
import threading
import time

import grpc
import numpy as np
import tritonclient.grpc as triton

from helpers import ServerProcess, metric_value, running
from resserve.serve.package import load_package
from resserve.serve.rpc import Outcome, answer
from resserve.serve.settings import ServerSettings
from resserve.serve.state import ServerState
from resserve.serve.stream import Window
from resserve.serve.stubs import grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc

MODEL = "resnet-mnist"


def request_of(images: np.ndarray, request_id: str, model: str = MODEL) -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.astype(np.float32).tobytes())
    return request


def stream_stub(server) -> kserve_grpc.GRPCInferenceServiceStub:
    return kserve_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.target))


def stream_count(server, code: str) -> float:
    return metric_value(server.metrics(), "resserve_requests_total", protocol="grpc", api="kserve_stream",
                        model=MODEL, code=code)


def test_tritonclient_streams_the_mnist_test_set_pipelined_and_gets_the_exported_accuracy(server, mnist):
    """1,000 requests sent at once on one stream: every one answered OK (the stream's window holds
    the rest back, so the queue never overflows), each matched to its request by id."""
    client = triton.InferenceServerClient(server.target)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for index in range(1_000):
        tensor = triton.InferInput("input", [10, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(mnist.test.images[10 * index:10 * index + 10, None].astype(np.float32) / 255)
        client.async_stream_infer(MODEL, [tensor], request_id=str(index))
    predictions = {}
    for _ in range(1_000):
        result, error = answers.get(timeout=60)
        assert error is None, error
        predictions[int(result.get_response().id)] = result.as_numpy("logits").argmax(1)
    client.stop_stream()
    accuracy = float((np.concatenate([predictions[i] for i in range(1_000)]) == mnist.test.labels).mean())
    precision = client.get_model_config(MODEL).config.parameters["precision"].string_value
    manifest = load_package().manifest
    expected = manifest.accuracy.test if precision == "fp32" else manifest.reduced_precision[precision].test_accuracy
    assert accuracy == expected


def test_a_stream_of_a_client_that_pings_every_five_seconds_outlives_a_quiet_spell(server, mnist):
    """A client behind a load balancer with an idle timeout keeps its connection open with keepalive
    pings. gRPC core's server default allows one every 5 minutes while nothing else is sent: until
    2026-12-05 its third ping (15 s) ended the idle stream with UNAVAILABLE "Too many pings"."""
    pinging = triton.KeepAliveOptions(keepalive_time_ms=5_000, keepalive_permit_without_calls=True,
                                      http2_max_pings_without_data=0)
    client = triton.InferenceServerClient(server.target, keepalive_options=pinging)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(mnist.test.images[:1, None].astype(np.float32) / 255)
    for quiet in (0, 17):  # three pings of the client in the quiet spell
        try:  # the stream stays open: nothing comes, no error either
            ended = answers.get(timeout=quiet or 0.01)
        except queue.Empty:
            ended = None
        assert ended is None, f"the quiet stream ended: {ended[1]}"
        client.async_stream_infer(MODEL, [tensor])
        result, error = answers.get(timeout=10)
        assert error is None, error
        assert result.as_numpy("logits").argmax() == mnist.test.labels[0]
    client.stop_stream()


def test_each_answer_on_a_stream_says_it_is_the_last_as_tritons_streaming_clients_read_until(server, mnist):
    """Triton's clients for models that answer with several responses read until
    ``triton_final_response``, asking for an empty last response where a model sends none; a
    request here gets one response, which is its last, and no empty one after it."""
    client = triton.InferenceServerClient(server.target)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tensor = triton.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(mnist.test.images[:1, None].astype(np.float32) / 255)
    for request_id in ("a", "b"):
        client.async_stream_infer(MODEL, [tensor], request_id=request_id, enable_empty_final_response=True)
    received = []
    while len(received) < 2:  # as such a client reads: until each request's final response
        result, error = answers.get(timeout=30)
        assert error is None, error
        response = result.get_response()
        assert response.parameters["triton_final_response"].bool_param
        assert result.as_numpy("logits").argmax() == mnist.test.labels[0]
        received.append(response.id)
    client.stop_stream()  # waits for the stream to end: an empty response would be in the queue by then
    assert sorted(received) == ["a", "b"] and answers.empty()


def test_a_bad_request_on_a_stream_gets_its_error_and_the_stream_carries_on(server, mnist):
    good = mnist.test.images[:2, None] / 255
    requests = [request_of(good, "a"), request_of(good * 5, "b"), request_of(good, "c", model="no-such-model"),
                request_of(good, "d")]
    invalid_before = stream_count(server, "INVALID_ARGUMENT")
    call = stream_stub(server).ModelStreamInfer(iter(requests), timeout=30)
    responses = {r.infer_response.id: r for r in call}
    assert call.code() == grpc.StatusCode.OK and sorted(responses) == ["a", "b", "c", "d"]
    for request_id in "ad":
        assert responses[request_id].error_message == ""
        assert np.frombuffer(responses[request_id].infer_response.raw_output_contents[0], "<f4").shape == (20,)
    assert all(r.infer_response.parameters["triton_final_response"].bool_param for r in responses.values())
    assert responses["b"].error_message.startswith("input values must be in [0, 1]")
    assert responses["c"].error_message.startswith("unknown model 'no-such-model'")
    assert stream_count(server, "INVALID_ARGUMENT") == invalid_before + 1


def test_a_message_that_does_not_parse_gets_an_error_on_the_stream_which_carries_on(server, mnist):
    channel = grpc.insecure_channel(server.target)
    call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                 request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
    good = request_of(mnist.test.images[:1, None] / 255, "good").SerializeToString()
    first, second = (kserve_pb2.ModelStreamInferResponse.FromString(raw)
                     for raw in call(iter([b"\xff\xff\xff not protobuf", good]), timeout=30))
    assert first.error_message == ("the request message does not parse: Error parsing message with type "
                                   "'inference.ModelInferRequest'")
    assert second.error_message == "" and second.infer_response.id == "good"
    assert "Traceback" not in "".join(server.lines)


def test_cancelling_a_stream_leaves_its_queued_requests_uncomputed(server, mnist):
    """40 requests of 64 images (about 4 s of work here) on a stream cancelled after its first
    answer: the rest are skipped, not computed, and the server carries on."""
    images = mnist.test.images[:64, None] / 255
    ok_before, cancelled_before = stream_count(server, "OK"), stream_count(server, "CANCELLED")
    call = stream_stub(server).ModelStreamInfer(iter([request_of(images, str(i)) for i in range(40)]))
    next(call)
    call.cancel()
    time.sleep(1.0)
    ok, cancelled = stream_count(server, "OK") - ok_before, stream_count(server, "CANCELLED") - cancelled_before
    assert cancelled > 0 and ok < 20, (ok, cancelled)
    answer = next(stream_stub(server).ModelStreamInfer(iter([request_of(images[:1], "after")]), timeout=30))
    assert answer.error_message == "" and answer.infer_response.id == "after"
    assert "Traceback" not in "".join(server.lines)


def test_a_stream_without_the_token_is_refused_before_it_sends_anything(tmp_path, mnist):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    release = threading.Event()

    def nothing_yet():
        release.wait(10)
        yield from ()

    with ServerProcess("--token-file", str(tokens)) as server:
        stub, started = stream_stub(server), time.monotonic()
        call = stub.ModelStreamInfer(nothing_yet(), timeout=5)
        assert call.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() - started < 2
        release.set()
        request = request_of(mnist.test.images[:1, None] / 255, "x")
        (answer,) = stub.ModelStreamInfer(iter([request]), metadata=(("authorization", "Bearer s3cret"),), timeout=30)
        assert answer.error_message == "" and answer.infer_response.id == "x"


def test_sigterm_under_stream_load_answers_every_request_it_read(mnist):
    """Four streams, one request in flight each, through SIGTERM: every request the server read is
    answered, OK or 'shutting down' (UNAVAILABLE); the clients received exactly the OKs the
    server counted; a request still unread when the server exits fails with the stream."""
    images = mnist.test.images[:8, None] / 255
    with ServerProcess("--grace-seconds", "10", drain_seconds=1.0) as server:
        received = []

        def client(stop: threading.Event) -> None:
            while not stop.is_set():
                pending = queue.Queue()
                call = stream_stub(server).ModelStreamInfer(iter(pending.get, None), timeout=30)
                try:
                    for index in range(10_000):
                        pending.put(request_of(images, str(index)))
                        answer = next(call)
                        received.append(answer.error_message or "OK")
                        if stop.is_set():
                            break
                except (grpc.RpcError, StopIteration):
                    time.sleep(0.05)
                finally:
                    pending.put(None)

        with running(*[client] * 4):
            time.sleep(1.0)
            server.process.send_signal(15)
            assert server.process.wait(timeout=30) == 0
    answered = dict((code, int(n)) for code, n in re.findall(r"(\w+) (\d+)", "".join(server.lines).split(
        "requests answered: ")[1]))
    assert set(answered) <= {"OK", "UNAVAILABLE"}, answered
    assert answered["OK"] == received.count("OK") > 0
    assert {m for m in received if m != "OK"} <= {"the server is shutting down; retry on another replica"}


def test_a_stream_window_holds_a_batch_of_requests_and_its_bytes_and_lets_a_large_one_go_alone():
    async def scenario() -> list:
        window, seen = Window(max_requests=3, max_bytes=100), []

        async def take(size: int) -> None:
            await window.acquire(size)
            seen.append(size)

        for size in (10, 10, 10):
            await take(size)
        fourth = asyncio.create_task(take(10))  # a fourth request waits for room
        await asyncio.sleep(0.01)
        seen.append(("held", window.requests, window.bytes))
        await window.release(10)
        await fourth
        for _ in range(3):
            await window.release(10)
        large = asyncio.create_task(take(500))  # over the byte limit: alone, once the window is empty
        await asyncio.sleep(0.01)
        follower = asyncio.create_task(take(1))
        await asyncio.sleep(0.01)
        seen.append(("held", window.requests, window.bytes))
        await window.release(500)
        await asyncio.gather(large, follower)
        return seen

    assert asyncio.run(scenario()) == [10, 10, 10, ("held", 3, 30), 10, 500, ("held", 1, 500), 1]


def test_a_request_the_server_no_longer_accepts_is_answered_unavailable_and_counted():
    """What each request on a stream goes through after the drain window (and a unary call too)."""
    state = ServerState(ServerSettings())
    state.accepting = False

    async def never() -> None:
        raise AssertionError("a refused request must not run")

    response, outcome = asyncio.run(answer(state, "kserve_stream", "unknown", lambda: "ipv4:127.0.0.1:5", never))
    assert response is None and outcome == Outcome(grpc.StatusCode.UNAVAILABLE,
                                                   "the server is shutting down; retry on another replica")
    assert state.answered == {"UNAVAILABLE": 1} and state.in_flight == 0 and state.idle.is_set()
