"""Dynamic batching: requests that arrive together share one model call.

Each request's images wait in a queue; a single loop takes everything queued (up to `max_batch`
images), runs the model once in a worker thread, and hands each request its rows. Requests that
arrive while the model runs form the next batch, so under many concurrent clients the model sees
large batches and throughput approaches the offline batch throughput. While requests do arrive
concurrently (the last batch held several), the loop also waits up to `wait_ms` for more; a lone
client never waits.

The queue is bounded: a request that would take it past `max_queued` images is refused whole
with `QueueFull` (the api answers 429 with Retry-After), unless the queue is empty, so that any
request within the per-request limits goes through eventually.
"""

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from byorl.service.exceptions import Busy
from byorl.service.metrics import BATCH_QUEUE, BATCH_SIZE


class QueueFull(Busy):
    """The embedding queue is at its bound; try again after `retry_after_s` seconds."""

    def __init__(self, queued: int, bound: int, retry_after_s: int):
        super().__init__("queue_full", f"{queued} images are waiting to be embedded (the bound "
                         f"is {bound}): retry later", retry_after_s)


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, wait_ms: float,
                 max_queued: int | None = None):
        self.run, self.max_batch, self.wait_s = run, max_batch, wait_ms / 1000
        self.max_queued = max_queued
        self._rate = 0.0  # images per second of the last model call (0: none yet)
        self._waiting: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="batcher")
        self._task: asyncio.Task | None = None
        self._concurrent = False  # did the last batch hold more than one request?
        self.closed = False  # stopped: takes no more requests

    def start(self) -> None:
        """Start the batching loop on the running event loop (once; the first call does it
        too, for a model loaded later in a worker thread)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._waiting:
            future.cancel()
        self._executor.shutdown(wait=True)

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        """Model outputs for the rows of x, computed together with concurrent requests."""
        if self.closed:
            raise RuntimeError("the batcher is stopped")
        self.start()
        queued = self._queued()
        if self.max_queued is not None and queued and queued + len(x) > self.max_queued:
            raise QueueFull(queued, self.max_queued, self._retry_after(queued))
        loop = asyncio.get_running_loop()
        futures = []
        for chunk in np.array_split(x, -(-len(x) // self.max_batch)):
            futures.append(loop.create_future())
            self._waiting.append((chunk, futures[-1]))
            BATCH_QUEUE.inc(len(chunk))
        self._arrived.set()
        return np.concatenate(await asyncio.gather(*futures))

    def _fits(self, batch: list, size: int) -> bool:
        """The next waiting request joins the batch (a first one always does)."""
        return not batch or size + len(self._waiting[0][0]) <= self.max_batch

    def _queued(self) -> int:
        return sum(len(x) for x, _ in self._waiting)

    def _retry_after(self, queued: int) -> int:
        """Whole seconds until the queue has likely drained, at the last measured rate."""
        return max(1, math.ceil(queued / self._rate)) if self._rate else 1

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + (self.wait_s if self._concurrent else 0)
            while self._queued() < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch, size = [], 0
            while self._waiting and self._fits(batch, size):
                batch.append(self._waiting.popleft())
                size += len(batch[-1][0])
            BATCH_QUEUE.dec(size)
            self._concurrent = len(batch) > 1
            live = [(x, f) for x, f in batch if not f.cancelled()]  # clients that went away
            if not live:
                continue
            BATCH_SIZE.observe(sum(len(x) for x, _ in live))
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(
                    self._executor, self.run, np.concatenate([x for x, _ in live])
                )
            except Exception as exc:  # the model failed: every request of the batch fails
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self._rate = len(out) / max(time.perf_counter() - start, 1e-6)
            row = 0
            for x, f in live:
                if not f.done():
                    f.set_result(out[row : row + len(x)])
                row += len(x)
