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
    decode_threads: int = 2  # image decoding threads (plus one for images over 4 MP)
    max_decode_queue: int = 16  # uploads decoding or waiting to decode; more -> 503
    # Uploads are decoded at most this large (JPEGs at reduced scale): the encoder reads 224-260
    # px, so 512 keeps twice that and decodes a 12 MP photo at 1/4 scale.
    max_image_side: int = 512
    request_timeout_s: float = 120.0  # waiting for the model, once queued
    # A body must arrive within this (slower: 408), so slow clients cannot pile up for ever.
    upload_timeout_s: float = 60.0
    # A request's line and headers must arrive within this (slower: the connection is closed).
    header_timeout_s: float = 10.0
    # Memory held by all requests together (more: 503): upload bytes, and the decoded pixels
    # (4 bytes each) of the images being decoded; large images may use half of it, so the
    # default leaves room for one 64 MP image (256 MB) beside ordinary photos.
    upload_memory_mb: float = 512.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_memory_bytes(self) -> int:
        return int(self.upload_memory_mb * 1024 * 1024)

    def validate(self) -> None:
        if not self.max_upload_mb > 0:
            raise ValueError("max_upload_mb must be > 0")
        for name in (
            "max_batch_size",
            "max_queue",
            "workers",
            "decode_threads",
            "max_decode_queue",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_window_ms < 0 or self.max_image_side < 32 or self.request_timeout_s <= 0:
            raise ValueError("batch_window_ms >= 0, max_image_side >= 32, request_timeout_s > 0")
        if not self.upload_timeout_s > 0 or not self.header_timeout_s > 0:
            raise ValueError("upload_timeout_s and header_timeout_s must be > 0")
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
