"""Two-stage pipelining: stage one of item i+1 runs in a background thread while the caller
works on item i.

Captioning a batch is JPEG decoding + the encoder (ONNX Runtime on all cores), then beam search
(one ONNX Runtime thread plus numpy bookkeeping). Done one after the other, one of two cores
idles through the whole beam search. Both ONNX Runtime and Pillow release the GIL, so encoding
the next batch in a thread while this one decodes keeps both cores busy (measured on 2 cores:
56 -> 74 img/s fp32, 101 -> 132 img/s int8; bench/bench_throughput.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


class Failed(Generic[T]):
    """Stage one raised on this item: the error comes back in order, for the caller to raise
    or to handle (bulk captioning retries that batch image by image)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def overlapped(
    items: Iterable[T],
    stage: Callable[[T], R],
    depth: int = 1,
    name: str = "overlap-stage",
) -> Iterator[tuple[T, R | Failed]]:
    """(item, stage(item)) for every item in order, ``stage`` running up to ``depth`` items
    ahead (plus the one in hand) in one background thread called ``name``. An exception in
    ``stage`` arrives as ``Failed`` beside its item (later items still go through); one raised
    while iterating ``items`` is re-raised here. Closing the iterator early (break, an error in
    the caller) stops the thread."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: object) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                try:
                    result: object = stage(item)
                except Exception as exc:  # noqa: BLE001 - handed to the consumer, in order
                    result = Failed(exc)
                if not put((item, result)):
                    return
        except BaseException as exc:  # noqa: BLE001 - the input itself failed: re-raised there
            put(exc)
            return
        put(_END)

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    try:
        while True:
            entry = out.get()
            if entry is _END:
                return
            if isinstance(entry, BaseException):
                raise entry
            yield entry  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=5)
