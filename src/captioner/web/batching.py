"""Micro-batching of caption requests.

Requests arrive one image at a time. The batcher groups requests that share decoding options
(beam_size, max_length), waits at most ``window_s`` after the oldest one arrived for up to
``max_batch_size`` of them, and runs one ``captioner.caption(images, ...)`` call per group on a
bounded thread pool, so inference never runs on the event loop.

Admission is bounded: at most ``max_queue`` requests may be waiting (reading their upload,
decoding, or queued for a batch). Beyond that :meth:`MicroBatcher.admit` raises
:class:`QueueFullError` at once, which the app answers with 503.

All bookkeeping happens on the event loop thread; only ``caption()`` runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class CaptionerLike(Protocol):
    """What the web app needs from ``captioner.api.Captioner`` (fakes implement it too)."""

    def caption(
        self,
        images: Any,
        beam_size: int = 3,
        max_length: int = 20,
        return_attention: bool = True,
    ) -> list[Any]: ...


class QueueFullError(Exception):
    """Too many requests are waiting; the client should retry later (HTTP 503)."""


class BatcherClosedError(Exception):
    """The batcher is shutting down (HTTP 503)."""


@dataclass(frozen=True)
class BatchKey:
    beam_size: int
    max_length: int


@dataclass(eq=False)
class Ticket:
    """One admitted request. Hand it back with :meth:`MicroBatcher.release` when done."""

    dispatched: bool = False
    released: bool = False


@dataclass(eq=False)
class _Item:
    ticket: Ticket
    image: np.ndarray
    return_attention: bool
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatcherStats:
    waiting: int
    queued: int
    running_batches: int
    batches: int
    requests: int
    rejected: int


class MicroBatcher:
    """Collects requests into batches and runs them on ``workers`` threads."""

    def __init__(
        self,
        captioner: CaptionerLike,
        *,
        max_batch_size: int = 8,
        window_s: float = 0.010,
        max_queue: int = 64,
        workers: int = 1,
        shutdown_grace_s: float = 30.0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or workers < 1 or window_s < 0:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1, window_s >= 0")
        self.captioner = captioner
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.max_queue = max_queue
        self.workers = workers
        self.shutdown_grace_s = shutdown_grace_s
        self._pending: dict[BatchKey, deque[_Item]] = {}
        self._waiting = 0  # admitted, not yet dispatched
        self._running = 0
        self._batches = 0
        self._requests = 0
        self._rejected = 0
        self._executor: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the dispatcher; call from the event loop that will serve requests."""
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="captioner-infer")
        self._slots = asyncio.Semaphore(self.workers)
        self._wakeup = asyncio.Event()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="micro-batcher")

    async def close(self) -> None:
        """Refuse new work, fail queued requests, let running batches finish."""
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for queue in self._pending.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError("the server is shutting down"))
        self._pending.clear()
        if self._tasks:  # running batches get a grace period to finish
            await asyncio.wait(set(self._tasks), timeout=self.shutdown_grace_s)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> MicroBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ admission
    def admit(self) -> Ticket:
        """Reserve a place in the queue, or raise QueueFullError without waiting."""
        if self._closed:
            raise BatcherClosedError("the server is shutting down")
        if self._waiting >= self.max_queue:
            self._rejected += 1
            raise QueueFullError(
                f"server busy: {self._waiting} requests already waiting, try again shortly"
            )
        self._waiting += 1
        return Ticket()

    def release(self, ticket: Ticket) -> None:
        """Give back a ticket (idempotent); call in a ``finally``."""
        if not ticket.released and not ticket.dispatched:
            self._waiting -= 1
        ticket.released = True

    async def submit(
        self,
        ticket: Ticket,
        image: np.ndarray,
        *,
        beam_size: int = 3,
        max_length: int = 20,
        return_attention: bool = False,
    ) -> Any:
        """Queue one decoded image for an admitted ticket and wait for its CaptionResult."""
        if self._closed or self._wakeup is None:
            raise BatcherClosedError("the server is shutting down")
        if ticket.released or ticket.dispatched:
            raise RuntimeError("ticket already used")
        future = asyncio.get_running_loop().create_future()
        key = BatchKey(beam_size, max_length)
        self._pending.setdefault(key, deque()).append(
            _Item(ticket, image, return_attention, future)
        )
        self._wakeup.set()
        return await future

    async def caption(self, image: np.ndarray, **options: Any) -> Any:
        """admit + submit + release, for callers that have the image already."""
        ticket = self.admit()
        try:
            return await self.submit(ticket, image, **options)
        finally:
            self.release(ticket)

    def stats(self) -> BatcherStats:
        return BatcherStats(
            waiting=self._waiting,
            queued=sum(len(q) for q in self._pending.values()),
            running_batches=self._running,
            batches=self._batches,
            requests=self._requests,
            rejected=self._rejected,
        )

    # ------------------------------------------------------------------ dispatching
    def _live(self, key: BatchKey) -> deque[_Item]:
        """The queue for key with abandoned requests (client went away) dropped from the head."""
        queue = self._pending.get(key, deque())
        while queue and (queue[0].future.done() or queue[0].ticket.released):
            queue.popleft()
        return queue

    def _oldest_key(self) -> BatchKey | None:
        best: tuple[float, BatchKey] | None = None
        for key in list(self._pending):
            queue = self._live(key)
            if not queue:
                del self._pending[key]
                continue
            if best is None or queue[0].arrived < best[0]:
                best = (queue[0].arrived, key)
        return None if best is None else best[1]

    async def _wait(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _dispatch_loop(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()  # a worker is free
            try:
                key = self._oldest_key()
                while key is None:
                    await self._wait(None)
                    key = self._oldest_key()
                # Wait for the batch to fill, at most window_s after its oldest request arrived.
                deadline = self._live(key)[0].arrived + self.window_s
                while len(self._live(key)) < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    await self._wait(remaining)
                batch = self._take(key)
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run_batch(key, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, key: BatchKey) -> list[_Item]:
        queue = self._live(key)
        batch: list[_Item] = []
        while queue and len(batch) < self.max_batch_size:
            item = queue.popleft()
            if item.future.done() or item.ticket.released:
                continue
            item.ticket.dispatched = True
            self._waiting -= 1
            batch.append(item)
        if not queue:
            self._pending.pop(key, None)
        return batch

    async def _run_batch(self, key: BatchKey, batch: list[_Item]) -> None:
        assert self._slots is not None and self._executor is not None
        self._running += 1
        self._batches += 1
        self._requests += len(batch)
        loop = asyncio.get_running_loop()
        try:
            images = [item.image for item in batch]
            attention = any(item.return_attention for item in batch)
            try:
                results = await loop.run_in_executor(
                    self._executor, _call, self.captioner, images, key, attention
                )
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch[0], exc)
                    return
                # One bad image must not fail its neighbours: retry them one by one.
                for item in batch:
                    try:
                        (result,) = await loop.run_in_executor(
                            self._executor, _call, self.captioner, [item.image], key, attention
                        )
                    except Exception as single_exc:
                        _fail(item, single_exc)
                    else:
                        _succeed(item, result)
                return
            for item, result in zip(batch, results, strict=True):
                _succeed(item, result)
        finally:
            self._running -= 1
            self._slots.release()


def _call(
    captioner: CaptionerLike, images: Sequence[np.ndarray], key: BatchKey, attention: bool
) -> list[Any]:
    results = list(
        captioner.caption(
            list(images),
            beam_size=key.beam_size,
            max_length=key.max_length,
            return_attention=attention,
        )
    )
    if len(results) != len(images):
        raise RuntimeError(f"captioner returned {len(results)} results for {len(images)} images")
    return results


def _succeed(item: _Item, result: Any) -> None:
    if item.future.done():
        return
    if not item.return_attention and getattr(result, "attention", None) is not None:
        result = _without_attention(result)
    item.future.set_result(result)


def _fail(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)


def _without_attention(result: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.replace(result, attention=None)
    return result
