"""Dynamic batching, as Triton does it: requests that arrive close together run as one
model batch of at most `max_batch` items, and the first item waits at most `max_delay_s`
for others. Only one batch runs at a time, on its own thread; the event loop stays free
to decode the next requests meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

Item = TypeVar("Item")


class QueueFull(RuntimeError):
    """More items are waiting than the queue allows: the caller should back off."""


class BatcherStopped(RuntimeError):
    """The batcher is shutting down and takes no new items."""


@dataclass
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future[np.ndarray]
    deadline: float | None  # loop time after which nobody waits for the result


@dataclass
class BatchStats:
    """Counts for metrics and tests: how many batches ran and of what sizes."""

    batches: int = 0
    items: int = 0
    sizes: list[int] = field(default_factory=list)

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        if len(self.sizes) < 10_000:
            self.sizes.append(size)


class DynamicBatcher(Generic[Item]):
    """Gathers items from concurrent calls into batches for `run_batch`, which maps a
    list of items to an (n, dim) array and runs on `executor`."""

    def __init__(self, run_batch: Callable[[list[Item]], np.ndarray], *, max_batch: int,
                 max_delay_s: float, max_queue: int, executor: Executor,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._executor = executor
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[Item]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(BatcherStopped("the encoder is shutting down"))

    async def submit(self, items: Sequence[Item], timeout_s: float | None = None) -> np.ndarray:
        """Encodes `items` (possibly across several batches); their (n, dim) vectors in order.

        Raises QueueFull at once when they do not fit the queue, and TimeoutError when
        `timeout_s` passes first (their work is then skipped, not wasted)."""
        if self._worker is None:
            raise BatcherStopped("the batcher is not running")
        if self._queue.qsize() + len(items) > self._max_queue:
            raise QueueFull(f"{self._queue.qsize()} items already queued; "
                            f"the queue holds {self._max_queue}")
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        futures = []
        for item in items:
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.put_nowait(_Pending(item, future, deadline))
            futures.append(future)
        try:
            rows = await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return np.stack(rows)

    async def _next_batch(self) -> list[_Pending[Item]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        flush_at = loop.time() + self._max_delay_s
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = flush_at - loop.time()
            if remaining <= 0:
                break
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can drop an item
            # that arrives just as the timeout fires.
            getter = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({getter}, timeout=remaining)
            if not getter.done():
                getter.cancel()
                await asyncio.wait({getter})
            if getter.cancelled():
                break
            batch.append(getter.result())
        now = loop.time()
        live = []
        for pending in batch:
            if pending.future.done():
                continue  # cancelled by its caller: skip the work
            if pending.deadline is not None and now > pending.deadline:
                pending.future.cancel()
                continue
            live.append(pending)
        return live

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                vectors = await loop.run_in_executor(
                    self._executor, self._run_batch, [p.item for p in batch])
            except Exception as exc:  # a model failure fails this batch, not the server
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            self.stats.record(len(batch))
            if self._on_batch is not None:
                self._on_batch(len(batch), time.perf_counter() - started)
            for pending, vector in zip(batch, vectors, strict=True):
                if not pending.future.done():
                    pending.future.set_result(vector)
