"""In-process timing helpers shared by export reports and the benchmarks."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable


MIN_REPEATS = 10  # calls a median is taken over at the least, however slow each is


def median_seconds(run: Callable[[], object], repeats: int = 30, warmup: int = 3,
                   max_seconds: float = math.inf) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after ``warmup`` untimed calls; fewer
    calls (but at least MIN_REPEATS) when they would take longer than ``max_seconds``."""
    for _ in range(warmup):
        run()
    samples = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
        if len(samples) >= MIN_REPEATS and started > deadline:
            break
    return statistics.median(samples)


def images_per_second(run: Callable[[], object], batch_size: int, min_seconds: float = 1.0, warmup: int = 2) -> float:
    """Throughput of repeated ``run()`` calls on batches of ``batch_size``, timed for at least ``min_seconds``."""
    for _ in range(warmup):
        run()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds or calls < 3:
        run()
        calls += 1
    return calls * batch_size / elapsed
