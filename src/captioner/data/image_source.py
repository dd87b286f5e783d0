"""Where a prepared dataset's images live: a folder, or WebDataset tar shards read in place.

The feature cache and every later stage ask an ``ImageSource`` for an image by its dataset
name, so a dataset of tar shards is never unpacked. A source answers the questions the cache
needs for its fingerprint (is it there, how big, what content) and hands back the image as
something ``load_image`` takes (a path or the bytes).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

# The image files the project reads, defined once: the formats load_image decodes and the REST
# API accepts (JPEG, PNG, WebP, BMP, GIF, TIFF). Bulk captioning (bulk/inputs.py), prepare's
# folder layouts (data/manifests.py) and int8 calibration (features/quantize.py) all list
# files by it. (WebDataset shards keep their own member keys: data/webdataset_source.py.)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@runtime_checkable
class ImageSource(Protocol):
    """Images by dataset name (a relative path in a folder, ``shard.tar/member`` in shards)."""

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def sha256(self, name: str) -> str:
        """Hex SHA-256 of the image's bytes; OSError when it cannot be read."""
        ...

    def mtime_ns(self, name: str) -> int: ...

    def locate(self, name: str) -> Path | bytes:
        """What ``load_image`` takes for this image: a path, or its bytes."""
        ...

    def describe(self) -> str: ...


class FolderSource:
    """Images as files under one root folder (names are paths relative to it)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size

    def sha256(self, name: str) -> str:
        with open(self.path(name), "rb") as handle:
            if hasattr(hashlib, "file_digest"):  # Python 3.11+
                return hashlib.file_digest(handle, "sha256").hexdigest()
            digest = hashlib.sha256()
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
            return digest.hexdigest()

    def mtime_ns(self, name: str) -> int:
        return self.path(name).stat().st_mtime_ns

    def locate(self, name: str) -> Path:
        return self.path(name)

    def describe(self) -> str:
        return str(self.root)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FolderSource) and other.root == self.root

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r})"


def as_image_source(images: str | Path | ImageSource) -> ImageSource:
    """A folder path becomes a FolderSource; a source is returned as it is."""
    if isinstance(images, (str, Path)):
        return FolderSource(images)
    return images


def image_problem(data: bytes) -> str | None:
    """Why these bytes are not a usable image, from a cheap check (header, PNG chunk CRCs,
    JPEG end marker; no full decode), or None. Lets prepare leave out a corrupt image instead of
    failing a long feature extraction later."""
    if not data:
        return "empty image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            image.verify()
    except Exception:  # noqa: BLE001 - any failure here means a bad image
        return "corrupt image"
    if kind in ("JPEG", "MPO") and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "truncated image"
    return None
