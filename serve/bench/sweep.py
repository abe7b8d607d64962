"""``resserve bench serve``: the servers a run starts (or the one it is pointed at), each loaded
at every level over every API, then the in-process limit of each runtime they ran, and the report.

Per level (load.py): images/s and requests/s, latency percentiles, errors by status code, the
batch sizes and queue time the server reports in its metrics, and the CPU time of the server and
of the load generator. Baselines in the same run: each runtime in-process on the same artifact
(batch 1 and the batch sizes its servers formed; limits.py) and, with ``--start``, the ONNX
Runtime server with batching off (``--max-batch-size 1``).
"""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import grpc
from yarl import URL

from resserve.serve.bench import perf_analyzer
from resserve.serve.bench.clients import APIS, CLIENTS, Credentials, Level, LoadSpec, triton_client_module
from resserve.serve.bench.limits import IN_PROCESS_SECONDS, in_process_limit, machine_description
from resserve.serve.bench.load import measure_level
from resserve.serve.bench.report import InProcessResult, LevelResult, ServeReport, ServerSummary, summarize
from resserve.serve.client import ClientError, connect, is_url
from resserve.serve.client.proxies import environment_proxy, http_proxy_hint, without_proxies
from resserve.serve.errors import ResserveError
from resserve.serve.package import load_package

LOAD_BOUND_CORES = 0.9  # a load process using this much of a core is the likely bottleneck


@dataclass(frozen=True)
class SweepPlan:
    """One ``resserve bench serve`` run: the load, its client, and the servers it measures (those
    it starts, at each backend and worker count, or the one at ``target``)."""

    apis: list[str]  # keys of APIS, each loaded against the same server(s)
    levels: list[Level]
    batch: int = 1  # images per request
    duration: float = 10.0  # measured seconds per level
    warmup: float = 2.0  # unmeasured seconds before each level
    client: str = "resserve"  # one of CLIENTS
    load_processes: int = 1  # the Python load generator's processes
    package: Path | None = None  # served and run in process; None: the shipped model
    model: str = ""  # the model's name; "": the package's
    target: str | None = None  # a running server's gRPC host:port, or HTTP URL; None: start servers on loopback
    http_url: str | None = None  # the target's HTTP URL (--api rest)
    metrics_url: str | None = None  # the target's /metrics
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])  # the started servers': backend[:precision]
    workers: list[int] = field(default_factory=lambda: [1])  # the started servers' worker counts
    credentials: Credentials = Credentials()  # TLS and token for the target

    def check(self) -> None:
        """One line for a plan that cannot run, before any server starts or any file is read."""
        if not self.apis or not set(self.apis) <= set(APIS):
            raise ResserveError(f"--api takes {', '.join(APIS)}, comma-separated; got {','.join(self.apis)!r}")
        if self.batch < 1:
            raise ResserveError(f"--batch must be >= 1 images, got {self.batch}")
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ResserveError(f"--duration must be a finite number of seconds > 0, got {self.duration:g}")
        if not (math.isfinite(self.warmup) and self.warmup >= 0):
            raise ResserveError(f"--warmup must be a finite number of seconds >= 0, got {self.warmup:g}")
        if self.client not in CLIENTS:
            raise ResserveError(f"--client takes {', '.join(CLIENTS)}; got {self.client!r}")
        if self.client != "resserve" and "classify" in self.apis:
            raise ResserveError(f"--api classify is resserve's own API, which {self.client} does not speak: "
                                "use --client resserve")
        if self.target and is_url(self.target) and self.apis != ["rest"]:
            raise ResserveError(f"--target {self.target}: a URL reaches the server's HTTP API, which --api rest "
                                "loads; the gRPC APIs take the host:port of its gRPC port")
        self.credentials.check()
        for url in (self.metrics_url, self.http_url if "rest" in self.apis else None):
            if url:  # read through the proxy the environment names: one line now for one that cannot be used
                environment_proxy(URL(url))

    def load(self, target: str, http_url: str, api: str) -> LoadSpec:
        """What each load process sends to the server at ``target`` (gRPC) or ``http_url``, over ``api``."""
        return LoadSpec(target, http_url, self.model, api, self.batch, self.duration, self.warmup, self.client,
                        self.credentials)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_server(package: Path | None, *extra: str) -> Iterator[tuple[str, str, str, int]]:
    """A `resserve serve` subprocess on loopback: yields (gRPC target, HTTP URL, metrics URL, pid)."""
    port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    command = [sys.executable, "-m", "resserve.serve", "serve", *([str(package)] if package else []),
               "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
               "--metrics-port", str(metrics_port), "--drain-seconds", "0", *extra]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if " ready: " in line:
                break
            if line.startswith("error:"):
                raise ResserveError(f"the benchmark's server did not start: {line.strip()}")
        else:
            raise ResserveError("the benchmark's server exited before it was ready")
        threading.Thread(target=process.stderr.read, daemon=True).start()  # never block on a full pipe
        yield (f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics",
               process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _check_http(http_url: str, credentials: Credentials) -> None:
    """A one-line error now, rather than every request failing, when --api rest cannot reach the server."""
    try:
        urllib.request.urlopen(f"{http_url}/v2/health/live", timeout=10, context=credentials.ssl_context()).close()
    except OSError as exc:
        reason, (proxy, _) = getattr(exc, "reason", exc), environment_proxy(URL(http_url))
        hint = http_proxy_hint(proxy) if proxy else "; --http-target names it"
        raise ResserveError(f"{http_url}: cannot reach the server's HTTP port ({reason}){hint}") from None


def _note_unfollowed_proxy(plan: SweepPlan, log: Callable[[str], None]) -> None:
    """Say where tritonclient.http will not go as the other clients go: it connects directly,
    whatever proxy the environment names for the target (the others follow it, as curl does)."""
    if "rest" in plan.apis and plan.http_url and environment_proxy(URL(plan.http_url))[0]:
        log(f"note: tritonclient.http connects to {plan.http_url} directly, not through the proxy that HTTPS_PROXY "
            "or HTTP_PROXY names for it (--client resserve and perf_analyzer go through it)")


def _server_runtime(target: str, model: str, credentials: Credentials) -> str:
    """"backend precision" as the server reports it in the model's config, over gRPC or, for a
    URL, HTTP."""
    with connect(target, credentials.tls_ca, credentials.token, timeout=10, tls_cert=credentials.tls_cert,
                 tls_key=credentials.tls_key, option="--target") as client:
        try:
            config = client.model_config(model)
        except ClientError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND or exc.hint:  # not the server's "unknown model"
                raise
            raise ResserveError(f"{exc} (--model and --package name the model to measure)") from None
    return f"{config.parameters['backend'].string_value} {config.parameters['precision'].string_value}"


def _batched(spec: str, workers: int, counts: list[int]) -> str:
    return f"{spec}, batched" + (f", {workers} worker{'s' * (workers > 1)}" if len(counts) > 1 else "")


def _configurations(backends: list[str], workers: list[int]) -> list[tuple[str, tuple[str, ...]]]:
    """(name, server flags): each backend batched at each worker count, plus ONNX Runtime
    unbatched (--max-batch-size 1) at the first count.

    A backend may name its precision: ``openvino:fp32`` serves with ``--backend openvino
    --precision fp32``.
    """
    configs = []
    for spec in backends:
        backend, _, precision = spec.partition(":")
        for count in workers:
            configs.append((_batched(spec, count, workers),
                            ("--backend", backend, *(("--precision", precision) if precision else ()),
                             "--workers", str(count))))
    return configs + [(UNBATCHED, ("--backend", "onnxruntime", "--max-batch-size", "1", "--workers", str(workers[0])))]


UNBATCHED = "onnxruntime, unbatched (max batch 1)"


def _named(configuration: str, api: str, apis: list[str]) -> str:
    """A server's name in the report: its configuration, and the API where several are measured."""
    return configuration if len(apis) == 1 else f"{configuration}, {api} API"


def run_benchmark(plan: SweepPlan, log: Callable[[str], None] = print) -> ServeReport:
    """The whole sweep: the server(s) over each API, then the in-process limit; returns the report."""
    package = load_package(plan.package)
    plan = replace(plan, model=plan.model or package.name)
    _check_client(plan, log)
    configurations = (_configurations(plan.backends, plan.workers) if plan.target is None
                      else [(f"server at {plan.target}", None)])
    with nullcontext() if plan.target else without_proxies():  # the servers it starts: on loopback, where no proxy is
        servers, runtimes = _measure_servers(plan, configurations, log)
    limits: dict[str, list[InProcessResult]] = {}
    for runtime in dict.fromkeys(runtimes.values()):  # each runtime once, against the batches its servers formed
        formed = {max(1, round(row.mean_batch_size)) for name, rows in servers.items() if runtimes[name] == runtime
                  for row in rows if row.mean_batch_size}
        log(f"in-process {runtime} ...")
        limits[runtime] = in_process_limit(package, [plan.batch, *formed], runtime,
                                           seconds=min(plan.duration, IN_PROCESS_SECONDS))
    closed_loop = not plan.levels[0].rate  # under open loop every server answered the same offered rates: no peak
    baseline = _batched("onnxruntime", plan.workers[0], plan.workers)
    summary = (_summaries(servers, runtimes, limits, plan.batch, plan.apis, configurations, baseline) if closed_loop
               else {})
    return ServeReport(model=plan.model, api=",".join(plan.apis), client=plan.client, batch=plan.batch,
                       duration_s=plan.duration, workers=plan.workers, machine=machine_description(),
                       runtimes=runtimes, servers=servers, in_process=limits, summary=summary)


def _check_client(plan: SweepPlan, log: Callable[[str], None]) -> None:
    """That the load's client is installed and can do what the plan asks, before any server starts."""
    if plan.client == "tritonclient":
        for api in plan.apis:  # here, not in each load process
            triton_client_module(api)
        _note_unfollowed_proxy(plan, log)
    if plan.client == "perf_analyzer":
        perf_analyzer.executable()
        perf_analyzer.check_credentials(plan.apis, plan.credentials)


def _measure_servers(plan: SweepPlan, configurations: list[tuple[str, tuple[str, ...] | None]],
                     log: Callable[[str], None]) -> tuple[dict[str, list[LevelResult]], dict[str, str]]:
    """Each server (one started per configuration, or the target) over each API at every level:
    the rows by server name, and the runtime ("backend precision") each server reported."""
    servers: dict[str, list[LevelResult]] = {}
    runtimes: dict[str, str] = {}
    for configuration, flags in configurations:
        with (started_server(plan.package, *flags) if flags is not None
              else nullcontext((plan.target, plan.http_url or "", plan.metrics_url, None))) as started:
            address, http, metrics, pid = started
            runtime = _server_runtime(address, plan.model, plan.credentials)
            if "rest" in plan.apis and http != address:  # a URL target: its runtime was just read there
                _check_http(http, plan.credentials)
            for api in plan.apis:
                name = _named(configuration, api, plan.apis)
                runtimes[name] = runtime
                servers[name] = [_measured(name, runtime, plan.load(address, http, api), level, metrics, pid,
                                           plan.load_processes, log) for level in plan.levels]
    return servers, runtimes


def _measured(name: str, runtime: str, spec: LoadSpec, level: Level, metrics_url: str | None, pid: int | None,
              load_processes: int, log: Callable[[str], None]) -> LevelResult:
    """One level's row, saying so when the Python load generator may have been what bounded it."""
    log(f"{name} ({runtime}): {level} ...")
    row = measure_level(spec, level, metrics_url, pid, load_processes)
    if spec.client != "perf_analyzer" and row.client_cpu_cores / row.load_processes > LOAD_BOUND_CORES:
        log(f"  the load generator used {row.client_cpu_cores:.2f} cores in {row.load_processes} "
            f"process(es): it may be the bottleneck at {level} (--load-processes)")
    return row


def _summaries(servers: dict[str, list[LevelResult]], runtimes: dict[str, str],
               limits: dict[str, list[InProcessResult]], batch: int, apis: list[str],
               configurations: list[tuple[str, tuple[str, ...] | None]], baseline: str) -> dict[str, ServerSummary]:
    """Each server against its runtime's in-process limit and against the baseline server (ONNX
    Runtime batched, at the first worker count) over the same API; the baseline also against the
    unbatched server, and each REST server against the same server's gRPC KServe."""
    summaries = {}
    for configuration, _ in configurations:
        for api in apis:
            name = _named(configuration, api, apis)
            summaries[name] = summarize(
                servers[name], limits[runtimes[name]], batch, baseline=servers.get(_named(baseline, api, apis)),
                unbatched=servers.get(_named(UNBATCHED, api, apis)) if configuration == baseline else None,
                grpc=servers.get(_named(configuration, "kserve", apis)) if api == "rest" and "kserve" in apis else None)
    return summaries
