"""Run a side computation on the idle core while the main thread decodes.

Beam search keeps about one core busy (its decoder steps are too small to split well); the
person/animal detector is independent of it, so it runs meanwhile on a single worker thread and
its answer is waited for only where the caption needs it. ONNX Runtime releases the GIL while it
runs, so the two really overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any


@cache
def _worker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="captioner-speculate")


def speculate(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """Start ``function(*args)`` on the worker thread; returns a callable that waits for and
    returns its result (re-raising its error)."""
    return _worker().submit(function, *args).result
