"""Tunables of the web service (the ``captioner serve`` options) and the version it reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Tunables of the web service (the ``captioner serve`` options)."""

    max_upload_mb: float = 10.0
    max_batch_size: int = 8  # 1 turns micro-batching off
    batch_window_ms: float = 10.0
    max_queue: int = 64  # decoded requests waiting for the model; more -> 503
    workers: int = 1  # inference threads (batches run in parallel)
    decode_threads: int = 2  # image decoding threads
    max_image_side: int = 1024  # decoded uploads are shrunk to this before queueing
    request_timeout_s: float = 120.0  # waiting for the model, once queued
    # A body must arrive within this (slower: 408), so slow clients cannot pile up for ever.
    upload_timeout_s: float = 60.0
    # Upload bytes held in memory by all requests together (more: 503); at least one upload.
    upload_memory_mb: float = 256.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_memory_bytes(self) -> int:
        return int(self.upload_memory_mb * 1024 * 1024)

    def validate(self) -> None:
        if not self.max_upload_mb > 0:
            raise ValueError("max_upload_mb must be > 0")
        for name in ("max_batch_size", "max_queue", "workers", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_window_ms < 0 or self.max_image_side < 32 or self.request_timeout_s <= 0:
            raise ValueError("batch_window_ms >= 0, max_image_side >= 32, request_timeout_s > 0")
        if not self.upload_timeout_s > 0:
            raise ValueError("upload_timeout_s must be > 0")
        if self.upload_memory_mb < self.max_upload_mb:
            raise ValueError("upload_memory_mb must be >= max_upload_mb (room for one upload)")


def service_version() -> str:
    """The installed package's version (``unknown`` when running from an uninstalled tree)."""
    try:
        from captioner import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("captioner")
    except Exception:
        return "unknown"
