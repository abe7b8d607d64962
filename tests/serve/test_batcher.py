"""The dynamic batcher on its own: batches form, results go back to the right requests, and
failures, deadlines, cancellations and a full queue each touch only the requests they concern."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from resserve.serve.batcher import BatchingConfig, DynamicBatcher
from resserve.serve.errors import DeadlineExpired, QueueFull, ShuttingDown


class Recorder:
    """An inference function (sum of each image) that records the batches it computed."""

    def __init__(self, delay: float = 0.0, fail_when=lambda batch: False) -> None:
        self.batches: list[np.ndarray] = []
        self.delay = delay
        self.fail_when = fail_when
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.batches.append(batch.copy())
        time.sleep(self.delay)
        if self.fail_when(batch):
            raise RuntimeError("backend exploded")
        return {"sum": batch.reshape(len(batch), -1).sum(1)}


def images(*values: float) -> np.ndarray:
    return np.stack([np.full((1, 28, 28), v, dtype=np.float32) for v in values])


def run(coroutine_factory, recorder: Recorder, **config):
    async def main():
        batcher = DynamicBatcher(recorder, BatchingConfig(**config).for_device("cpu"), ThreadPoolExecutor(1))
        batcher.start()
        try:
            return await coroutine_factory(batcher)
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_concurrent_requests_share_batches_and_get_their_own_results():
    recorder = Recorder()

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(images(i, i + 0.5)) for i in range(20)))

    results = run(scenario, recorder, max_batch_size=16, max_queue_delay_us=20_000)
    for i, result in enumerate(results):
        assert result["sum"].tolist() == pytest.approx([784 * i, 784 * (i + 0.5)])
    assert max(len(b) for b in recorder.batches) > 2  # requests were batched
    assert all(len(b) <= 16 for b in recorder.batches)


def test_a_request_larger_than_the_batch_limit_is_computed_in_chunks():
    recorder = Recorder()
    values = np.arange(50, dtype=np.float32) / 100
    result = run(lambda b: b.submit(images(*values)), recorder, max_batch_size=8)
    assert result["sum"] == pytest.approx(784 * values)
    assert max(len(b) for b in recorder.batches) == 8


def test_a_failing_batch_fails_only_its_own_requests():
    recorder = Recorder(fail_when=lambda batch: (batch == 0.9).any())

    async def scenario(batcher):
        bad = await asyncio.gather(batcher.submit(images(0.9)), return_exceptions=True)
        good = await batcher.submit(images(0.1))
        return bad[0], good

    bad, good = run(scenario, recorder, max_queue_delay_us=0)
    assert isinstance(bad, RuntimeError)
    assert good["sum"] == pytest.approx([78.4])


def test_a_full_queue_rejects_at_once():
    recorder = Recorder(delay=0.2)

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.submit(images(0.1)))
        await asyncio.sleep(0.05)  # the first batch is computing; the queue is empty again
        waiting = [asyncio.ensure_future(batcher.submit(images(0.2))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue full"):
            await batcher.submit(images(0.3))
        return await asyncio.gather(first, *waiting)

    results = run(scenario, recorder, max_queue_size=2, max_batch_size=1)
    assert len(results) == 3


def test_an_expired_request_is_answered_without_computing():
    recorder = Recorder(delay=0.2)

    async def scenario(batcher):
        busy = asyncio.ensure_future(batcher.submit(images(0.1)))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExpired):
            await batcher.submit(images(0.7), deadline=time.monotonic() + 0.05)
        await busy

    run(scenario, recorder, max_batch_size=1)
    assert not any((b == 0.7).any() for b in recorder.batches)


def test_a_cancelled_request_does_not_disturb_its_batch_mates():
    recorder = Recorder(delay=0.1)

    async def scenario(batcher):
        busy = asyncio.ensure_future(batcher.submit(images(0.05)))
        await asyncio.sleep(0.02)
        mates = [asyncio.ensure_future(batcher.submit(images(v))) for v in (0.1, 0.2, 0.3)]
        await asyncio.sleep(0)
        mates[1].cancel()
        return await busy, await mates[0], await mates[2], mates[1].cancelled()

    _, first, third, cancelled = run(scenario, recorder, max_batch_size=8, max_queue_delay_us=50_000)
    assert first["sum"] == pytest.approx([78.4]) and third["sum"] == pytest.approx([235.2])
    assert cancelled
    assert not any(np.isclose(b, 0.2).any() for b in recorder.batches)


def test_closing_runs_what_is_queued_at_once_without_waiting_out_the_batch_window():
    """No request joins a batch once the batcher closes, so what is queued runs then: with an hour
    of --max-queue-delay-us, closing waited the hour (a server's shutdown hung past its grace)."""
    recorder = Recorder()

    async def scenario(batcher):
        queued = asyncio.ensure_future(batcher.submit(images(1)))
        await asyncio.sleep(0.05)  # it waits for batch-mates
        await asyncio.wait_for(batcher.close(), 5)
        return await queued

    assert run(scenario, recorder, max_batch_size=8, max_queue_delay_us=3_600_000_000)["sum"].tolist() == [784.0]


# shape buckets -----------------------------------------------------------------------------------


def test_with_buckets_the_backend_sees_bucket_sizes_only_and_clients_never_see_padding():
    recorder = Recorder(delay=0.002)

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(images(*range(i, i + 1 + i % 3))) for i in range(1, 30)))

    results = run(scenario, recorder, max_batch_size=16, buckets=(1, 4, 16))
    assert {len(b) for b in recorder.batches} <= {1, 4, 16}
    for i, result in enumerate(results, start=1):  # the rows asked for, nothing else
        assert result["sum"].tolist() == pytest.approx([784 * v for v in range(i, i + 1 + i % 3)])
    padded = [b for b in recorder.batches if not b.reshape(len(b), -1).any(axis=1)[-1]]
    assert padded, "some batch was padded with zero images"


def test_buckets_by_device_powers_of_two_on_cuda_none_on_the_cpu():
    config = BatchingConfig(max_batch_size=48)
    assert config.for_device("cuda").buckets == (1, 2, 4, 8, 16, 32, 48)
    assert config.for_device("cpu").buckets == ()
    assert config.for_device("cpu").shapes() == (1, 48)  # warmed: the smallest and largest batch
    assert BatchingConfig(max_batch_size=8, buckets=(2, 8)).for_device("cuda").shapes() == (2, 8)  # as given


def test_max_batch_size_by_device_unless_given():
    cuda, cpu = BatchingConfig().for_device("cuda"), BatchingConfig().for_device("cpu")
    assert (cuda.max_batch_size, cuda.buckets) == (256, (1, 2, 4, 8, 16, 32, 64, 128, 256))
    assert (cpu.max_batch_size, cpu.buckets) == (64, ())
    assert BatchingConfig(buckets=(4, 32)).for_device("cuda").max_batch_size == 32  # the largest bucket
    assert BatchingConfig(buckets=()).for_device("cuda").max_batch_size == 256  # none: the device's
    assert BatchingConfig(max_batch_size=16).for_device("cuda").max_batch_size == 16


def test_bucket_settings_are_checked():
    from resserve.serve.errors import ResserveError
    from resserve.serve.settings import parse_buckets, parse_max_batch_size

    assert parse_buckets("auto", 64) is None and parse_buckets("none", 64) == ()
    assert parse_buckets("64,1,8,8", 64) == (1, 8, 64)
    assert parse_buckets("1,8", None) == (1, 8)  # --max-batch-size auto: the largest bucket is the max
    for bad in ("1,8", "0,64", "x"):
        with pytest.raises(ResserveError, match="--batch-buckets"):
            parse_buckets(bad, 64)
    assert parse_max_batch_size("auto") is None and parse_max_batch_size("128") == 128
    with pytest.raises(ResserveError, match="--max-batch-size must be auto or a number"):
        parse_max_batch_size("lots")


def test_shedding_answers_the_queued_requests_uncomputed_while_the_running_batch_finishes():
    recorder = Recorder(delay=0.3)

    async def scenario(batcher):
        running = asyncio.ensure_future(batcher.submit(images(1)))
        await asyncio.sleep(0.1)  # its batch is computing
        queued = [asyncio.ensure_future(batcher.submit(images(2 + i))) for i in range(3)]
        await asyncio.sleep(0)
        shed = batcher.shed()
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        return shed, await running, outcomes

    shed, running, outcomes = run(scenario, recorder, max_batch_size=8)
    assert shed == 3 and running["sum"].tolist() == [784.0]
    assert all(isinstance(outcome, ShuttingDown) for outcome in outcomes)
    assert [b[:, 0, 0, 0].tolist() for b in recorder.batches] == [[1.0]]  # none of the shed ones computed
