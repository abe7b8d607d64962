"""Triton's perf_analyzer (C++) as ``resserve bench serve``'s load generator (``--client perf_analyzer``).

It is what Triton's users measure servers with, and on CPUs a server shares with its load it
takes far less of them than a Python client (docs/benchmarks.md). Each load level is one
perf_analyzer run: closed loop at ``--concurrency-range C``, or open loop at
``--request-rate-range R`` with Poisson arrivals, asynchronous: by default perf_analyzer sends a
request rate from 4 threads that each wait for their answer, so a server slower than 4 requests
in flight sets the rate itself (100/s offered, 56/s sent to a server answering in 60 ms), and the
queue an open loop is there to show is never formed. Its measurement windows cover the warm-up and
the measured seconds, and its profile export holds every request's send and response times, so
the latencies are those of the requests sent after the warm-up, as with the Python clients.
perf_analyzer stops at the first failed request: a failure ends the benchmark with its message
rather than being counted.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from resserve.serve.errors import ResserveError
from resserve.serve.bench.clients import Credentials, Level, LoadResult, LoadSpec

PROTOCOLS = {"kserve": ("-i", "grpc"), "kserve-stream": ("-i", "grpc", "--streaming"), "rest": ("-i", "http")}
WINDOWS = 3  # perf_analyzer reports once this many consecutive windows agree
MAX_WINDOWS = 10  # and gives up after this many (its default)
STARTUP_SECONDS = 60  # beyond its windows: connecting, reading the model's config
INSTALL = "from a clone: bash tests/install-perf-analyzer.sh, in the virtualenv (docs/benchmarks.md)"


def executable() -> str:
    """perf_analyzer's path, or a one-line error that says how to install it."""
    path = shutil.which("perf_analyzer")
    if path is None:
        raise ResserveError(f"--client perf_analyzer needs Triton's perf_analyzer on PATH; {INSTALL}")
    return path


def command(spec: LoadSpec, level: Level, export: Path) -> list[str]:
    """The perf_analyzer command line of one level. Its stability check is relaxed (100%): the
    windows are there to span the warm-up and the measured seconds, not to search for a steady
    state (which may take up to ten windows)."""
    load = (("--concurrency-range", str(level.concurrency)) if level.concurrency
            else ("--request-rate-range", f"{level.rate:g}", "--request-distribution", "poisson", "--async"))
    return [executable(), "-m", spec.model, "-u", _url(spec), *PROTOCOLS[spec.api], *_secured(spec),
            "-b", str(spec.batch), "--input-data", "zero", *load,
            "--measurement-mode", "time_windows", "--measurement-interval", str(round(_window_seconds(spec) * 1000)),
            "--stability-percentage", "100", "--max-trials", str(MAX_WINDOWS), "--profile-export-file", str(export)]


def check_credentials(apis: list[str], credentials: Credentials) -> None:
    """A one-line error for what perf_analyzer cannot show a server: a token over gRPC (its
    headers, -H, go over HTTP only)."""
    grpc_apis = [api for api in apis if api != "rest"]
    if credentials.token and grpc_apis:
        raise ResserveError(f"perf_analyzer sends no token over gRPC (its -H headers are HTTP only): measure --api "
                            f"{','.join(grpc_apis)} with --client tritonclient or resserve, or perf_analyzer with "
                            "--api rest")


def _url(spec: LoadSpec) -> str:
    """The server's address as perf_analyzer takes it: HTTPS named by its scheme, HTTP by none."""
    return spec.http_url.removeprefix("http://") if spec.api == "rest" else spec.target


def _secured(spec: LoadSpec) -> list[str]:
    """perf_analyzer's options for the server's TLS, and for the token (over HTTP; shown in the
    process list, as perf_analyzer takes it on its command line only)."""
    tls, options = spec.credentials, []
    if spec.api != "rest":
        if tls.tls_ca:
            options += ["--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", str(tls.tls_ca)]
        if tls.tls_cert and tls.tls_key:
            options += ["--ssl-grpc-certificate-chain-file", str(tls.tls_cert),
                        "--ssl-grpc-private-key-file", str(tls.tls_key)]
        return options
    if tls.tls_ca:
        options += ["--ssl-https-ca-certificates-file", str(tls.tls_ca)]
    if tls.tls_cert and tls.tls_key:
        options += ["--ssl-https-client-certificate-file", str(tls.tls_cert),
                    "--ssl-https-private-key-file", str(tls.tls_key)]
    return options + (["-H", f"Authorization:Bearer {tls.token}"] if tls.token else [])


def _window_seconds(spec: LoadSpec) -> float:
    return max(0.1, (spec.warmup + spec.duration) / WINDOWS)


def latencies(export: dict, warmup: float) -> tuple[list[float], float]:
    """Latencies (s) of the requests sent between the warm-up's end and the last window's, and
    that window's length (s), from perf_analyzer's profile export."""
    (experiment,) = export["experiments"]
    boundaries = experiment["window_boundaries"]
    measure_from, end = boundaries[0] + round(warmup * 1e9), boundaries[-1]
    answered = [(request["response_timestamps"][-1] - request["timestamp"]) / 1e9
                for request in experiment["requests"]
                if measure_from <= request["timestamp"] < end and request["response_timestamps"]]
    return answered, (end - measure_from) / 1e9


def _failure(output: str) -> str:
    """perf_analyzer's own account of why it stopped: its error line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return (errors or lines or ["no output"])[-1]


def generate_load(spec: LoadSpec, level: Level) -> LoadResult:
    """One level of load from perf_analyzer, measured as the Python clients' is."""
    with tempfile.TemporaryDirectory(prefix="resserve-perf-analyzer-") as scratch:
        export = Path(scratch) / "profile.json"
        args = command(spec, level, export)
        cpu_before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        try:  # a server that stops answering must not hang the benchmark
            done = subprocess.run(args, capture_output=True, text=True,
                                  timeout=_window_seconds(spec) * MAX_WINDOWS + STARTUP_SECONDS)
        except subprocess.TimeoutExpired:
            raise ResserveError(f"perf_analyzer did not finish {level} in time: is the server answering?") from None
        elapsed = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0 or not export.exists():
            raise ResserveError(f"perf_analyzer failed at {level}: {_failure(done.stdout + done.stderr)}")
        answered, window = latencies(json.loads(export.read_text()), spec.warmup)
    client_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return LoadResult(answered, Counter(), window, elapsed, client_cpu, 1)
