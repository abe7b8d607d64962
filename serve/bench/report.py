"""What ``resserve bench serve`` measured, typed: a row per load level, the in-process limit,
each server's summary against it, and the report they make; printed as tables and sentences,
written as JSON, plotted."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from resserve.serve.errors import ResserveError

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class LevelResult:
    """One load level against one server: a row of the server's table."""

    load: str  # "C=16" (closed loop) or "100/s" (open loop)
    concurrency: int | None  # closed-loop clients
    offered_rate: float | None  # open-loop requests/s
    requests_per_second: float
    images_per_second: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    ok: int  # requests answered OK in the measured window
    errors: dict[str, int]  # what went wrong (a status code, an exception's name) -> how many requests
    mean_batch_size: float | None  # from the server's metrics; None where they could not be read
    mean_queue_ms: float | None
    load_processes: int
    client_cpu_cores: float
    server_cpu_cores: float | None  # None where neither /proc here nor its metrics (process_cpu_seconds) tell
    # the server's CPU time per answered request: what the per-request path costs, model included
    server_cpu_ms_per_request: float | None


@dataclass(frozen=True)
class InProcessResult:
    """The server's runtime on the same artifact in the benchmark's process, at one batch size."""

    batch: int
    latency_ms: float
    images_per_second: float


@dataclass(frozen=True)
class ServerSummary:
    """One server under closed-loop load against the in-process limit of its own runtime: the
    targets of docs/benchmarks.md. A figure is None where the run did not measure it."""

    peak_images_per_second: float
    peak_load: str
    in_process_batch_at_peak: int  # the in-process batch size closest to the batches the server formed
    peak_over_in_process: float
    c1_p50_ms: float | None = None
    c1_p50_over_in_process_latency_ms: float | None = None
    c16_p99_over_p50: float | None = None
    peak_over_onnxruntime_batched: float | None = None
    batched_over_unbatched: dict[str, float] | None = None  # images/s by load level
    over_grpc_kserve: dict[str, float] | None = None  # a REST server's images/s over its gRPC's, by load level


@dataclass(frozen=True)
class ServeReport:
    """The whole run: every server's rows, the in-process limit of each runtime, the summaries."""

    model: str
    api: str  # the APIs loaded, comma-separated
    client: str
    batch: int  # images per request
    duration_s: float
    workers: list[int]
    machine: str
    runtimes: dict[str, str]  # server name -> "backend precision", as the server reports it
    servers: dict[str, list[LevelResult]]
    in_process: dict[str, list[InProcessResult]]  # by runtime
    summary: dict[str, ServerSummary]  # by server name; servers under open-loop load have none


def report_json(report) -> str:
    """A benchmark's typed results (a dataclass: this report, ``bench train``'s, ``bench model``'s)
    as the JSON its ``--json`` writes."""
    return json.dumps(dataclasses.asdict(report), indent=2) + "\n"


def summarize(rows: list[LevelResult], limit: list[InProcessResult], batch: int,
              baseline: list[LevelResult] | None = None, unbatched: list[LevelResult] | None = None,
              grpc: list[LevelResult] | None = None) -> ServerSummary:
    """One server under closed-loop load against the in-process limit of its own runtime and,
    where given, the rows of the baseline server (ONNX Runtime batched), of the same server
    unbatched, and of the same server over gRPC KServe."""
    peak = max(rows, key=lambda row: row.images_per_second)
    at_peak = min(limit, key=lambda row: abs(row.batch - (peak.mean_batch_size or batch)))
    single = next(row for row in limit if row.batch == batch)
    first = next((row for row in rows if row.concurrency == 1), None)
    c16 = next((row for row in rows if row.concurrency == 16), None)
    return ServerSummary(
        peak_images_per_second=peak.images_per_second, peak_load=peak.load, in_process_batch_at_peak=at_peak.batch,
        peak_over_in_process=peak.images_per_second / at_peak.images_per_second,
        c1_p50_ms=first.p50_ms if first else None,
        c1_p50_over_in_process_latency_ms=first.p50_ms - single.latency_ms if first else None,
        c16_p99_over_p50=c16.p99_ms / c16.p50_ms if c16 else None,
        peak_over_onnxruntime_batched=peak.images_per_second / max(row.images_per_second for row in baseline)
        if baseline else None,
        batched_over_unbatched=_ratios(rows, unbatched) if unbatched else None,
        over_grpc_kserve=_ratios(rows, grpc) if grpc else None)


def _ratios(rows: list[LevelResult], baseline: list[LevelResult]) -> dict[str, float]:
    """images/s of ``rows`` over ``baseline``'s at each load level both measured."""
    by_load = {row.load: row.images_per_second for row in baseline}
    return {row.load: row.images_per_second / by_load[row.load] for row in rows if row.load in by_load}


def summary_lines(name: str, runtime: str, summary: ServerSummary, batch: int) -> list[str]:
    """The summary of one server under closed-loop load, as sentences."""
    lines = [f"{name}: peak {summary.peak_images_per_second:,.0f} images/s at {summary.peak_load}, "
             f"{summary.peak_over_in_process:.2f}x in-process {runtime} at batch {summary.in_process_batch_at_peak}"]
    if summary.c1_p50_ms is not None:
        lines.append(f"  one client: p50 {summary.c1_p50_ms:.2f} ms, "
                     f"{summary.c1_p50_over_in_process_latency_ms:+.2f} ms over in-process batch {batch}")
    if summary.c16_p99_over_p50 is not None:
        lines.append(f"  16 clients: p99 is {summary.c16_p99_over_p50:.1f}x p50")
    if summary.peak_over_onnxruntime_batched not in (None, 1.0):
        lines.append(f"  peak {summary.peak_over_onnxruntime_batched:.2f}x the ONNX Runtime server's")
    for by_load, what in ((summary.batched_over_unbatched, "batching on over off"),
                          (summary.over_grpc_kserve, "images/s over the same server's gRPC KServe")):
        if by_load:
            lines.append(f"  {what}: " + ", ".join(f"{load} {r:.2f}x" for load, r in by_load.items()))
    return lines


def open_loop_line(name: str, rows: list[LevelResult]) -> str:
    """What each offered rate cost one server under open-loop load, as a sentence (its peak is
    only the highest rate offered, so it has no summary)."""
    return f"{name}, open loop: " + "; ".join(
        f"{row.load} answered {row.requests_per_second:.0f}/s, p99 {row.p99_ms:.1f} ms"
        + (f", server CPU {row.server_cpu_cores:.2f} cores" if row.server_cpu_cores is not None else "")
        for row in rows)


def print_report(report: ServeReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)  # a summary line stays one line in a pipe, for grep
    for name, rows in report.servers.items():
        table = Table("load", "img/s", "req/s", "p50 ms", "p90", "p95", "p99", "max", "batch", "queue ms",
                      "errors", "load procs", "client CPU", "server CPU", "server CPU ms/req",
                      title=f"Server: {name} ({report.runtimes[name]})")
        for r in rows:
            table.add_row(r.load, f"{r.images_per_second:.0f}", f"{r.requests_per_second:.0f}",
                          *(f"{ms:.2f}" for ms in (r.p50_ms, r.p90_ms, r.p95_ms, r.p99_ms, r.max_ms)),
                          _fmt(r.mean_batch_size, ".1f"), _fmt(r.mean_queue_ms, ".2f"),
                          ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0",
                          str(r.load_processes), f"{r.client_cpu_cores:.2f}", _fmt(r.server_cpu_cores, ".2f"),
                          _fmt(r.server_cpu_ms_per_request, ".3f"))
        print_unsqueezed(table)
    for runtime, limit in report.in_process.items():
        table = Table("batch", "latency ms", "img/s", title=f"In-process {runtime} (the limit of servers on it)")
        for r in limit:
            table.add_row(str(r.batch), f"{r.latency_ms:.3f}", f"{r.images_per_second:.0f}")
        console.print(table)
    for name, rows in report.servers.items():
        described = f"{name} ({report.runtimes[name]})"
        if name in report.summary:
            for line in summary_lines(described, report.runtimes[name], report.summary[name], report.batch):
                console.print(line)
        else:
            console.print(open_loop_line(described, rows))


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


def plot_report(report: ServeReport, path: Path) -> None:
    """Latency percentiles against throughput, one curve per server configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ResserveError("--plot needs matplotlib: pip install matplotlib") from exc
    figure, axis = plt.subplots(figsize=(8, 5))
    for (name, rows), color in zip(report.servers.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        x = [r.images_per_second for r in rows]
        axis.plot(x, [r.p50_ms for r in rows], "-o", color=color, label=f"{name} p50")
        axis.plot(x, [r.p99_ms for r in rows], "--^", color=color, label=f"{name} p99")
        for r in rows:
            axis.annotate(r.load, (r.images_per_second, r.p50_ms), fontsize=7, textcoords="offset points",
                          xytext=(3, -10))
    for (runtime, limit), style in zip(report.in_process.items(), (":", "-.", "--")):
        best = max(limit, key=lambda r: r.images_per_second)
        axis.axvline(best.images_per_second, color="gray", linestyle=style,
                     label=f"in-process {runtime} (batch {best.batch})")
    axis.set_xlabel("throughput (images/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title(f"resserve {report.model} ({report.api} API, batch {report.batch}), {report.machine}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
