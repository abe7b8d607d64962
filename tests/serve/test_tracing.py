"""Triton's trace extension: the settings, from both tritonclients on a real server, and the
traces it logs (one request in trace_rate, at most trace_count, Triton's timestamps in order);
bad settings refused, nothing changed. The settings' rules alone, without a server, first."""

import http.server
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from PIL import Image
from tritonclient.utils import InferenceServerException

from helpers import ServerProcess, logged_since, traces, triton_infer
from resserve.serve.errors import InvalidInput
from resserve.serve.tracing import TraceLevel, Tracer, TraceSetting, TraceSettings

MODEL = "resnet-mnist"
DEFAULTS = {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1", "log_frequency": "0",
            "trace_file": "", "trace_mode": "triton"}
# Triton's order: the batcher's five between the request's start and end
TIMESTAMPS = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
              "COMPUTE_END", "REQUEST_END"]


# the settings' rules ------------------------------------------------------------------------------


def test_a_model_follows_the_server_in_each_setting_it_has_not_set():
    settings = TraceSettings().updated("", {"trace_level": ["TIMESTAMPS"], "trace_rate": "10"})
    settings = settings.updated(MODEL, {"trace_rate": ["1"]})  # gRPC's form: a list of strings
    assert settings.of(MODEL) == TraceSetting(TraceLevel.TIMESTAMPS, rate=1, count=-1)
    assert settings.of("other") == settings.of("") == TraceSetting(TraceLevel.TIMESTAMPS, rate=10, count=-1)
    later = settings.updated("", {"trace_level": "OFF"})
    assert later.of(MODEL).level is TraceLevel.OFF  # still following the server's level
    cleared = later.updated(MODEL, {"trace_rate": None})
    assert cleared.models == {} and cleared.of(MODEL) == cleared.of("")
    assert cleared.updated("", {"trace_rate": None, "trace_level": None}).server == TraceSetting()  # the defaults


@pytest.mark.parametrize("changes, message", [
    ({"trace_level": ["TENSORS"]}, "trace_level takes OFF or TIMESTAMPS (resserve traces no tensors)"),
    ({"trace_level": []}, "trace_level takes OFF or TIMESTAMPS"),
    ({"trace_level": {"a": []}}, "trace_level takes OFF or TIMESTAMPS (resserve traces no tensors), got {'a': []}"),
    ({"trace_level": [["TIMESTAMPS"]]}, "trace_level takes OFF or TIMESTAMPS"),
    ({"trace_rate": "0"}, "trace_rate takes a whole number >= 1, got '0'"),
    ({"trace_rate": "1.5"}, "trace_rate takes a whole number >= 1"),
    ({"trace_count": "-2"}, "trace_count takes a whole number >= -1, got '-2'"),
    ({"trace_count": ["1", "2"]}, "trace_count takes one value, got ['1', '2']"),
    ({"trace_count": True}, "trace_count takes one value, got True"),
    ({"trace_rate": "99999999999"}, "trace_rate takes a whole number >= 1"),
    ({"trace_file": "/etc/passwd"}, "trace_file takes '' only: traces go to the server's log"),
    ({"log_frequency": "100"}, "log_frequency takes '0' only: each trace is logged as it ends"),
    ({"trace_mode": "opentelemetry"}, "trace_mode takes 'triton' only"),
    ({"trace_rate": "1", "trace_sampler": "x"}, "unknown trace setting 'trace_sampler'; resserve's: trace_level, "),
])
def test_a_setting_resserve_does_not_take_is_refused_whole(changes, message):
    with pytest.raises(InvalidInput) as refused:
        TraceSettings().updated("", changes)
    assert str(refused.value).startswith(message)


def test_one_request_in_rate_is_traced_until_the_count_is_spent_and_each_update_counts_anew():
    tracer = Tracer()
    tracer.apply(TraceSettings().updated("", {"trace_level": "TIMESTAMPS", "trace_rate": "3", "trace_count": "2"}))
    traced = [tracer.start(MODEL, "1", "") is not None for _ in range(9)]
    assert traced == [True, False, False, True, False, False, False, False, False]
    assert tracer.current(MODEL).count == 0 and tracer.settings.of(MODEL).count == 2
    tracer.apply(tracer.settings.updated("", {"trace_count": "2"}))  # the same values again: counted anew
    assert tracer.current("").count == 2 and tracer.start(MODEL, "1", "") is not None
    tracer.apply(tracer.settings.updated(MODEL, {"trace_rate": "1", "trace_count": "-1"}))  # a model of its own
    assert all(tracer.start(MODEL, "1", "") for _ in range(5))
    assert tracer.start("other", "1", "") is not None and tracer.current("other").count == 1


# on a real server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as running:
        yield running


@pytest.fixture
def grpc_client(server):
    client = triton_grpc.InferenceServerClient(server.target)
    yield client
    client.update_trace_settings(MODEL, {"trace_level": None, "trace_rate": None, "trace_count": None})
    client.update_trace_settings(settings={"trace_level": None, "trace_rate": None, "trace_count": None})


def grpc_settings(response: dict) -> dict:
    """tritonclient.grpc's JSON answer, as the HTTP one has it."""
    return {name: value["value"] if name == "trace_level" else value["value"][0]
            for name, value in response["settings"].items()}


def test_both_clients_read_the_settings_triton_reports(server, grpc_client):
    assert grpc_settings(grpc_client.get_trace_settings(as_json=True)) == DEFAULTS
    assert triton_http.InferenceServerClient(server.http_target).get_trace_settings(MODEL) == DEFAULTS
    assert "trace" in grpc_client.get_server_metadata().extensions


def test_traced_requests_are_logged_with_their_timestamps_in_order_until_the_count_is_spent(server, grpc_client,
                                                                                             mnist):
    said = len(server.lines)
    set_to = grpc_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "2",
                                                         "trace_count": "2"}, as_json=True)
    assert grpc_settings(set_to) == {**DEFAULTS, "trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "2"}
    images = (mnist.test.images[:2, None] / 255.0).astype(np.float32)
    for _ in range(6):
        triton_infer(grpc_client, images)
    server.wait_for_line("resserve.trace", since=said, count=2)
    http = triton_http.InferenceServerClient(server.http_target)
    assert http.get_trace_settings()["trace_count"] == "0"  # spent: what is left, as Triton says
    triton_infer(http, images)
    logged = logged_since(server, said)
    assert len(logged) == 2 and [t["id"] for t in logged] == sorted(t["id"] for t in logged)
    for trace in logged:
        assert (trace["model_name"], trace["model_version"]) == (MODEL, "1") and "error" not in trace
        assert [stamp["name"] for stamp in trace["timestamps"]] == TIMESTAMPS
        times = [stamp["ns"] for stamp in trace["timestamps"]]
        assert times == sorted(times) and times[-1] - times[0] < 10e9


def test_a_model_of_its_own_settings_is_traced_apart_and_follows_the_server_once_cleared(server, grpc_client, mnist):
    http = triton_http.InferenceServerClient(server.http_target)
    said = len(server.lines)
    assert http.update_trace_settings(MODEL, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})["trace_rate"] == "1"
    assert http.get_trace_settings() == DEFAULTS  # the server's are as they were
    images = (mnist.test.images[:1, None] / 255.0).astype(np.float32)
    triton_infer(http, images)
    triton_infer(grpc_client, images)
    assert http.update_trace_settings(MODEL, {"trace_level": None, "trace_rate": None}) == DEFAULTS
    triton_infer(http, images)
    assert len(logged_since(server, said)) == 2


def test_the_classify_api_is_traced_too(server, grpc_client, mnist):
    said = len(server.lines)
    grpc_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    png = io.BytesIO()
    Image.fromarray(255 - mnist.test.images[0]).save(png, format="PNG")  # dark ink on white paper
    request = urllib.request.Request(f"{server.url}/v1/classify", data=png.getvalue(),
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    (trace,) = logged_since(server, said)
    assert trace["model_name"] == MODEL and [stamp["name"] for stamp in trace["timestamps"]] == TIMESTAMPS


def test_a_failed_request_is_traced_with_its_error(server, grpc_client):
    said = len(server.lines)
    grpc_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
    request = triton_grpc.InferInput("input", [1, 1, 28, 28], "UINT8")
    request.set_data_from_numpy(np.full((1, 1, 28, 28), 7, np.uint8))
    wrong = triton_grpc.InferRequestedOutput("no-such-output")
    with pytest.raises(InferenceServerException, match="unknown output 'no-such-output'"):
        grpc_client.infer(MODEL, [request], outputs=[wrong], request_id="bad-1")
    (trace,) = traces([server.wait_for_line("resserve.trace", since=said)])
    assert trace["request_id"] == "bad-1" and trace["error"].startswith("unknown output 'no-such-output'")
    assert [stamp["name"] for stamp in trace["timestamps"]] == ["REQUEST_START", "REQUEST_END"]


@pytest.mark.parametrize("settings, message", [
    ({"trace_level": ["TENSORS"]}, "trace_level takes OFF or TIMESTAMPS"),
    ({"trace_file": "/tmp/trace.json"}, "trace_file takes '' only"),
    ({"trace_rate": "1", "log_frequency": "10"}, "log_frequency takes '0' only"),
])
def test_a_bad_setting_is_refused_and_changes_nothing(server, grpc_client, settings, message):
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.update_trace_settings(settings=settings)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and message in refused.value.message()
    http = triton_http.InferenceServerClient(server.http_target)
    with pytest.raises(InferenceServerException) as refused:
        http.update_trace_settings(settings=settings)
    assert refused.value.status() == "400" and message in refused.value.message()
    assert http.get_trace_settings() == DEFAULTS


def test_a_model_the_server_does_not_have_is_not_found(server, grpc_client):
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.update_trace_settings("no-such-model", {"trace_rate": "1"})
    assert refused.value.status() == "StatusCode.NOT_FOUND" and "no-such-model" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        triton_http.InferenceServerClient(server.http_target).get_trace_settings("no-such-model")
    assert refused.value.status() == "404"


def test_a_server_traces_from_its_start_as_its_flags_say_and_goes_back_to_them(mnist):
    """--trace-level and --trace-rate (RESSERVE_TRACE_COUNT from the environment): a deployment's
    pods trace without a call to each; a setting cleared through the API goes back to the flag's."""
    with ServerProcess("--trace-level", "TIMESTAMPS", "--trace-rate", "2", env={"RESSERVE_TRACE_COUNT": "5"}) as traced:
        http = triton_http.InferenceServerClient(traced.http_target)
        started = {**DEFAULTS, "trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "5"}
        assert http.get_trace_settings() == started
        for _ in range(3):
            triton_infer(http, (mnist.test.images[:1, None] / 255.0).astype(np.float32))
        assert http.get_trace_settings()["trace_count"] == "3"  # the first and the third
        assert http.update_trace_settings(settings={"trace_rate": "7"})["trace_rate"] == "7"
        assert http.update_trace_settings(settings={"trace_rate": None, "trace_count": None}) == started
        assert len(logged_since(traced, 0)) == 2


def test_a_malformed_http_body_is_400(server):
    request = urllib.request.Request(f"{server.url}/v2/trace/setting", data=b"[1, 2]", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400
    assert json.loads(refused.value.read()) == {
        "error": 'the request must be a JSON object of trace settings, such as {"trace_rate": "1"}'}


# --trace-mode opentelemetry ---------------------------------------------------------------------


class OtlpCollector:
    """A stand-in for an OpenTelemetry collector: OTLP/HTTP's trace endpoint on loopback, keeping
    the spans sent to it, read with OpenTelemetry's own protobuf messages."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        spans, resources = self.spans, self.resources = [], []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                export = trace_service_pb2.ExportTraceServiceRequest.FromString(
                    self.rfile.read(int(self.headers["Content-Length"])))
                for batch in export.resource_spans:
                    resources.append({a.key: a.value.string_value for a in batch.resource.attributes})
                    spans.extend(span for scope in batch.scope_spans for span in scope.spans)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, seconds: float = 15) -> list:
        deadline = time.monotonic() + seconds
        while len(self.spans) < count:
            assert time.monotonic() < deadline, f"{len(self.spans)} spans of {count}"
            time.sleep(0.05)
        return list(self.spans)


def test_opentelemetry_mode_exports_spans_that_continue_the_callers_trace(mnist):
    """Each traced request is Triton's three spans (the request's, its model's, its compute), sent
    over OTLP/HTTP; a request carrying a W3C traceparent (gRPC metadata, HTTP header, Classify too)
    is traced whatever the rate, as a child of its caller's span; the others one in trace_rate."""
    pytest.importorskip("opentelemetry.sdk")  # the otel extra, which [dev] brings
    collector = OtlpCollector()
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    carried = {"traceparent": f"00-{caller_trace}-{caller_span}-01"}
    # spans sent in batches a minute apart: these are all sent when the server stops, after its drain
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    images = (mnist.test.images[:2, None] / 255.0).astype(np.float32)
    try:
        with ServerProcess("--trace-mode", "opentelemetry", "--trace-level", "TIMESTAMPS", env=env) as server:
            grpc_client = triton_grpc.InferenceServerClient(server.target)
            http_client = triton_http.InferenceServerClient(server.http_target)
            assert http_client.get_trace_settings()["trace_mode"] == "opentelemetry"
            with pytest.raises(InferenceServerException, match="trace_mode takes 'opentelemetry' only"):
                http_client.update_trace_settings(settings={"trace_mode": "triton"})
            triton_infer(grpc_client, images)  # the first of 1,000: traced, its own trace
            triton_infer(grpc_client, images)  # not in the rate: not traced
            grpc_client.infer(MODEL, [_tensor(triton_grpc, images)], headers=carried, request_id="r1")
            http_client.infer(MODEL, [_tensor(triton_http, images)], headers=carried)
            png = io.BytesIO()
            Image.fromarray(mnist.test.images[0]).save(png, format="PNG")
            urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/classify", data=png.getvalue(),
                                                          headers=carried), timeout=10).read()
            assert not traces(server.lines)  # spans, not log lines
            assert not collector.spans and server.stop() == 0
        spans = collector.wait_for(4 * 3)
    finally:
        collector.server.shutdown()
    time.sleep(0.2)
    assert len(collector.spans) == 12 and all(r["service.name"] == "resserve" for r in collector.resources)
    by_id = {span.span_id: span for span in spans}
    requests = [span for span in spans if span.name == "InferRequest"]
    continued = [span for span in requests if span.trace_id.hex() == caller_trace]
    assert len(requests) == 4 and len(continued) == 3
    assert all(span.parent_span_id.hex() == caller_span for span in continued)
    (own,) = [span for span in requests if span not in continued]
    assert not own.parent_span_id
    request_ids = []
    for request in requests:
        (model,) = [span for span in spans if span.parent_span_id == request.span_id]
        (compute,) = [span for span in spans if span.parent_span_id == model.span_id]
        assert (model.name, compute.name) == (MODEL, "compute") and by_id[model.parent_span_id] is request
        attributes = {a.key: a.value.string_value or a.value.int_value for a in model.attributes}
        assert attributes["triton.model_name"] == MODEL and attributes["triton.model_version"] == "1"
        request_ids.append(attributes.get("triton.request_id"))
        assert [e.name for e in model.events] == ["QUEUE_START"]
        assert [e.name for e in compute.events] == ["COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"]
        times = [request.start_time_unix_nano, model.events[0].time_unix_nano, compute.start_time_unix_nano,
                 *(e.time_unix_nano for e in compute.events), compute.end_time_unix_nano, request.end_time_unix_nano]
        assert times == sorted(times) and abs(request.start_time_unix_nano / 1e9 - time.time()) < 60
    assert sorted(request_ids, key=str) == [None, None, None, "r1"]


def _tensor(module, images: np.ndarray):
    tensor = module.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return tensor


def test_opentelemetry_mode_without_the_otel_extra_is_one_line(monkeypatch):
    import resserve.serve.settings as settings

    monkeypatch.setattr(settings, "otel_installed", lambda: False)
    with pytest.raises(settings.ResserveError, match=r"--trace-mode opentelemetry needs the OpenTelemetry SDK and "
                       r"its OTLP exporter: pip install 'resserve\[otel\]'"):
        settings.ServerSettings(trace_mode="opentelemetry")
