"""The load of ``resserve bench serve`` and what one level of it measured.

Two kinds of load, for ``duration`` seconds after ``warmup`` per level:

- closed loop (``Level(concurrency=C)``): each of C clients (one connection each) sends its next
  request as soon as the previous one returns: how much a server can do, and its latency when
  saturated;
- open loop (``Level(rate=R)``): requests arrive at random (Poisson) times, R per second on
  average, each sent when due whether or not earlier ones have returned, as independent users
  arrive; latency counts from when a request was due, so a server (or load generator) that falls
  behind cannot hide its queue. What a server costs (CPU) and answers at a given traffic.

The Python clients (clients.py) are spread over load processes; perf_analyzer (perf_analyzer.py)
is one process of its own. Either way a level's row holds the load's side (latencies, errors,
the load generator's CPU) and the server's (the batch sizes and queue time in its metrics, the
CPU time of its process tree).
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import queue
import time
import urllib.request
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from resserve.serve.bench import perf_analyzer
from resserve.serve.bench.clients import Level, LoadResult, LoadSpec, sender
from resserve.serve.bench.report import LevelResult
from resserve.serve.connections import raise_open_file_limit
from resserve.serve.errors import ResserveError
from resserve.serve.processes import tree_usage

LOAD_PROCESS_WAIT_SECONDS = 120.0  # the longest a ready load process waits for the others and the start
LOAD_START_MARGIN_SECONDS = 0.1  # from the last load process ready to the common start
OPEN_LOOP_CONNECTIONS = 8  # per load process: open-loop requests take turns over these clients
OPEN_LOOP_MAX_OUTSTANDING = 1024  # per load process: arrivals beyond this many unanswered are not sent, but counted
# per open-loop client over REST (HTTP/1.1: a connection per request in flight), so that all of
# OPEN_LOOP_MAX_OUTSTANDING can be in flight: fewer would queue requests in the client, unsent
OPEN_LOOP_HTTP_CONNECTIONS = OPEN_LOOP_MAX_OUTSTANDING // OPEN_LOOP_CONNECTIONS
# the samples of the server's batch histograms a level reads (ServerTotals' fields, in order)
BATCH_SAMPLES = ("resserve_batch_size_sum", "resserve_batch_size_count", "resserve_queue_seconds_sum",
                 "resserve_queue_seconds_count")
CPU_SAMPLE = "process_cpu_seconds_total"  # the server's and its workers' (serve/metrics.py)


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
    OPEN_LOOP_CONNECTIONS clients; an arrival finding OPEN_LOOP_MAX_OUTSTANDING requests
    unanswered is counted as an error, not sent, so memory stays bounded when the server cannot
    keep up."""
    gaps = np.random.default_rng(seed)
    raise_open_file_limit()  # over REST, a socket per request in flight
    async with AsyncExitStack() as stack:
        sends = [await stack.enter_async_context(sender(spec, OPEN_LOOP_HTTP_CONNECTIONS))
                 for _ in range(OPEN_LOOP_CONNECTIONS)]
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


@dataclass(frozen=True)
class ServerTotals:
    """What the server's /metrics count so far: its batch histograms, summed over models, versions
    and workers, and its CPU time (its workers' included)."""

    images: float = 0.0  # resserve_batch_size_sum
    batches: float = 0.0  # resserve_batch_size_count
    queue_seconds: float = 0.0  # resserve_queue_seconds_sum
    queued: float = 0.0  # resserve_queue_seconds_count: requests
    cpu_seconds: float | None = None  # process_cpu_seconds_total; None from a server without it

    def __sub__(self, earlier: ServerTotals) -> ServerTotals:
        known = self.cpu_seconds is not None and earlier.cpu_seconds is not None
        cpu = self.cpu_seconds - earlier.cpu_seconds if known else None
        return ServerTotals(self.images - earlier.images, self.batches - earlier.batches,
                            self.queue_seconds - earlier.queue_seconds, self.queued - earlier.queued, cpu)


def scrape(metrics_url: str | None) -> ServerTotals | None:
    """The totals in the server's /metrics; None when they cannot be read, or no URL names them."""
    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    sums = dict.fromkeys(BATCH_SAMPLES, 0.0)
    cpu_seconds = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in BATCH_SAMPLES:
                sums[sample.name] += sample.value
            elif sample.name == CPU_SAMPLE:
                cpu_seconds = sample.value
    return ServerTotals(*(sums[name] for name in BATCH_SAMPLES), cpu_seconds)


def tree_cpu_seconds(pid: int | None) -> float | None:
    """CPU time of a server this machine runs and its workers; None when there is no such process."""
    usage = tree_usage(pid) if pid is not None else None
    return usage.cpu_seconds if usage else None


def _run_share(spec: LoadSpec, level: Level, start_at: float, seed: int = 0) -> LoadResult:
    """One load process's share of the load, from ``start_at`` (time.time())."""
    cpu = time.process_time()
    latencies, errors, window = asyncio.run(_load(spec, level, start_at, seed))
    return LoadResult(latencies, errors, window, window + spec.warmup, time.process_time() - cpu, 1)


def _load_process(spec: LoadSpec, level: Level, seed: int, ready, go, start_at, results) -> None:
    """One load process: says it is ready once started (Python and this module imported), then runs
    its share from the start time every process is given, so that their loads overlap."""
    ready.put(seed)
    if go.wait(LOAD_PROCESS_WAIT_SECONDS):  # not set: the benchmark stopped before the start
        results.put(_run_share(spec, level, start_at.value, seed))


def _merged(parts: list[LoadResult], warmup: float) -> LoadResult:
    """The load processes' results as one: the measured window is the longest of theirs."""
    window = max(part.window for part in parts)
    return LoadResult([x for part in parts for x in part.latencies], sum((part.errors for part in parts), Counter()),
                      window, window + warmup, sum(part.client_cpu for part in parts), len(parts))


def _generate_load(spec: LoadSpec, level: Level, processes: int) -> LoadResult:
    """The load spread over at most ``processes`` Python load processes (this one when 1)."""
    shares = level.shares(processes)
    if len(shares) == 1:
        return _run_share(spec, level, time.time())
    context = multiprocessing.get_context("spawn")
    ready, go, start_at, results = context.Queue(), context.Event(), context.Value("d", 0.0), context.Queue()
    workers = [context.Process(target=_load_process, args=(spec, share, seed, ready, go, start_at, results))
               for seed, share in enumerate(shares)]
    for worker in workers:
        worker.start()
    try:
        _gather(ready, workers)
        start_at.value = time.time() + LOAD_START_MARGIN_SECONDS
        go.set()
        parts = _gather(results, workers)
    except BaseException:  # that, or Ctrl-C, or SIGTERM: the other load processes stop too
        for worker in workers:
            worker.terminate()
        raise
    for worker in workers:
        worker.join()
    return _merged(parts, spec.warmup)


def _gather(messages, workers: list) -> list:
    """A message from each of the load processes ``workers``, or ResserveError when one of them
    dies before it sent its message."""
    gathered = []
    while len(gathered) < len(workers):
        try:
            gathered.append(messages.get(timeout=1.0))
        except queue.Empty:
            if any(worker.exitcode not in (None, 0) for worker in workers):
                raise ResserveError("a load process failed (its error is above)") from None
    return gathered


def measure_level(spec: LoadSpec, level: Level, metrics_url: str | None, server_pid: int | None,
                  load_processes: int = 1) -> LevelResult:
    """One load level against a server: the load's side and the server's. Its CPU time is read
    from /proc where this machine runs it (``server_pid``), else from its metrics."""
    before, cpu_before = scrape(metrics_url), tree_cpu_seconds(server_pid)
    if spec.client == "perf_analyzer":
        load = perf_analyzer.generate_load(spec, level)
    else:
        load = _generate_load(spec, level, load_processes)
    after, cpu_after = scrape(metrics_url), tree_cpu_seconds(server_pid)
    totals = after - before if after is not None and before is not None else ServerTotals()
    server_cpu = cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else totals.cpu_seconds
    latencies, window = np.asarray(load.latencies) * 1e3, load.window
    p50, p90, p95, p99, top = (np.percentile(latencies, (50, 90, 95, 99, 100)) if len(latencies)
                               else [float("nan")] * 5)
    requests_per_second = len(latencies) / window
    server_cores = server_cpu / load.elapsed if server_cpu is not None else None
    return LevelResult(
        load=str(level), concurrency=level.concurrency or None, offered_rate=level.rate or None,
        requests_per_second=requests_per_second, images_per_second=requests_per_second * spec.batch,
        p50_ms=float(p50), p90_ms=float(p90), p95_ms=float(p95), p99_ms=float(p99), max_ms=float(top),
        ok=len(latencies), errors=dict(load.errors),
        mean_batch_size=totals.images / totals.batches if totals.batches else None,
        mean_queue_ms=totals.queue_seconds / totals.queued * 1e3 if totals.queued else None,
        load_processes=load.processes, client_cpu_cores=load.client_cpu / load.elapsed,
        server_cpu_cores=server_cores,
        server_cpu_ms_per_request=server_cores / requests_per_second * 1e3 if server_cores and latencies.size else None)
