"""Triton's perf_analyzer (C++) against a real server: the tool Triton's users measure servers
with must run against ours unchanged, over gRPC (a call per request, and streaming) and HTTP, with
the tensors in the request or in system shared memory.

perf_analyzer reads the model's config, sends real test digits, and reads the server's
statistics extension after each window; it aborts when any of that does not hold together (it
did: compute_input and compute_output counted nothing). tests/install-perf-analyzer.sh puts it
in the virtualenv; .ci/run does.
"""

import csv
import json
import re
import subprocess

import pytest
import tritonclient.http as triton_http

from helpers import PERF_ANALYZER, ServerProcess, needs_perf_analyzer

MODEL = "resnet-mnist"
SHARED_MEMORY = ("--shared-memory", "system", "--output-shared-memory-size", "40")  # 10 FP32 scores an image
pytestmark = needs_perf_analyzer


@pytest.fixture(scope="module")
def server():
    """Default settings, and client shared memory allowed (perf_analyzer --shared-memory system)."""
    with ServerProcess("--allow-client-shm") as process:
        yield process


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist):
    """perf_analyzer's input data: 16 test digits, scaled to [0, 1] as the FP32 input wants."""
    path = tmp_path_factory.mktemp("perf_analyzer") / "digits.json"
    samples = [{"input": {"content": (image / 255.0).ravel().tolist(), "shape": [1, 28, 28]}}
               for image in mnist.test.images[:16]]
    path.write_text(json.dumps({"data": samples}))
    return path


def perf_analyzer(server, digits, tmp_path, *protocol: str, batch: int = 1) -> dict[str, float]:
    """One run at concurrency 2, 100 requests per window: perf_analyzer's CSV row."""
    assert PERF_ANALYZER, "the test needs Triton's perf_analyzer: bash tests/install-perf-analyzer.sh"
    report = tmp_path / "report.csv"
    target = server.http_target if "http" in protocol else server.target
    done = subprocess.run(
        [PERF_ANALYZER, "-m", MODEL, "-u", target, *protocol, "-b", str(batch), "--input-data", str(digits),
         "--concurrency-range", "2", "--measurement-mode", "count_windows", "--measurement-request-count", "100",
         "--stability-percentage", "100", "-f", str(report)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = csv.DictReader(report.open())
    return {key: float(value) for key, value in row.items()}


@pytest.mark.parametrize("protocol", [("-i", "grpc"), ("-i", "grpc", "--streaming"), ("-i", "http"),
                                      ("-i", "grpc", *SHARED_MEMORY), ("-i", "grpc", "--streaming", *SHARED_MEMORY),
                                      ("-i", "http", *SHARED_MEMORY)],
                         ids=["grpc", "grpc-streaming", "http", "grpc-shared-memory", "grpc-streaming-shared-memory",
                              "http-shared-memory"])
def test_perf_analyzer_measures_the_server(server, digits, tmp_path, protocol):
    said = len(server.lines)
    row = perf_analyzer(server, digits, tmp_path, *protocol)
    if "--shared-memory" in protocol:  # its tensors went through the regions it registered
        assert any(re.search(r"shared memory region \w+ registered", line) for line in server.lines[said:])
    assert row["Inferences/Second"] > 0 and 0 < row["p50 latency"] <= row["p99 latency"]
    # from the server's statistics extension, which perf_analyzer checks for consistency
    assert row["Server Compute Infer"] > 0 and row["Server Queue"] >= 0


def test_perf_analyzer_batches_of_eight(server, digits, tmp_path):
    row = perf_analyzer(server, digits, tmp_path, "-i", "grpc", batch=8)
    assert row["Inferences/Second"] > 0 and row["Server Compute Infer"] > 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_sets_the_trace_settings_and_the_server_traces_as_they_say(server, digits, tmp_path, protocol):
    """perf_analyzer's --trace-* options failed at start (UNIMPLEMENTED, 501) before the trace extension."""
    said = len(server.lines)
    try:
        row = perf_analyzer(server, digits, tmp_path, "-i", protocol, "--trace-level", "TIMESTAMPS",
                            "--trace-rate", "10", "--trace-count", "5")
    finally:
        triton_http.InferenceServerClient(server.http_target).update_trace_settings(
            settings={"trace_level": None, "trace_rate": None, "trace_count": None})
    assert row["Inferences/Second"] > 0
    server.wait_for_line("'trace_level': ['OFF']", since=said)  # logged after every trace
    traces = [json.loads(line.split(" resserve.trace: ", 1)[1]) for line in server.lines[said:]
              if " resserve.trace: " in line]
    # perf_analyzer sends its settings three or four times, and may start its requests before the
    # last is answered; that one starts the count anew (as each update does), so one more may be taken
    assert 5 <= len(traces) <= 6, "".join(server.lines[said:])[-6000:]
    assert all(trace["timestamps"][-2]["name"] == "COMPUTE_END" for trace in traces)

