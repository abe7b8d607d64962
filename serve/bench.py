"""``resserve bench serve``: load against a server, beside the in-process limit.

Two kinds of load, for ``duration`` seconds after ``warmup`` per level:

- closed loop (``--concurrency``): each of C clients (one connection each: grpc.aio for the gRPC
  APIs, aiohttp for KServe v2 REST with binary tensors) sends its next request as soon as the
  previous one returns: how much a server can do, and its latency when saturated;
- open loop (``--rate``): requests arrive at random (Poisson) times, R per second on average,
  each sent when due whether or not earlier ones have returned, as independent users arrive;
  latency counts from when a request was due, so a server (or load generator) that falls behind
  cannot hide its queue. What a server costs (CPU) and answers at a given traffic, below its peak.

The clients are Python (serve/load_clients.py: ours or tritonclient's, spread over load
processes) or Triton's perf_analyzer (serve/perf_analyzer.py), measured alike.

Per level: images/s and requests/s, latency percentiles, errors by status code, the batch sizes
and queue time the server reports in its metrics, and the CPU time of the server and of the load
generator. Baselines in the same run: ONNX Runtime in-process on the same artifact (batch 1 and
the batch sizes the server formed) and, with ``--start``, the same server with batching off
(``--max-batch-size 1``).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from contextlib import AsyncExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import grpc
import numpy as np

from resserve.serve import perf_analyzer
from resserve.serve.backends import open_backend
from resserve.serve.backends.base import usable_cpus
from resserve.serve.errors import ResserveError
from resserve.serve.load_clients import Level, LoadResult, LoadSpec, sender, stand_in_images, triton_client_module
from resserve.serve.package import ModelPackage, load_package
from resserve.serve.stubs import grpc_service_pb2 as kserve_pb2
from resserve.serve.stubs import grpc_service_pb2_grpc as kserve_grpc
from resserve.serve.timing import images_per_second, median_seconds

if TYPE_CHECKING:
    from rich.table import Table

PERCENTILES = (50, 90, 95, 99)
LOAD_PROCESS_START_SECONDS = 3.0
LOAD_BOUND_CORES = 0.9  # a load process using this much of a core is the likely bottleneck
OPEN_LOOP_CONNECTIONS = 8  # per load process: open-loop requests take turns over these
OPEN_LOOP_MAX_OUTSTANDING = 1024  # per load process: arrivals beyond this many unanswered are not sent, but counted


@dataclass
class _Tally:
    """Latencies (s) and error codes of the requests started inside the measured window."""

    measure_from: float  # time.perf_counter() value
    latencies: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def record(self, started: float, error: str | None) -> None:
        """A request answered now; ``started``: when it was sent (closed loop) or due (open loop)."""
        if started < self.measure_from:
            return
        if error is None:
            self.latencies.append(time.perf_counter() - started)
        else:
            self.errors[error] += 1


async def _closed_loop(spec: LoadSpec, concurrency: int, tally: _Tally, stop_at: float) -> None:
    async def client() -> None:
        async with sender(spec) as send:
            while (sent := time.perf_counter()) < stop_at:
                tally.record(sent, await send())

    await asyncio.gather(*(client() for _ in range(concurrency)))


async def _open_loop(spec: LoadSpec, rate: float, tally: _Tally, start: float, stop_at: float, seed: int) -> None:
    """Poisson arrivals at ``rate`` per second from ``start`` until ``stop_at``, taking turns over
    OPEN_LOOP_CONNECTIONS connections; an arrival finding OPEN_LOOP_MAX_OUTSTANDING requests
    unanswered is counted as an error, not sent, so memory stays bounded when the server cannot
    keep up."""
    gaps = np.random.default_rng(seed)
    async with AsyncExitStack() as stack:
        sends = [await stack.enter_async_context(sender(spec)) for _ in range(OPEN_LOOP_CONNECTIONS)]
        outstanding: set[asyncio.Task] = set()

        async def request(send, due: float) -> None:
            tally.record(due, await send())

        due = start  # the schedule is fixed by the seed: which requests fall in the window does not depend on timing
        for turn in itertools.count():
            due += gaps.exponential(1 / rate)
            if due >= stop_at:
                break
            await asyncio.sleep(due - time.perf_counter())  # at once when late
            if len(outstanding) >= OPEN_LOOP_MAX_OUTSTANDING:
                tally.record(due, f"not sent ({OPEN_LOOP_MAX_OUTSTANDING} unanswered)")
                continue
            task = asyncio.create_task(request(sends[turn % len(sends)], due))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        await asyncio.gather(*outstanding)


async def _load(spec: LoadSpec, level: Level, start_at: float, seed: int = 0) -> tuple[list[float], Counter, float]:
    """Latencies (s) of the requests started inside the measured window, error codes, window
    length. The load starts at ``start_at`` (time.time(), shared by every load process)."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    tally, stop_at = _Tally(start + spec.warmup), start + spec.warmup + spec.duration
    if level.rate:
        await _open_loop(spec, level.rate, tally, start, stop_at, seed)
        return tally.latencies, tally.errors, spec.duration  # the arrivals' window; stragglers count
    await _closed_loop(spec, level.concurrency, tally, stop_at)
    return tally.latencies, tally.errors, time.perf_counter() - tally.measure_from


def scrape(metrics_url: str) -> dict[str, float]:
    """Batch-size and queue-time sums and counts from the server's /metrics."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for name in ("resserve_batch_size_sum", "resserve_batch_size_count", "resserve_queue_seconds_sum",
                 "resserve_queue_seconds_count"):
        totals[name] = sum(float(m) for m in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
    return totals


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user and system, every thread) of a process and its descendants, as /proc says:
    a server and its workers; None when there is no such process."""
    if pid is None or _stat_fields(pid) is None:
        return None
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        if fields := _stat_fields(current):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        stack.extend(children.get(current, []))
    return total


def _load_process(spec: LoadSpec, level: Level, start_at: float, seed: int, results) -> None:
    """One load process: its share of the load; puts (latencies, errors, window, CPU seconds)."""
    cpu = time.process_time()
    latencies, errors, window = asyncio.run(_load(spec, level, start_at, seed))
    results.put((latencies, errors, window, time.process_time() - cpu))


def _generate_load(spec: LoadSpec, level: Level, processes: int) -> LoadResult:
    """The load spread over at most ``processes`` Python load processes (this one when 1)."""
    shares = level.shares(processes)
    if len(shares) == 1:
        cpu = time.process_time()
        latencies, errors, window = asyncio.run(_load(spec, level, time.time()))
        return LoadResult(latencies, errors, window, window + spec.warmup, time.process_time() - cpu, 1)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + LOAD_PROCESS_START_SECONDS  # every process started and imported by then
    workers = [context.Process(target=_load_process, args=(spec, share, start_at, seed, results))
               for seed, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    parts = []
    while len(parts) < len(workers):
        try:
            parts.append(results.get(timeout=1.0))
        except queue.Empty:
            if any(worker.exitcode not in (None, 0) for worker in workers):  # died without its results
                for worker in workers:
                    worker.terminate()
                raise ResserveError("a load process failed (its error is above)") from None
    for worker in workers:
        worker.join()
    window = max(part[2] for part in parts)
    return LoadResult([x for part in parts for x in part[0]], sum((part[1] for part in parts), Counter()),
                      window, window + spec.warmup, sum(part[3] for part in parts), len(shares))


def measure_level(spec: LoadSpec, level: Level, metrics_url: str, server_pid: int | None,
                  load_processes: int = 1) -> dict:
    before, server_cpu0 = scrape(metrics_url), tree_cpu_seconds(server_pid)
    if spec.client == "perf_analyzer":
        load = perf_analyzer.generate_load(spec, level)
    else:
        load = _generate_load(spec, level, load_processes)
    after, server_cpu1 = scrape(metrics_url), tree_cpu_seconds(server_pid)
    latencies, window = load.latencies, load.window
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = delta.get("resserve_batch_size_count", 0.0)
    queued = delta.get("resserve_queue_seconds_count", 0.0)
    ms = np.percentile(latencies, PERCENTILES) * 1e3 if latencies else [float("nan")] * len(PERCENTILES)
    server_cores = (server_cpu1 - server_cpu0) / load.elapsed if server_cpu1 is not None else None
    return {
        "load": str(level),
        "concurrency": level.concurrency or None,
        "offered_rate": level.rate or None,  # requests/s
        "requests_per_second": len(latencies) / window,
        "images_per_second": len(latencies) * spec.batch / window,
        **{f"p{p}_ms": float(v) for p, v in zip(PERCENTILES, ms)},
        "max_ms": float(max(latencies) * 1e3) if latencies else float("nan"),
        "ok": len(latencies),
        "errors": dict(load.errors),
        "mean_batch_size": delta["resserve_batch_size_sum"] / batches if batches else None,
        "mean_queue_ms": delta["resserve_queue_seconds_sum"] / queued * 1e3 if queued else None,
        "load_processes": load.processes,
        "client_cpu_cores": load.client_cpu / load.elapsed,
        "server_cpu_cores": server_cores,
        # the server's CPU time per answered request: what the per-request path costs, model included
        "server_cpu_ms_per_request": server_cores / (len(latencies) / window) * 1e3 if server_cores and latencies else None,
    }


# ----------------------------------------------------------------------------------------------
# Servers started by the benchmark, and the in-process limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_server(package: Path | None, *extra: str) -> Iterator[tuple[str, str, str, int]]:
    """A `resserve serve` subprocess on loopback: yields (gRPC target, HTTP target, metrics URL, pid)."""
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
        yield f"127.0.0.1:{port}", f"127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics", process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def measure_runners(runners: dict[str, Callable[[np.ndarray], object]], images: np.ndarray,
                    batch_sizes: tuple[int, ...], seconds: float,
                    on_runner: Callable[[str], None] = lambda name: None) -> list[dict]:
    """`resserve bench model`'s rows: batch-1 latency and throughput at each batch size of every
    runner, in this process, one after another."""
    rows = []
    for name, run in runners.items():
        on_runner(name)
        one = images[:1]
        latency = median_seconds(lambda: run(one), repeats=500, max_seconds=seconds)
        row = {"config": name, "batch1_latency_ms": round(latency * 1e3, 3)}
        for size in batch_sizes:
            batch = np.ascontiguousarray(np.resize(images, (size, *images.shape[1:])))
            row[f"batch{size}_images_per_second"] = round(images_per_second(lambda: run(batch), size, seconds), 1)
        rows.append(row)
    return rows


def cuda_runners(onnx: bytes, batch_sizes: tuple[int, ...]) -> dict[str, Callable[[np.ndarray], object]]:
    """ONNX Runtime's CUDA provider on the fp32 artifact: plain, and with a captured CUDA graph at
    batch 1 and each of ``batch_sizes`` (as a server captures one per shape bucket)."""
    plain = open_backend(onnx, "onnx", "onnxruntime", "cuda", cuda_graphs=False)
    graphs = open_backend(onnx, "onnx", "onnxruntime", "cuda")
    graphs.specialize((1, *batch_sizes))
    return {"ONNX Runtime fp32, CUDA": plain.infer, "ONNX Runtime fp32, CUDA graphs": graphs.infer}


def in_process_limit(package: ModelPackage, batch_sizes: list[int], runtime: str = "onnxruntime fp32",
                     threads: int | None = None) -> list[dict]:
    """``runtime`` ("backend precision", as a server reports it) on the same artifact in this
    process: the ceiling a server on that runtime can approach."""
    backend_name, precision = runtime.split()
    format = "torchscript" if backend_name == "torchscript" else "onnx"
    backend = open_backend(package.read_verified(package.find(format)), format, backend_name, "cpu", precision, threads)
    rows = []
    for size in sorted(set(batch_sizes)):
        batch = stand_in_images(size)
        rows.append({"batch": size,
                     "latency_ms": median_seconds(lambda: backend.infer(batch), repeats=50) * 1e3,
                     "images_per_second": images_per_second(lambda: backend.infer(batch), size, 2.0)})
    return rows


def summarize(rows: list[dict], limit: list[dict], batch: int, unbatched: list[dict] | None = None) -> dict:
    """One server against the in-process limit of its own runtime: the targets of docs/benchmarks.md.
    Under open-loop load, what each rate cost instead (a peak there is only the highest rate offered)."""
    if rows[0]["offered_rate"]:
        return {"open_loop": {row["load"]: {key: row[key] for key in ("requests_per_second", "p50_ms", "p99_ms",
                                                                       "server_cpu_cores")} for row in rows}}
    peak = max(rows, key=lambda row: row["images_per_second"])
    at_peak = min(limit, key=lambda row: abs(row["batch"] - (peak["mean_batch_size"] or batch)))
    single = next(row for row in limit if row["batch"] == batch)
    summary = {"peak_images_per_second": peak["images_per_second"], "peak_load": peak["load"],
               "in_process_batch_at_peak": at_peak["batch"],
               "peak_over_in_process": peak["images_per_second"] / at_peak["images_per_second"]}
    first = next((row for row in rows if row["concurrency"] == 1), None)
    if first:
        summary["c1_p50_ms"] = first["p50_ms"]
        summary["c1_p50_over_in_process_latency_ms"] = first["p50_ms"] - single["latency_ms"]
    c16 = next((row for row in rows if row["concurrency"] == 16), None)
    if c16:
        summary["c16_p99_over_p50"] = c16["p99_ms"] / c16["p50_ms"]
    if unbatched:
        summary["batched_over_unbatched"] = _ratios(rows, unbatched)
    return summary


def _ratios(rows: list[dict], baseline: list[dict]) -> dict[str, float]:
    """images/s of ``rows`` over ``baseline``'s at each load level both measured."""
    by_load = {row["load"]: row["images_per_second"] for row in baseline}
    return {row["load"]: row["images_per_second"] / by_load[row["load"]] for row in rows if row["load"] in by_load}


def summary_lines(name: str, runtime: str, summary: dict, batch: int) -> list[str]:
    """The summary of one server, as sentences."""
    if "open_loop" in summary:
        return [f"{name}, open loop: " + "; ".join(
            f"{load} answered {level['requests_per_second']:.0f}/s, p99 {level['p99_ms']:.1f} ms"
            + (f", server CPU {level['server_cpu_cores']:.2f} cores" if level["server_cpu_cores"] is not None else "")
            for load, level in summary["open_loop"].items())]
    lines = [f"{name}: peak {summary['peak_images_per_second']:,.0f} images/s at {summary['peak_load']}, "
             f"{summary['peak_over_in_process']:.2f}x in-process {runtime} at batch {summary['in_process_batch_at_peak']}"]
    if "c1_p50_ms" in summary:
        lines.append(f"  one client: p50 {summary['c1_p50_ms']:.2f} ms, "
                     f"{summary['c1_p50_over_in_process_latency_ms']:+.2f} ms over in-process batch {batch}")
    if "c16_p99_over_p50" in summary:
        lines.append(f"  16 clients: p99 is {summary['c16_p99_over_p50']:.1f}x p50")
    if summary.get("peak_over_onnxruntime_batched", 1.0) != 1.0:
        lines.append(f"  peak {summary['peak_over_onnxruntime_batched']:.2f}x the ONNX Runtime server's")
    if "batched_over_unbatched" in summary:
        ratios = ", ".join(f"{load} {r:.2f}x" for load, r in summary["batched_over_unbatched"].items())
        lines.append(f"  batching on over off: {ratios}")
    if "over_grpc_kserve" in summary:
        ratios = ", ".join(f"{load} {r:.2f}x" for load, r in summary["over_grpc_kserve"].items())
        lines.append(f"  images/s over the same server's gRPC KServe: {ratios}")
    return lines


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)  # a summary line stays one line in a pipe, for grep
    for name, rows in report["servers"].items():
        name = f"{name} ({report['runtimes'][name]})"
        table = Table("load", "img/s", "req/s", "p50 ms", "p90", "p95", "p99", "max", "batch", "queue ms",
                      "errors", "load procs", "client CPU", "server CPU", "server CPU ms/req", title=f"Server: {name}")
        for r in rows:
            table.add_row(r["load"], f"{r['images_per_second']:.0f}", f"{r['requests_per_second']:.0f}",
                          *(f"{r[k]:.2f}" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")),
                          _fmt(r["mean_batch_size"], ".1f"), _fmt(r["mean_queue_ms"], ".2f"),
                          ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0",
                          str(r["load_processes"]), f"{r['client_cpu_cores']:.2f}", _fmt(r["server_cpu_cores"], ".2f"),
                          _fmt(r["server_cpu_ms_per_request"], ".3f"))
        print_unsqueezed(table)
    for runtime, rows in report["in_process"].items():
        table = Table("batch", "latency ms", "img/s", title=f"In-process {runtime} (the limit of servers on it)")
        for r in rows:
            table.add_row(str(r["batch"]), f"{r['latency_ms']:.3f}", f"{r['images_per_second']:.0f}")
        console.print(table)
    for name, summary in report["summary"].items():
        for line in summary_lines(name, report["runtimes"][name], summary, report["batch"]):
            console.print(line)


def print_unsqueezed(table: Table) -> None:
    """Print a table at its natural width: rich would otherwise cut or wrap the headers of a 15-column table to
    fit the terminal (80 columns when piped), and a table of numbers is read by its headers. Narrow terminals
    wrap the lines instead."""
    from rich.console import Console
    from rich.measure import Measurement

    probe = Console(width=10_000)
    natural = Measurement.get(probe, probe.options, table).maximum
    Console(width=max(Console().width, natural)).print(table)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot_report(report: dict, path: Path) -> None:
    """Latency percentiles against throughput, one curve per server configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ResserveError("--plot needs matplotlib: pip install matplotlib") from exc
    figure, axis = plt.subplots(figsize=(8, 5))
    for (name, rows), color in zip(report["servers"].items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        x = [r["images_per_second"] for r in rows]
        for percentile, style in (("p50_ms", "-o"), ("p99_ms", "--^")):
            axis.plot(x, [r[percentile] for r in rows], style, color=color, label=f"{name} {percentile[:3]}")
        for r in rows:
            axis.annotate(r["load"], (r["images_per_second"], r["p50_ms"]), fontsize=7,
                          textcoords="offset points", xytext=(3, -10))
    for (runtime, rows), style in zip(report["in_process"].items(), (":", "-.", "--")):
        limit = max(rows, key=lambda r: r["images_per_second"])
        axis.axvline(limit["images_per_second"], color="gray", linestyle=style,
                     label=f"in-process {runtime} (batch {limit['batch']})")
    axis.set_xlabel("throughput (images/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title(f"resserve {report['model']} ({report['api']} API, batch {report['batch']}), {report['machine']}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def machine_description() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {usable_cpus()} CPUs"


def _check_http(http_target: str) -> None:
    """A one-line error now, rather than every request failing, when --api rest cannot reach the server."""
    try:
        urllib.request.urlopen(f"http://{http_target}/v2/health/live", timeout=10).close()
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise ResserveError(f"{http_target}: cannot reach the server's HTTP port ({reason}); "
                            "--http-target names it") from None


def _server_runtime(target: str, model: str) -> str:
    """"backend precision" as the server reports it in the model's config."""
    with grpc.insecure_channel(target) as channel:
        try:
            config = kserve_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
                kserve_pb2.ModelConfigRequest(name=model), timeout=10).config
        except grpc.RpcError as exc:
            hint = " (--model and --package name the model to measure)" if exc.code() == grpc.StatusCode.NOT_FOUND else ""
            raise ResserveError(f"{target}: {exc.code().name}: {exc.details()}{hint}") from None
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


def run_benchmark(package_path: Path | None, target: str | None, http_target: str | None, model: str,
                  apis: list[str], levels: list[Level], batch: int, duration: float, warmup: float,
                  metrics_url: str | None, backends: list[str], workers: list[int], load_processes: int,
                  client: str = "resserve", log=print) -> dict:
    """The whole sweep: the server(s) over each API, then the in-process limit; returns the report."""
    package = load_package(package_path)
    model = model or package.name
    if client == "tritonclient":
        for api in apis:  # here, not in each load process
            triton_client_module(api)
    if client == "perf_analyzer":
        perf_analyzer.executable()  # before any server starts
    python_load = client != "perf_analyzer"  # perf_analyzer's threads may use several cores
    servers: dict[str, list[dict]] = {}
    runtimes: dict[str, str] = {}
    configurations = _configurations(backends, workers) if target is None else [(f"server at {target}", None)]
    baseline = _batched("onnxruntime", workers[0], workers)
    for configuration, flags in configurations:
        with (started_server(package_path, *flags) if flags is not None
              else nullcontext((target, http_target or "", metrics_url or "", None))) as (address, http, metrics, pid):
            runtime = _server_runtime(address, model)
            if "rest" in apis:
                _check_http(http)
            for api in apis:
                name = _named(configuration, api, apis)
                runtimes[name] = runtime
                spec = LoadSpec(address, http, model, api, batch, duration, warmup, client)
                servers[name] = []
                for level in levels:
                    log(f"{name} ({runtime}): {level} ...")
                    row = measure_level(spec, level, metrics, pid, load_processes)
                    servers[name].append(row)
                    if python_load and row["client_cpu_cores"] / row["load_processes"] > LOAD_BOUND_CORES:
                        log(f"  the load generator used {row['client_cpu_cores']:.2f} cores in {row['load_processes']} "
                            f"process(es): it may be the bottleneck at {level} (--load-processes)")
    limits: dict[str, list[dict]] = {}
    for runtime in dict.fromkeys(runtimes.values()):  # each runtime once, against the batches its servers formed
        formed = {max(1, round(r["mean_batch_size"])) for name, rows in servers.items() if runtimes[name] == runtime
                  for r in rows if r["mean_batch_size"]}
        log(f"in-process {runtime} ...")
        limits[runtime] = in_process_limit(package, [batch, *formed], runtime)
    summary = {}
    for configuration, _ in configurations:
        for api in apis:
            name = _named(configuration, api, apis)
            unbatched = servers.get(_named(UNBATCHED, api, apis)) if configuration == baseline else None
            summary[name] = summarize(servers[name], limits[runtimes[name]], batch, unbatched)
            if "open_loop" in summary[name]:
                continue  # every server answered the same offered rates: its table and CPU are the comparison
            reference = _named(baseline, api, apis)
            if reference in summary:
                summary[name]["peak_over_onnxruntime_batched"] = (summary[name]["peak_images_per_second"]
                                                                  / summary[reference]["peak_images_per_second"])
            grpc_rows = servers.get(_named(configuration, "kserve", apis))
            if api == "rest" and grpc_rows:
                summary[name]["over_grpc_kserve"] = _ratios(servers[name], grpc_rows)
    return {"model": model, "api": ",".join(apis), "client": client, "batch": batch, "duration_s": duration,
            "workers": workers,
            "machine": machine_description(), "runtimes": runtimes, "servers": servers, "in_process": limits,
            "summary": summary}
