"""Uploaded bytes -> a decoded RGB image: magic-byte sniffing first, so that only the formats we
accept ever reach Pillow, then :func:`captioner.data.images.load_image` and a shrink."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from captioner.data.images import load_image
from captioner.errors import ImageLoadError
from captioner.web.upload import UploadError

_SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
}
_KNOWN_OTHERS = {
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive (or an Office document)",
    b"BM": "a BMP image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"\x00\x00\x01\x00": "an ICO icon",
    b"<svg": "an SVG drawing",
    b"<?xml": "an XML/SVG document",
    b"%!PS": "a PostScript document",
}
ALLOWED = "JPEG, PNG, WebP or GIF"


def sniff_format(data: bytes) -> str | None:
    """The image format from magic bytes, or None when it isn't one we accept."""
    for fmt, prefixes in _SIGNATURES.items():
        if data.startswith(prefixes):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe(data: bytes) -> str:
    head = data[:16].lstrip()
    for prefix, what in _KNOWN_OTHERS.items():
        if data.startswith(prefix) or head.startswith(prefix):
            return what
    sample = data[:512]
    try:
        sample.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "not an image"


def decode_upload(data: bytes, filename: str = "upload", max_side: int = 1024) -> np.ndarray:
    """Uploaded bytes -> RGB uint8 (H, W, 3), at most ``max_side`` on the long edge.

    Raises UploadError: 415 for anything that isn't JPEG/PNG/WebP/GIF, 422 for an image that
    cannot be decoded (truncated, corrupt, too many pixels).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(
            415, f"{filename}: unsupported file type ({_describe(data)}); send a {ALLOWED} image"
        )
    try:
        image = load_image(data, name=filename)
    except ImageLoadError as exc:
        status = 415 if isinstance(exc.__cause__, UnidentifiedImageError) else 422
        raise UploadError(status, str(exc)) from None
    height, width = image.shape[:2]
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), dtype=np.uint8)
    return image
