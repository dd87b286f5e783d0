"""Uploaded bytes -> a decoded RGB image: magic-byte sniffing first, so that only the formats we
accept ever reach Pillow (the ones the CLI takes: JPEG, PNG, WebP, GIF, TIFF, BMP), then the
project's one loader in two steps: :func:`probe_upload` reads the header (the limits, and how
many pixels the decode will cost, for :mod:`captioner.web.decoding` to count before it decodes)
and :func:`decode_probed` decodes, reduced to the side the model needs."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from captioner.data.images import decode_image, decoded_pixels, open_image
from captioner.errors import ImageLoadError
from captioner.web.upload import UploadError

_SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "BMP": (b"BM",),
}
_KNOWN_OTHERS = {
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive (or an Office document)",
    b"\x00\x00\x01\x00": "an ICO icon",
    b"<svg": "an SVG drawing",
    b"<?xml": "an XML/SVG document",
    b"%!PS": "a PostScript document",
}
ALLOWED = "JPEG, PNG, WebP, GIF, TIFF or BMP"
# Pillow holds a decoded RGB(A) picture in 4 bytes a pixel: what a decode costs in memory.
DECODED_BYTES_PER_PIXEL = 4


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


def probe_upload(data: bytes, filename: str = "upload", max_side: int = 512) -> Image.Image:
    """Check the format and the header, without decoding: the opened image, whose size is what
    :func:`decode_probed` will decode (a JPEG is set to decode at reduced scale).

    Raises UploadError: 415 for anything that isn't one of the accepted formats, 422 for an
    image over the limits or whose header cannot be read.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(
            415, f"{filename}: unsupported file type ({_describe(data)}); send a {ALLOWED} image"
        )
    try:
        return open_image(data, filename, max_side)
    except ImageLoadError as exc:
        status = 415 if isinstance(exc.__cause__, UnidentifiedImageError) else 422
        raise UploadError(status, str(exc)) from None


def decode_cost(image: Image.Image) -> int:
    """Bytes of memory that decoding this opened image takes (before it is shrunk)."""
    return decoded_pixels(image) * DECODED_BYTES_PER_PIXEL


def decode_probed(image: Image.Image, filename: str = "upload", max_side: int = 512) -> np.ndarray:
    """An image from :func:`probe_upload` -> RGB uint8 (H, W, 3), at most ``max_side`` on the
    long edge. Any decoding failure is UploadError 422."""
    try:
        return decode_image(image, filename, max_side)
    except ImageLoadError as exc:
        raise UploadError(422, str(exc)) from None
    finally:
        image.close()


def decode_upload(data: bytes, filename: str = "upload", max_side: int = 512) -> np.ndarray:
    """Uploaded bytes -> RGB uint8 (H, W, 3), at most ``max_side`` on the long edge.

    Raises UploadError: 415 for anything that isn't JPEG/PNG/WebP/GIF/TIFF/BMP, 422 for an image
    that cannot be decoded (truncated, corrupt, too many pixels).
    """
    return decode_probed(probe_upload(data, filename, max_side), filename, max_side)
