"""The benchmark commands run end to end and report sane numbers (speed itself is measured in
docs/benchmarks.md, not asserted here)."""

import json
import time

import numpy as np
import pytest
from rich.table import Table

from helpers import ServerProcess, ingress, needs_perf_analyzer, run_cli
from resserve.serve.bench.clients import Level, LoadSpec
from resserve.serve.bench.load import measure_level
from resserve.serve.bench.report import print_unsqueezed
from resserve.serve.errors import ResserveError
from resserve.serve.timing import MIN_REPEATS, median_seconds


def test_bench_train_compares_against_the_naive_loop(tmp_path, mnist):
    out = tmp_path / "train.json"
    result = run_cli("bench", "train", "--steps", "2", "--warmup", "1", "--batch-size", "16", "--json", str(out),
                     "--data-dir", str(mnist.path.parent))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [row["config"].split(":")[0] for row in report["rows"]] == ["naive", "resserve train"]
    assert all(row["images_per_second"] > 0 for row in report["rows"])
    assert report["speedup"] > 0 and "speedup" in result.stdout


def test_bench_model_reports_every_runner(tmp_path, mnist):
    out = tmp_path / "model.json"
    result = run_cli("bench", "model", "--seconds", "0.2", "--json", str(out), "--data-dir", str(mnist.path.parent))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    names = [row["config"] for row in report["rows"]]
    assert names[:4] == ["eager, unfolded (PyTorch)", "eager, BN folded (PyTorch)", "ONNX Runtime fp32", "TorchScript fp32"]
    for row in report["rows"]:
        assert row["batch1_latency_ms"] > 0 and set(row["images_per_second"]) == {"64", "256"}
        assert min(row["images_per_second"].values()) > 0
    assert report["ratios"]["onnx_fp32_over_eager_unfolded_batch64"] > 0


def test_a_latency_median_stops_at_its_time_budget_but_not_below_ten_calls():
    calls = []

    def slow() -> None:
        calls.append(1)
        time.sleep(0.01)

    assert median_seconds(slow, repeats=500, warmup=0, max_seconds=0.1) >= 0.01
    assert 10 <= len(calls) <= 20  # 500 calls would take 5 s
    calls.clear()
    median_seconds(slow, repeats=500, warmup=0, max_seconds=0)
    assert len(calls) == MIN_REPEATS


def test_a_wide_report_table_keeps_every_header_whole_on_an_80_column_pipe(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    headers = [f"column {i} header" for i in range(15)]
    table = Table(*headers)
    table.add_row(*(f"{1234.5678 * i:.3f}" for i in range(15)))
    print_unsqueezed(table)
    printed = capsys.readouterr().out
    assert all(header in printed for header in headers) and "…" not in printed
    assert max(map(len, printed.splitlines())) > 80


def test_bench_model_on_cuda_without_the_cuda_build_names_the_install(mnist):
    result = run_cli("bench", "model", "--device", "cuda", "--data-dir", str(mnist.path.parent))
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (1, (
        "error: --device cuda: this ONNX Runtime is the CPU build; install the CUDA build in its place: "
        "pip uninstall -y onnxruntime && pip install 'resserve[gpu]'"))


# A proxy named for every host, loopback included, as a machine behind a corporate proxy may name
# one; the servers --start starts are reached directly all the same (nothing listens on the discard port)
PROXY_ELSEWHERE = {**{name: "http://127.0.0.1:9" for name in ("grpc_proxy", "https_proxy", "http_proxy", "HTTP_PROXY")},
                   **{name: "" for name in ("no_grpc_proxy", "no_proxy", "NO_PROXY")}}


def test_bench_serve_starts_servers_and_writes_table_json_and_plot(tmp_path):
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    result = run_cli("bench", "serve", "--start", "--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.2",
                     "--backends", "onnxruntime,auto,openvino:fp32", "--json", str(out), "--plot", str(plot),
                     env=PROXY_ELSEWHERE)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["servers"]) == {"onnxruntime, batched", "auto, batched", "openvino:fp32, batched",
                                      "onnxruntime, unbatched (max batch 1)"}
    assert report["runtimes"]["onnxruntime, batched"] == "onnxruntime fp32"
    assert report["runtimes"]["openvino:fp32, batched"] == "openvino fp32"
    assert set(report["in_process"]) == {"onnxruntime fp32", "openvino fp32", report["runtimes"]["auto, batched"]}
    openvino = report["summary"]["openvino:fp32, batched"]  # against OpenVINO's own in-process limit
    assert openvino["peak_over_in_process"] > 0 and openvino["peak_over_onnxruntime_batched"] > 0
    for rows in report["servers"].values():
        assert [r["concurrency"] for r in rows] == [1, 4]
        for r in rows:
            assert r["ok"] > 0 and r["errors"] == {}
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
            assert r["mean_batch_size"] >= 1
    assert report["in_process"]["onnxruntime fp32"][0]["batch"] == 1
    assert set(report["summary"]["onnxruntime, batched"]["batched_over_unbatched"]) == {"C=1", "C=4"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "In-process onnxruntime fp32" in result.stdout
    assert "x in-process openvino fp32 at batch" in result.stdout  # each server against its own runtime


def test_bench_serve_needs_exactly_one_target():
    result = run_cli("bench", "serve")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: give exactly one of --start and --target (HOST:PORT or URL)"


def test_bench_serve_against_a_server_without_the_model_or_its_http_port_is_one_line(tmp_path):
    shadow = tmp_path / "tritonclient"  # a tritonclient that is not there, for the load processes too
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('tritonclient is not installed')\n")
    with ServerProcess() as server:
        no_model = run_cli("bench", "serve", "--target", server.target, "--model", "no-such-model", "--duration", "0.2")
        no_http = run_cli("bench", "serve", "--target", server.target, "--api", "rest", "--http-target", "127.0.0.1:1",
                          "--duration", "0.2")
        no_triton = run_cli("bench", "serve", "--target", server.target, "--client", "tritonclient",
                            "--load-processes", "2", "--concurrency", "2", "--duration", "0.2", timeout=60,
                            env={"PYTHONPATH": str(tmp_path)})
    assert (no_model.returncode, no_model.stderr.strip().splitlines()[-1]) == (1, (
        f"error: {server.target}: NOT_FOUND: unknown model 'no-such-model'; this server has resnet-mnist "
        "(--model and --package name the model to measure)"))
    assert (no_http.returncode, no_http.stderr.strip().splitlines()[-1]) == (1, (
        "error: http://127.0.0.1:1: cannot reach the server's HTTP port ([Errno 111] Connection refused); "
        "--http-target names it"))
    assert (no_triton.returncode, no_triton.stderr.strip()) == (
        1, 'error: --client tritonclient needs tritonclient: pip install "tritonclient[grpc,http]"')


def test_bench_serve_measures_worker_counts_with_tritonclient_from_several_load_processes(tmp_path):
    out = tmp_path / "workers.json"
    result = run_cli("bench", "serve", "--start", "--backends", "onnxruntime", "--workers", "1,2", "--api", "kserve,kserve-stream,rest",
                     "--client", "tritonclient", "--load-processes", "2", "--concurrency", "2", "--duration", "0.5",
                     "--warmup", "0.2", "--json", str(out), env=PROXY_ELSEWHERE)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["workers"] == [1, 2] and report["client"] == "tritonclient"
    assert set(report["servers"]) == {f"{name}, {api} API" for api in ("kserve", "kserve-stream", "rest") for name in (
        "onnxruntime, batched, 1 worker", "onnxruntime, batched, 2 workers", "onnxruntime, unbatched (max batch 1)")}
    for rows in report["servers"].values():
        (row,) = rows
        assert row["ok"] > 0 and row["errors"] == {} and row["load_processes"] == 2
        assert row["server_cpu_ms_per_request"] > 0 and row["client_cpu_cores"] > 0
    assert "server CPU ms/req" in result.stdout


def _one_server_bench(tmp_path, *options: str):
    """``bench serve --start`` of the ONNX Runtime server (one worker; and the unbatched baseline),
    1 s measured after 0.3 s: its JSON report and the finished command."""
    out = tmp_path / "bench.json"
    result = run_cli("bench", "serve", "--start", "--backends", "onnxruntime", "--workers", "1", "--duration", "1",
                     "--warmup", "0.3", *options, "--json", str(out))
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result


@pytest.mark.parametrize("client", ["tritonclient", "perf_analyzer"])
def test_bench_serve_refuses_triton_clients_for_classify(client):
    result = run_cli("bench", "serve", "--start", "--api", "classify", "--client", client)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: --api classify is resserve's own API, which {client} does not speak: "
                                     "use --client resserve")


SLOW_SECONDS = 0.2  # how long the slow server's batcher waits for batch-mates: each request's latency


@pytest.fixture(scope="module")
def slow_server():
    """A server that answers each request in about SLOW_SECONDS, so that an open loop at 100/s
    has 20 requests in flight: more than one HTTP/1.1 connection per client, or perf_analyzer's
    4 waiting threads, carry."""
    with ServerProcess("--max-queue-delay-us", str(round(SLOW_SECONDS * 1e6))) as server:
        yield server


def _bench_against(server: ServerProcess, tmp_path, *options: str) -> dict:
    """``bench serve`` against ``server`` on all its ports; its JSON report."""
    return _bench(tmp_path, "--target", server.target, "--http-target", server.http_target,
                  "--metrics", f"http://127.0.0.1:{server.metrics_port}/metrics", "--warmup", "0.3", *options)


def _bench(tmp_path, *options: str) -> dict:
    """``bench serve`` with ``options``: its JSON report."""
    out = tmp_path / "bench.json"
    result = run_cli("bench", "serve", *options, "--json", str(out))
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@needs_perf_analyzer
def test_bench_serve_loads_with_perf_analyzer_closed_and_open_loop(tmp_path, slow_server):
    closed = _bench_against(slow_server, tmp_path, "--client", "perf_analyzer", "--api", "kserve,kserve-stream,rest",
                            "--concurrency", "2", "--duration", "1")
    opened = _bench_against(slow_server, tmp_path, "--client", "perf_analyzer", "--rate", "100", "--duration", "2")
    assert closed["client"] == "perf_analyzer" and len(closed["servers"]) == 3  # one per API
    for rows in closed["servers"].values():
        (row,) = rows
        assert row["ok"] > 0 and row["errors"] == {} and row["load_processes"] == 1
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] and row["mean_batch_size"] >= 1
        assert row["client_cpu_cores"] > 0  # perf_analyzer's, from the children's rusage
    (rows,) = opened["servers"].values()
    # perf_analyzer sends on schedule rather than from 4 threads that wait for their answers (19/s
    # of 100/s from this server): its seeded schedule sends 89-96/s in this window, and about one
    # run in 40 one of its 4 threads sends nothing (68/s, a race in perf_analyzer itself)
    assert rows[0]["offered_rate"] == 100 and rows[0]["requests_per_second"] > 50


@needs_perf_analyzer
def test_bench_serve_loads_a_server_by_the_url_of_an_ingress_with_every_client(tmp_path):
    with ServerProcess() as server, ingress(server.url, "/digits") as url:
        reports = {client: _bench(tmp_path, "--target", url, "--client", client, "--concurrency", "2", "--duration",
                                  "0.5", "--warmup", "0.2")
                   for client in ("resserve", "tritonclient", "perf_analyzer")}
        wrong_model = run_cli("bench", "serve", "--target", url, "--model", "nope", "--duration", "0.2")
        no_prefix = run_cli("bench", "serve", "--target", url.removesuffix("/digits"), "--duration", "0.2")
    for report in reports.values():  # KServe v2 REST through the prefix, the only API a URL reaches
        ((name, (row,)),) = report["servers"].items()
        assert report["api"] == "rest" and name == f"server at {url}"
        assert row["ok"] > 0 and row["errors"] == {} and 0 < row["p50_ms"] <= row["max_ms"]
        assert row["mean_batch_size"] is None and row["server_cpu_cores"] is None  # an ingress routes no metrics
    assert wrong_model.returncode == 1 and wrong_model.stderr.strip().endswith(
        ": HTTP 404: unknown model 'nope'; this server has resnet-mnist (--model and --package name the model to "
        "measure)"), wrong_model.stderr
    assert no_prefix.returncode == 1 and no_prefix.stderr.strip().endswith(
        ": HTTP 404: Not Found (what answers there is not resserve's HTTP API, as the server's gRPC and metrics ports "
        "are not: --target takes the URL of its HTTP port, 8000 by default, or of what routes to it, with the path "
        "prefix it routes)"), no_prefix.stderr


@needs_perf_analyzer
def test_bench_serve_says_what_stopped_perf_analyzer():
    with ServerProcess("--max-message-bytes", "8192") as server:  # 8-image requests are 25 KB
        result = run_cli("bench", "serve", "--target", server.target, "--client", "perf_analyzer", "--batch", "8",
                         "--concurrency", "1", "--duration", "0.3", "--warmup", "0.1", timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: perf_analyzer failed at C=1: ") and "larger than max" in last, last


@pytest.fixture(scope="module")
def secured_server(pki, tmp_path_factory):
    """A server with mutual TLS and a bearer token, as deployments are; and the token's file."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("s3cret\n")
    with ServerProcess("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
                       "--tls-client-ca", str(pki / "ca.crt"), "--token-file", str(tokens)) as server:
        yield server, tokens


def _secured_options(pki, tokens) -> tuple[str, ...]:
    """The client's certificate and the token, and a short closed-loop run."""
    return ("--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"),
            "--tls-key", str(pki / "client.key"), "--token-file", str(tokens), "--concurrency", "1", "--duration", "0.3")


@pytest.mark.parametrize("client", ["resserve", "tritonclient"])
def test_bench_serve_loads_a_server_with_mutual_tls_and_tokens_over_every_api(tmp_path, pki, secured_server, client):
    server, tokens = secured_server
    report = _bench_against(server, tmp_path, "--client", client, "--api", "kserve,kserve-stream,rest",
                            *_secured_options(pki, tokens))
    assert len(report["servers"]) == 3
    for rows in report["servers"].values():
        (row,) = rows
        assert row["ok"] > 0 and row["errors"] == {}
        # a --target's CPU, from its metrics (process_cpu_seconds_total): per request, what its path costs
        assert row["server_cpu_cores"] > 0 and row["server_cpu_ms_per_request"] > 0


@needs_perf_analyzer
def test_bench_serve_loads_a_server_with_mutual_tls_and_tokens_with_perf_analyzer(tmp_path, pki, secured_server):
    server, tokens = secured_server
    report = _bench_against(server, tmp_path, "--client", "perf_analyzer", "--api", "rest",
                            *_secured_options(pki, tokens))
    ((row,),) = report["servers"].values()
    assert row["ok"] > 0 and row["errors"] == {}
    assert report["summary"]["server at " + server.target]["over_grpc_kserve"] is None  # no gRPC run to compare
    # a token over gRPC is more than perf_analyzer can send: said before any load
    result = run_cli("bench", "serve", "--target", server.target, "--client", "perf_analyzer",
                     *_secured_options(pki, tokens))
    assert (result.returncode, result.stderr.strip()) == (1, (
        "error: perf_analyzer sends no token over gRPC (its -H headers are HTTP only): measure --api kserve with "
        "--client tritonclient or resserve, or perf_analyzer with --api rest"))


def test_bench_serve_at_a_tls_server_without_its_ca_says_which_option_is_missing(secured_server):
    server, _ = secured_server
    result = run_cli("bench", "serve", "--target", server.target, "--duration", "0.3")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        "(a TLS server closes plaintext connections: --tls-ca names the CA that signed its certificate; "
        "or it holds all the connections it may (its --max-connections): retry later)")
    nobody = run_cli("bench", "serve", "--target", "127.0.0.1:1", "--duration", "0.3")
    assert nobody.returncode == 1 and nobody.stderr.strip().splitlines()[-1].endswith(
        "(is a server running there? `resserve serve` starts one; --target names another)")


def test_bench_serve_without_perf_analyzer_says_how_to_install_it():
    result = run_cli("bench", "serve", "--start", "--client", "perf_analyzer", env={"PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stderr.strip()) == (1, (
        "error: --client perf_analyzer needs Triton's perf_analyzer on PATH; from a clone: bash "
        "tests/install-perf-analyzer.sh, in the virtualenv (docs/benchmarks.md)"))


def _arrivals(rate: float, warmup: float, duration: float, seed: int = 0) -> int:
    """How many Poisson arrivals of the load generator's seeded schedule fall in its measured window."""
    due = np.random.default_rng(seed).exponential(1 / rate, size=int(rate * (warmup + duration) * 3)).cumsum()
    return int(((due >= warmup) & (due < warmup + duration)).sum())


def test_bench_serve_open_loop_sends_every_scheduled_request_and_reports_server_cpu(tmp_path):
    report, result = _one_server_bench(tmp_path, "--rate", "30,200", "--api", "kserve,kserve-stream",
                                       "--load-processes", "1")
    for name, rows in report["servers"].items():
        assert [r["load"] for r in rows] == ["30/s", "200/s"] and [r["offered_rate"] for r in rows] == [30, 200]
        for r in rows:
            # open loop: the schedule, not the server's speed, decides how many requests go out
            # (the unbatched server answers 200/s more slowly; it is sent as many)
            assert r["ok"] + sum(r["errors"].values()) == _arrivals(r["offered_rate"], 0.3, 1.0)
            assert r["errors"] == {} and r["server_cpu_cores"] > 0
        assert f"{name} (onnxruntime fp32), open loop: 30/s answered" in result.stdout
    assert report["summary"] == {}  # a peak under open loop is only the highest rate offered


@pytest.mark.parametrize("client", ["resserve", "tritonclient"])
def test_bench_serve_open_loop_over_rest_is_not_queued_in_the_client(tmp_path, slow_server, client):
    report = _bench_against(slow_server, tmp_path, "--client", client, "--api", "rest", "--rate", "200",
                            "--duration", "1", "--load-processes", "1")
    ((row,),) = report["servers"].values()
    assert row["ok"] == _arrivals(200, 0.3, 1.0) and row["errors"] == {}
    # the server's latency, not a client's: a connection per client (8) would queue the other
    # requests in flight and answer 40/s, seconds behind the schedule by the window's end
    assert row["p99_ms"] < 2.5 * SLOW_SECONDS * 1e3


def test_a_load_process_that_dies_ends_the_level_instead_of_hanging_it(tmp_path, monkeypatch):
    shadow = tmp_path / "tritonclient"  # the load processes cannot import it: each dies at start
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('tritonclient is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned processes start with this sys.path
    spec = LoadSpec("127.0.0.1:1", "", "resnet-mnist", "kserve", 1, 0.2, 0.1, client="tritonclient")
    with pytest.raises(ResserveError, match=r"^a load process failed \(its error is above\)$"):
        measure_level(spec, Level(concurrency=2), "http://127.0.0.1:1/metrics", None, load_processes=2)


def test_bench_serve_takes_one_kind_of_load():
    result = run_cli("bench", "serve", "--start", "--rate", "10", "--concurrency", "2")
    assert (result.returncode, result.stderr.strip()) == (
        1, "error: give --concurrency (closed loop) or --rate (open loop), not both")
    result = run_cli("bench", "serve", "--start", "--rate", "10,0")
    assert (result.returncode, result.stderr.strip()) == (
        1, "error: --rate takes requests per second > 0, comma-separated; got '10,0'")
