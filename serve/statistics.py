"""Per-model-version inference statistics, as Triton's statistics extension reports them.

Fed by every batch the batcher runs (``BatchStats``, as the Prometheus metrics are) and every
inference request the data plane runs on the version (``request``). Protocol-neutral: the KServe
codec turns them into a ``ModelStatisticsResponse``. Times are cumulative nanoseconds, as in
Triton: per request for success, fail, queue and the three compute phases (a request's compute
times are those of the batch it ran in), and per batch size for the batches themselves. Triton's
clients rely on the three compute phases counting the same requests: perf_analyzer refuses
statistics where they differ.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from resserve.serve.batcher import BatchStats
from resserve.serve.errors import DeadlineExpired, QueueFull, ResserveError, ShuttingDown


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, times: int = 1) -> None:
        self.count += times
        self.ns += int(seconds * 1e9) * times


@dataclass
class Compute:
    """Triton's three compute phases: gathering the inputs into a batch, inference, splitting
    the outputs."""

    input: Duration = field(default_factory=Duration)
    infer: Duration = field(default_factory=Duration)
    output: Duration = field(default_factory=Duration)

    def add(self, stats: BatchStats, times: int = 1) -> None:
        self.input.add(stats.input_seconds, times)
        self.infer.add(stats.infer_seconds, times)
        self.output.add(stats.output_seconds, times)


@dataclass
class ModelStatistics:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Compute = field(default_factory=Compute)  # per request
    inference_count: int = 0  # images inferred
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # milliseconds since the epoch, 0 before the first
    batches: dict[int, Compute] = field(default_factory=dict)  # batch size -> per batch
    in_flight: int = 0  # requests inside ``request``
    # each request answered: its seconds and Triton's reason for a failure (None: a success), for
    # Triton's metrics (serve/metrics.py)
    on_request: Callable[[float, str | None], None] = lambda seconds, failure: None

    def record_batch(self, stats: BatchStats) -> None:
        self.inference_count += stats.size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        for seconds in stats.queue_seconds:
            self.queue.add(seconds)
        self.compute.add(stats, times=len(stats.queue_seconds))
        self.batches.setdefault(stats.size, Compute()).add(stats)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Time one inference request: a success, or a failure if it raises (or is cancelled); and
        count it in flight meanwhile (a model being replaced finishes what it has taken)."""
        started, failure = time.monotonic(), None
        self.in_flight += 1
        try:
            yield
        except BaseException as exc:
            failure = failure_reason(exc)
            raise
        finally:
            self.in_flight -= 1
            seconds = time.monotonic() - started
            (self.success if failure is None else self.fail).add(seconds)
            self.on_request(seconds, failure)


def failure_reason(exc: BaseException) -> str:
    """Triton's reason for a failed request (its metrics' ``reason`` label)."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELED"
    if isinstance(exc, (QueueFull, DeadlineExpired, ShuttingDown)):
        return "REJECTED"
    return "OTHER" if isinstance(exc, ResserveError) else "BACKEND"
