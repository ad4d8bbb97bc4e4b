"""Dynamic batching, as Triton does it: requests that arrive close together run as one
batch of at most `max_batch` items, and the first item waits at most `max_delay_s` for
others. At most `concurrency` batches run at once (the encoder: one, on its model thread);
the event loop stays free to prepare the next requests meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(RuntimeError):
    """More items are waiting than the queue allows: the caller should back off."""


class BatcherStopped(RuntimeError):
    """The batcher is shutting down and takes no new items."""


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    deadline: float | None  # loop time after which nobody waits for the result


class DynamicBatcher(Generic[Item, Result]):
    """Gathers items from concurrent calls into batches for `run_batch`, which maps a list
    of items to one result per item, in order."""

    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[Sequence[Result]]], *,
                 max_batch: int, max_delay_s: float, max_queue: int, concurrency: int = 1,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._slots = asyncio.Semaphore(concurrency)
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[Item, Result]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._queue.qsize()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, *self._running, return_exceptions=True)
            self._worker = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(BatcherStopped("shutting down"))

    async def submit(self, items: Sequence[Item], timeout_s: float | None = None) -> list[Result]:
        """The results of `items` (possibly run across several batches), in order.

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
            future: asyncio.Future[Result] = loop.create_future()
            self._queue.put_nowait(_Pending(item, future, deadline))
            futures.append(future)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    async def _next_batch(self) -> list[_Pending[Item, Result]]:
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
            await self._slots.acquire()
            batch = await self._next_batch()
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        started = time.perf_counter()
        try:
            results = await self._run_batch([p.item for p in batch])
        except Exception as exc:  # a failed batch fails its items, not the server
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        if self._on_batch is not None:
            self._on_batch(len(batch), time.perf_counter() - started)
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)
