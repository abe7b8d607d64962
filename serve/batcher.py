"""The dynamic batcher: one per loaded model, shared by both APIs.

Requests wait in a bounded queue. The batcher takes the oldest request, waits at most
``max_queue_delay`` for more, and runs up to ``max_batch_size`` images at once in an executor
thread, so the event loop keeps accepting while a batch computes. Then it splits the outputs
back to the requests, in order.

- A full queue rejects at once (``QueueFull`` -> UNAVAILABLE); the queue never grows unbounded.
- At shutdown, what is queued is computed (``close``), or, once the grace period is over,
  answered ``ShuttingDown`` uncomputed (``shed``).
- A request whose deadline passed before its batch runs is answered ``DeadlineExpired``
  without computing; a cancelled request is skipped and never disturbs its batch-mates.
- An exception during inference fails that batch's requests only; the batcher keeps running.
- A request with more images than ``max_batch_size`` runs alone, in chunks.
- With shape buckets (``BatchingConfig.buckets``), every batch runs at one of a fixed set of
  sizes, zero-padded up to the next one: a backend that compiles per shape (cuDNN's algorithm
  search on CUDA) does so only for the buckets, all warmed before the server is ready. Padded
  rows are cut off before the outputs are split: no client ever sees them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np

from resserve.serve.aio import set_within
from resserve.serve.backends.base import Outputs, infer_in_chunks
from resserve.serve.errors import SHUTTING_DOWN_MESSAGE, DeadlineExpired, QueueFull, ShuttingDown


@dataclass
class BatchStats:
    """What one batch looked like, for the metrics and Triton's statistics (its three compute
    phases: gathering the requests' inputs into one batch, inference, splitting the outputs)."""

    size: int
    queue_seconds: list[float]
    infer_seconds: float
    input_seconds: float
    output_seconds: float


class BatchTimes(Protocol):
    """What is told the times of a request's batch (a trace of it: serve/tracing.py)."""

    def computed(self, queued: float, started: float, gathered: float, inferred: float, ended: float) -> None: ...


@dataclass
class _Pending:
    inputs: np.ndarray  # float32 [n,1,28,28]
    future: asyncio.Future
    deadline: float | None  # time.monotonic() value, or None for no deadline
    trace: BatchTimes | None = None  # told its batch's times, if the request is traced
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return len(self.inputs)


# The most images one batch holds when --max-batch-size is auto, by device. On the CPU batch 64
# already reaches the in-process peak; on a GPU throughput keeps growing to batch 256 (43,000
# images/s at 64, 59,000 at 256 with CUDA graphs, H100), and batch 1024 adds a tenth more for
# four times the latency of a batch (docs/benchmarks.md "GPU").
DEFAULT_MAX_BATCH_SIZE = {"cpu": 64, "cuda": 256}


@dataclass(frozen=True)
class BatchingConfig:
    # None: chosen by the device (for_device): the largest bucket given, else DEFAULT_MAX_BATCH_SIZE
    max_batch_size: int | None = None
    # 0, as Triton's default: run what is queued as soon as the backend is free. Requests that
    # arrive while a batch computes form the next batch, so batches still grow with load, and a
    # lone request never waits for company that is not coming.
    max_queue_delay_us: int = 0
    max_queue_size: int = 256  # requests
    # Batch sizes batches are padded up to (the largest: max_batch_size); () = any size; None =
    # chosen by the device (for_device).
    buckets: tuple[int, ...] | None = None

    def for_device(self, device: str) -> "BatchingConfig":
        """The max batch size and buckets resolved for ``device``. Buckets: powers of two on CUDA,
        where each new shape costs a cuDNN algorithm search; none on the CPU, where padding only
        adds work (docs/benchmarks.md "Shape buckets")."""
        largest = self.max_batch_size or (self.buckets[-1] if self.buckets else DEFAULT_MAX_BATCH_SIZE[device])
        buckets = self.buckets
        if buckets is None:
            powers = {2 ** i for i in range(largest.bit_length()) if 2 ** i < largest}
            buckets = tuple(sorted({*powers, largest})) if device == "cuda" else ()
        return replace(self, max_batch_size=largest, buckets=buckets)

    def shapes(self) -> tuple[int, ...]:
        """The batch sizes warmed before ready: the buckets, or the smallest and largest batch."""
        return self.buckets or tuple(sorted({1, self.max_batch_size}))


def padded_to_buckets(infer: Callable[[np.ndarray], Outputs], buckets: tuple[int, ...]) -> Callable[[np.ndarray], Outputs]:
    """``infer`` run at bucket sizes only: a batch of n is zero-padded to the smallest bucket >= n
    and its outputs cut back to n rows. Batches are at most the largest bucket (the batcher's
    max_batch_size chunks them)."""
    if not buckets:
        return infer

    def run(batch: np.ndarray) -> Outputs:
        size = len(batch)
        bucket = next(b for b in buckets if b >= size)
        if bucket == size:
            return infer(batch)
        padded = np.zeros((bucket, *batch.shape[1:]), dtype=batch.dtype)
        padded[:size] = batch
        return {name: value[:size] for name, value in infer(padded).items()}

    return run


class DynamicBatcher:
    def __init__(self, infer: Callable[[np.ndarray], Outputs], config: BatchingConfig, executor: Executor,
                 on_batch: Callable[[BatchStats], None] = lambda stats: None) -> None:
        if config.max_batch_size is None or config.buckets is None:
            raise ValueError("the batcher needs a config resolved for its device: BatchingConfig.for_device")
        self._infer = padded_to_buckets(infer, config.buckets)
        self.config = config
        self._executor = executor
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")

    async def submit(self, inputs: np.ndarray, deadline: float | None = None,
                     trace: BatchTimes | None = None) -> Outputs:
        """Queue ``inputs`` [n,1,28,28] and wait for their outputs ({name: [n,...]}); ``trace``
        is told their batch's times."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if len(self._queue) >= self.config.max_queue_size:
            raise QueueFull(f"queue full ({self.config.max_queue_size} requests waiting); retry later")
        pending = _Pending(inputs, asyncio.get_running_loop().create_future(), deadline, trace)
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future  # cancelling the caller cancels the future: _take skips it

    def shed(self) -> int:
        """Answer every queued request ShuttingDown (retryable), uncomputed; the batch running
        finishes. For a shutdown whose grace period is over: the queue may hold minutes of work
        for clients that have no deadline. Returns how many were shed."""
        shed = 0
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown(SHUTTING_DOWN_MESSAGE))
                shed += 1
        return shed

    async def close(self) -> None:
        """Stop taking requests, finish what is queued, then let the loop end."""
        self._closed = True
        self._arrived.set()  # wake the loop if it waits on an empty queue
        if self._task:
            await self._task

    # ------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while self._queue or not self._closed:
            batch = await self._next_batch()
            if batch:
                await self._execute(batch)

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        return await set_within(self._arrived, timeout)

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            if self._closed:
                return []
            await self._wait_for_arrival(None)
        window_closes = self._queue[0].enqueued + self.config.max_queue_delay_us / 1e6
        # no request joins once the batcher closes: what is queued runs then, the window not waited out
        while not self._closed and sum(p.size for p in self._queue) < self.config.max_batch_size:
            remaining = window_closes - time.monotonic()
            if remaining <= 0 or not await self._wait_for_arrival(remaining):
                break
        return self._take()

    def _take(self) -> list[_Pending]:
        """Up to max_batch_size images of live requests, oldest first; expired ones answered."""
        batch, images, now = [], 0, time.monotonic()
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # cancelled by its client
                self._queue.popleft()
                continue
            if pending.deadline is not None and pending.deadline <= now:
                self._queue.popleft()
                pending.future.set_exception(DeadlineExpired("deadline exceeded while queued; not computed"))
                continue
            if batch and images + pending.size > self.config.max_batch_size:
                break
            batch.append(self._queue.popleft())
            images += pending.size
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        inputs = batch[0].inputs if len(batch) == 1 else np.concatenate([p.inputs for p in batch])
        gathered = time.monotonic()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._executor, infer_in_chunks, self._infer, inputs, self.config.max_batch_size)
        except Exception as exc:  # noqa: BLE001 - fails this batch only; the loop goes on
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        inferred = time.monotonic()
        offset = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result({k: v[offset:offset + pending.size] for k, v in outputs.items()})
            offset += pending.size
        ended = time.monotonic()
        for pending in batch:
            if pending.trace:
                pending.trace.computed(pending.enqueued, started, gathered, inferred, ended)
        self._on_batch(BatchStats(len(inputs), [started - p.enqueued for p in batch], inferred - gathered,
                                  gathered - started, ended - inferred))
