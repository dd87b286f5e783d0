"""The bounded decode queue: uploads become images here, without starving good requests.

A small PNG can claim 64 MP (2-3 s and 256 MB to decode), so the cost of a decode is read from
the header first and counted before anything is decoded:

- the header is read first (cheap, outside the queue); then at most ``max_queue`` requests
  are decoding or waiting to decode, more get 503 at once;
- the decoded bytes (pixels x 4) are reserved in the server's upload memory budget, next to the
  compressed bytes (no room: 503);
- a heavy decode (over ``HEAVY_PIXELS``) runs on a lane of its own, one thread, and heavy
  decodes together may hold at most half the budget, so bombs queue behind each other while
  ordinary photos keep the decode threads and the other half of the memory;
- a JPEG is decoded at reduced scale (``max_side`` is what the model needs), anything else is
  shrunk right after decoding.

Reservations are given back when the decode thread finishes, not when the request ends, so a
client that goes away cannot leave a decode running that nothing counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioner.web.decode import decode_cost, decode_probed, probe_upload
from captioner.web.upload import UploadBudget, UploadError

HEAVY_PIXELS = 4_000_000  # decodes over this many pixels take the heavy lane


@dataclass
class DecodeStats:
    backlog: int  # requests decoding or waiting to decode
    max_queue: int
    heavy: int  # of which on the heavy lane
    heavy_bytes: int
    rejected: int


class DecodeQueue:
    """Decodes uploads on ``threads`` threads plus one heavy lane, bounded as described above.

    Bookkeeping lives on the event loop (no locking); only Pillow runs in the threads.
    """

    def __init__(self, threads: int, max_queue: int, budget: UploadBudget) -> None:
        if threads < 1 or max_queue < 1:
            raise ValueError("threads and max_queue must be >= 1")
        self.max_queue = max_queue
        self.budget = budget
        self.heavy_capacity = budget.capacity_bytes // 2
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self._heavy_pool = ThreadPoolExecutor(1, thread_name_prefix="decode-heavy")
        self._backlog = 0
        self._heavy = 0
        self._heavy_bytes = 0
        self._rejected = 0
        self._tasks: set[asyncio.Task] = set()

    def stats(self) -> DecodeStats:
        return DecodeStats(
            self._backlog, self.max_queue, self._heavy, self._heavy_bytes, self._rejected
        )

    @property
    def full(self) -> bool:
        return self._backlog >= self.max_queue

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._heavy_pool.shutdown(wait=False, cancel_futures=True)

    async def decode(self, data: bytes, filename: str, max_side: int) -> np.ndarray:
        """Uploaded bytes -> RGB uint8 (H, W, 3); UploadError 415/422 for a bad image, 503 when
        the queue or the memory budget is full (the caller adds Retry-After)."""
        task = asyncio.ensure_future(self._decode(data, filename, max_side))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        # shielded: if the request is cancelled, the decode still ends (and gives back) normally
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned request's error is not logged as lost

    async def _decode(self, data: bytes, filename: str, max_side: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        # The header is read first (cheap), outside the queue: a bomb that is refused for its
        # size never takes a place that an ordinary photo could have.
        image = await loop.run_in_executor(self._pool, probe_upload, data, filename, max_side)
        try:
            cost = decode_cost(image)
            heavy = cost > HEAVY_PIXELS * 4
            self._check_room(cost, heavy, filename)
        except BaseException:
            image.close()
            raise
        self._backlog += 1
        self.budget.bytes_in_use += cost
        if heavy:
            self._heavy += 1
            self._heavy_bytes += cost
        try:
            if heavy:
                return await loop.run_in_executor(
                    self._heavy_pool, _decode_and_trim, image, filename, max_side
                )
            return await loop.run_in_executor(self._pool, decode_probed, image, filename, max_side)
        finally:
            self._backlog -= 1
            self.budget.give_back(cost)
            if heavy:
                self._heavy -= 1
                self._heavy_bytes -= cost

    def _check_room(self, cost: int, heavy: bool, filename: str) -> None:
        """UploadError 422 when this decode could never fit, 503 when it does not fit now."""
        if self.full:
            self._rejected += 1
            raise UploadError(
                503,
                f"server busy: {self._backlog} uploads are already waiting to be decoded, "
                "try again shortly",
            )
        limit = self.heavy_capacity if heavy else self.budget.capacity_bytes
        if cost > limit:
            raise UploadError(
                422,
                f"{filename}: decoding it would take {_mb(cost)}, more than this server allows "
                f"one image ({_mb(limit)}); send a smaller picture",
            )
        if heavy and self._heavy_bytes + cost > self.heavy_capacity:
            self._rejected += 1
            raise UploadError(
                503,
                f"server busy: large images being decoded hold {_mb(self._heavy_bytes)} of "
                f"{_mb(self.heavy_capacity)}, try again shortly",
            )
        if self.budget.bytes_in_use + cost > self.budget.capacity_bytes:
            self.budget.rejected += 1
            raise UploadError(503, self.budget.busy_message())

    async def drain(self) -> None:
        """Wait for decodes in flight (used at shutdown and by tests)."""
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait(set(self._tasks))


def _decode_and_trim(image: Any, filename: str, max_side: int) -> np.ndarray:
    """A heavy decode, then the freed memory handed back to the system: glibc keeps a large
    freed block for reuse, so without this one bomb left its 256 MB in the server for good."""
    try:
        return decode_probed(image, filename, max_side)
    finally:
        _malloc_trim()


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _mb(n: int) -> str:
    return f"{round(n / (1024 * 1024), 1):g} MB"
