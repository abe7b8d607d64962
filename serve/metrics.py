"""Prometheus metrics of the server, on their own registry (served on the metrics port).

Under ``--workers N`` every worker writes them to prometheus-client's multiprocess files and the
supervisor serves their sum (serve/workers/); gauges say how workers' values combine.
"""

from __future__ import annotations

import glob
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from resserve.serve.batcher import BatchStats
from resserve.serve.processes import tree_usage

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("resserve_requests", "Requests answered, by protocol (grpc, http), API, model "
                                "and status code (gRPC's name, or the HTTP status).",
                                ["protocol", "api", "model", "code"], registry=r)
        self.http_refused = Counter("resserve_http_refused", "HTTP connections closed at --max-connections "
                                    "(reason connection_limit) and requests answered 400 because they do not parse "
                                    "(unparsable): neither reaches a handler, nor resserve_requests.",
                                    ["reason"], registry=r)
        self.tls_reloads = Counter("resserve_tls_reloads", "TLS files found changed and read again, by each "
                                   "worker: served to new connections from then on (result ok), or left for the pair "
                                   "read before (refused: a file missing, or a key that is not the certificate's).",
                                   ["result"], registry=r)
        self.tls_certificate_expiry = Gauge(
            "resserve_tls_certificate_expiry_timestamp_seconds", "When the certificate served to new connections "
            "expires (its notAfter, in Unix time; the earliest of the workers'): alert when it comes near.",
            registry=r, multiprocess_mode="livemin")
        self.token_reloads = Counter("resserve_token_reloads", "Token files found changed and read again, by each "
                                     "worker: checked against from then on (result ok), or left for the tokens read "
                                     "before (refused: a file missing or empty, or a token in both files).",
                                     ["result"], registry=r)
        self.poll_changes = Counter("resserve_poll_changes", "Model changes --poll-seconds found the packages to call "
                                    "for: made (result ok), failed with what was served left serving (failed), or "
                                    "held back by a package that does not read (held, once for each such look).",
                                    ["result"], registry=r)
        self.latency = Histogram("resserve_request_latency_seconds", "Time from request to response.",
                                 ["protocol", "api", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("resserve_queue_seconds", "Time a request waited for its batch.",
                                    ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram("resserve_inference_seconds", "Time one batch took to compute.",
                                        ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("resserve_batch_size", "Images per batch formed by the dynamic batcher.",
                                    ["model", "version"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("resserve_queue_depth", "Requests waiting in a model's queue (all workers).",
                                 ["model", "version"], registry=r, multiprocess_mode="livesum")
        self.model_info = Gauge("resserve_model_info", "Loaded models and how they run (value 1).",
                                ["model", "version", "backend", "device", "precision"], registry=r,
                                multiprocess_mode="livemax")
        self.triton = TritonMetrics(r)

    def set_queue_depth(self, model: str, version: str, depth: int) -> None:
        """Requests waiting for their batch, under resserve's name and Triton's."""
        self.queue_depth.labels(model, version).set(depth)
        self.triton.pending.labels(model, version).set(depth)


FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")  # Triton's, for nv_inference_request_failure


class TritonMetrics:
    """Triton's per-model inference metrics under Triton's names and labels (``model``,
    ``version``), so that dashboards, alerts and autoscalers written for Triton read a resserve
    server unchanged. They count what Triton's statistics extension counts (serve/statistics.py).

    Triton exposes its counters without the ``_total`` suffix prometheus-client gives every
    Counter, so these are gauges that only go up (under --workers, summed over every worker that
    ever ran, as a counter would be): rate() and increase() read them as they read Triton's.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def total(name: str, what: str, labels: tuple[str, ...] = ("model", "version")) -> Gauge:
            return Gauge(name, what, labels, registry=registry, multiprocess_mode="sum")

        self.success = total("nv_inference_request_success", "Successful inference requests (Triton's name).")
        self.failure = total("nv_inference_request_failure", "Failed inference requests, by Triton's reason: "
                             "REJECTED (queue full, deadline, shutting down), CANCELED (the client went away), "
                             "BACKEND (the model failed), OTHER (the request was refused).",
                             ("model", "version", "reason"))
        self.inferences = total("nv_inference_count", "Images inferred (Triton's inference count).")
        self.executions = total("nv_inference_exec_count", "Batches run (Triton's execution count).")
        self.request_us = total("nv_inference_request_duration_us", "Cumulative request time, microseconds.")
        self.queue_us = total("nv_inference_queue_duration_us", "Cumulative time requests waited for their "
                              "batch, microseconds.")
        self.compute_us = {phase: total(f"nv_inference_compute_{phase}_duration_us", f"Cumulative {what} time of "
                                        "requests (their batch's), microseconds.")
                           for phase, what in (("input", "compute-input (gathering a batch's inputs)"),
                                               ("infer", "inference"),
                                               ("output", "compute-output (splitting a batch's outputs)"))}
        self.pending = Gauge("nv_inference_pending_request_count", "Requests waiting for their batch (Triton's "
                             "name; all workers).", ["model", "version"], registry=registry,
                             multiprocess_mode="livesum")

    def of(self, model: str, version: str) -> ModelMetrics:
        """The metrics of one model version, their label values bound once."""
        labels = (model, version)
        return ModelMetrics(
            self.success.labels(*labels), {r: self.failure.labels(*labels, r) for r in FAILURE_REASONS},
            self.inferences.labels(*labels), self.executions.labels(*labels), self.request_us.labels(*labels),
            self.queue_us.labels(*labels), {p: g.labels(*labels) for p, g in self.compute_us.items()})


@dataclass(frozen=True)
class ModelMetrics:
    """One model version's Triton metrics (TritonMetrics.of)."""

    success: Gauge
    failure: dict[str, Gauge]
    inferences: Gauge
    executions: Gauge
    request_us: Gauge
    queue_us: Gauge
    compute_us: dict[str, Gauge]

    def request(self, seconds: float, failure: str | None) -> None:
        """A request answered: ``failure`` is Triton's reason, None for a success."""
        (self.success if failure is None else self.failure[failure]).inc()
        self.request_us.inc(seconds * 1e6)

    def batch(self, stats: BatchStats) -> None:
        """A batch run: each of its requests' compute times is the batch's, as in Triton's statistics."""
        requests = len(stats.queue_seconds)
        self.inferences.inc(stats.size)
        self.executions.inc()
        self.queue_us.inc(sum(stats.queue_seconds) * 1e6)
        for phase, seconds in (("input", stats.input_seconds), ("infer", stats.infer_seconds),
                               ("output", stats.output_seconds)):
            self.compute_us[phase].inc(seconds * 1e6 * requests)


class WorkerFilesCollector(MultiProcessCollector):
    """The workers' samples, summed from their files (prometheus-client's multiprocess mode), less
    the files of a worker that is starting: for an instant after it creates one the file is empty,
    and prometheus-client fails the whole scrape on reading it (a 500, which Prometheus takes for
    a server down). A file once sized is never empty again, so leaving out those empty when looked
    at closes that window."""

    def __init__(self, registry: CollectorRegistry, folder: str) -> None:
        self.folder = folder
        super().__init__(registry, path=folder)

    def collect(self) -> Iterable[Metric]:
        return self.merge([file for file in glob.glob(os.path.join(self.folder, "*.db")) if _sized(file)])


def _sized(file: str) -> bool:
    try:
        return os.path.getsize(file) > 0
    except FileNotFoundError:  # a dead worker's live gauges, removed since the folder was listed
        return False


class ServerProcessCollector(Collector):
    """The server's CPU, memory and open files under prometheus-client's ``process_*`` names, for
    the whole server: this process and its descendants, which under --workers are the workers
    (prometheus-client's own ProcessCollector sees one process, and its multiprocess mode none).
    So one worker and many serve the same series, and `resserve bench serve --target` reads a
    server's CPU per request from them wherever it runs.

    ``process_cpu_seconds_total`` includes workers that ended (restarted ones) and never goes
    down, so ``rate()`` reads no reset when a worker is restarted."""

    OWN = ("process_start_time_seconds", "process_max_fds")  # this process's, from prometheus-client

    def __init__(self) -> None:
        self._cpu_seconds = 0.0  # the most reported
        self._lock = threading.Lock()  # scrapes may come at once
        self._own = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        usage = tree_usage(os.getpid())
        if usage is None:  # no /proc (not Linux)
            return
        with self._lock:  # a worker waited for while it was read is left out of one reading: not a reset
            self._cpu_seconds = max(self._cpu_seconds, usage.cpu_seconds)
            cpu_seconds = self._cpu_seconds
        yield CounterMetricFamily("process_cpu_seconds", "CPU time (user and system) of the server and its "
                                  "workers, those restarted included, in seconds.", value=cpu_seconds)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the server and its workers, "
                                "in bytes.", value=usage.resident_bytes)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory of the server and its workers, "
                                "in bytes.", value=usage.virtual_bytes)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the server or the worker that "
                                "holds the most (each process may hold process_max_fds).", value=usage.most_open_fds)
        yield from (family for family in self._own.collect() if family.name in self.OWN)
