import asyncio
import threading

import numpy as np
import pytest

from byorl.service.serving.batcher import Batcher, QueueFull


class Model:
    """A deterministic stand-in network: row -> [sum, max]; records each call's batch size."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[int] = []
        self.fail_on = fail_on
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and self.fail_on in x[:, 0]:
            raise RuntimeError("model failed")
        return np.stack([x.reshape(len(x), -1).sum(1), x.reshape(len(x), -1).max(1)], 1)


def requests(sizes: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (n, 3, 2, 2)).astype(np.float32) for n in sizes]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    sizes = [1, 3, 2, 1, 4, 1, 1, 2, 3, 1, 2, 1]

    async def main():
        model = Model()
        batcher = Batcher(model, max_batch=8, wait_ms=50)
        batcher.start()
        xs = requests(sizes)
        outs = await asyncio.gather(*(batcher(x) for x in xs))
        await batcher.stop()
        return model, xs, outs

    model, xs, outs = run(main())
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out, Model()(x))
    # All requests were queued before the loop ran: greedy packing in arrival order.
    expected, size = [], 0
    for n in sizes:
        if size + n > 8:
            expected.append(size)
            size = 0
        size += n
    expected.append(size)
    assert model.calls == expected == [7, 8, 7]
    assert model.threads == {"batcher_0"}  # one model call at a time, off the event loop


def test_large_request_is_split_into_batches():
    async def main():
        model = Model()
        batcher = Batcher(model, max_batch=8, wait_ms=0)
        batcher.start()
        (x,) = requests([20])
        out = await batcher(x)
        await batcher.stop()
        return model, x, out

    model, x, out = run(main())
    np.testing.assert_array_equal(out, Model()(x))
    assert sum(model.calls) == 20 and max(model.calls) <= 8


def test_a_model_error_fails_its_batch_only():
    async def main():
        model = Model(fail_on=-1.0)
        batcher = Batcher(model, max_batch=4, wait_ms=20)
        batcher.start()
        bad = np.full((1, 3, 2, 2), -1.0, np.float32)
        good = requests([2, 2])
        results = await asyncio.gather(batcher(bad), batcher(good[0]), return_exceptions=True)
        later = await batcher(good[1])  # the loop survived
        await batcher.stop()
        return results, later, good

    (r_bad, r_good), later, good = run(main())
    assert isinstance(r_bad, RuntimeError) and isinstance(r_good, RuntimeError)  # same batch
    np.testing.assert_array_equal(later, Model()(good[1]))


def test_cancelled_request_does_not_disturb_the_others():
    async def main():
        model = Model()
        batcher = Batcher(model, max_batch=8, wait_ms=30)
        batcher.start()
        xs = requests([2, 3, 1])
        tasks = [asyncio.create_task(batcher(x)) for x in xs]
        await asyncio.sleep(0)  # all three are queued
        tasks[1].cancel()
        outs = await asyncio.gather(tasks[0], tasks[2])
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        await batcher.stop()
        return model, xs, outs

    model, xs, outs = run(main())
    np.testing.assert_array_equal(outs[0], Model()(xs[0]))
    np.testing.assert_array_equal(outs[1], Model()(xs[2]))
    assert model.calls == [3]  # the cancelled request's rows were never computed


def test_a_lone_client_never_waits_for_company():
    """The wait for more requests applies only while requests arrive concurrently."""

    async def main():
        model = Model()
        batcher = Batcher(model, max_batch=8, wait_ms=600_000)  # a wait would be ten minutes
        batcher.start()
        outs = [await asyncio.wait_for(batcher(x), 60) for x in requests([1, 2, 1])]
        await batcher.stop()
        return model, outs

    model, outs = run(main())
    assert model.calls == [1, 2, 1] and [len(o) for o in outs] == [1, 2, 1]


def test_a_full_queue_refuses_whole_requests_until_it_drains():
    """Past `max_queued` waiting images a request is refused (QueueFull, with a retry delay from
    the measured rate); a request into an empty queue always goes through, however large."""

    async def main():
        gate, entered = threading.Event(), threading.Event()
        model = Model()

        def slow(x):
            entered.set()
            gate.wait(30)
            return model(x)

        batcher = Batcher(slow, max_batch=4, wait_ms=0, max_queued=8)
        batcher.start()
        big = asyncio.create_task(batcher(requests([9])[0]))  # > the bound, into an empty queue
        await asyncio.to_thread(entered.wait, 30)  # chunks 3+3+3: 3 in the model, 6 wait
        waiting = asyncio.create_task(batcher(requests([1])[0]))  # 6 + 1 <= 8: queued
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await batcher(requests([2])[0])  # 7 + 2 > 8
        gate.set()
        outs = await asyncio.gather(big, waiting)
        after = await batcher(requests([8])[0])  # drained: accepted again
        await batcher.stop()
        return refused.value, outs, after

    refused, outs, after = run(main())
    assert refused.retry_after_s == 1 and "7 images are waiting" in str(refused)
    assert [len(o) for o in outs] == [9, 1] and len(after) == 8
