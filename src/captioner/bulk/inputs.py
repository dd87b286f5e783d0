"""What a bulk captioning run reads: folders (recursively), file lists, globs and tar shards,
as a lazy stream of ``Source``s, so a million photos never sit in memory as a list.

Every enumeration is deterministic (each folder's entries sorted), so a first counting pass
(for the progress bar's total) and the captioning pass see the same images in the same order.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from captioner.errors import ImageLoadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class Source:
    """One image to caption: ``key`` is what the output calls it (the path as given, or
    ``shard.tar/member`` inside a tar shard); ``data`` holds a shard member's bytes."""

    key: str
    path: Path | None = None
    data: bytes | None = None

    def load(self):
        """What ``load_image`` takes: the path, or the member's bytes."""
        return self.data if self.data is not None else self.path


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, recursively, sorted per folder; hidden entries and
    symlinked sub-folders (possible loops) are not entered."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    subdirs = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(Path(entry.path))
        elif entry.is_file() and is_image_name(entry.name):
            yield Path(entry.path)
    for sub in subdirs:
        yield from walk_images(sub)


def read_file_list(list_path: Path) -> Iterator[str]:
    """One path per line; blank lines and ``#`` comments skipped; read lazily."""
    try:
        handle = open(list_path, encoding="utf-8")
    except OSError as exc:
        raise ImageLoadError(f"{list_path}: cannot read the file list ({exc.strerror})") from exc
    with handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def tar_members(shard: Path, with_data: bool) -> Iterator[Source]:
    """Image members of an uncompressed tar shard (WebDataset layout), in archive order.

    Streamed (mode ``r|``) when the bytes are wanted, so a shard is read once, front to back;
    the counting pass only reads headers."""
    try:
        with tarfile.open(shard, "r|" if with_data else "r:") as archive:
            for member in archive:
                if not member.isfile() or not is_image_name(member.name):
                    continue
                key = f"{shard}/{member.name}"
                if not with_data:
                    yield Source(key)
                    continue
                handle = archive.extractfile(member)
                yield Source(key, data=handle.read() if handle else b"")
    except (tarfile.TarError, OSError) as exc:
        raise ImageLoadError(f"{shard}: not a readable tar shard ({exc})") from exc


def iter_sources(
    inputs: Sequence[str],
    files_from: Sequence[Path] = (),
    *,
    with_data: bool = True,
    problem: Callable[[str], None] = lambda message: None,
) -> Iterator[Source]:
    """Every input as Sources, in order. An explicit file is kept whatever its extension (a
    non-image is reported when it is decoded); folders and globs keep image extensions only;
    ``@list.txt`` and ``files_from`` name one file per line. Inputs that find nothing are
    passed to ``problem``; duplicates are not removed here (see ``unique``)."""
    lists = [str(p) for p in files_from]
    for item in [*inputs, *(f"@{p}" for p in lists)]:
        if item.startswith("@") and len(item) > 1:
            for line in read_file_list(Path(item[1:])):
                yield Source(line, Path(line))
            continue
        path = Path(item)
        if path.is_dir():
            found = False
            for image in walk_images(path):
                found = True
                yield Source(str(image), image)
            if not found:
                problem(f"{item}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
        elif path.is_file() and path.suffix.lower() == SHARD_SUFFIX:
            found = False
            for source in tar_members(path, with_data):
                found = True
                yield source
            if not found:
                problem(f"{item}: no images in this tar shard")
        elif path.is_file():
            yield Source(str(path), path)
        elif glob.has_magic(item):
            matches = sorted(glob.iglob(item, recursive=True))
            found = [Path(p) for p in matches if is_image_name(p) and Path(p).is_file()]
            if not found:
                problem(f"{item}: no images match this pattern")
            for image in found:
                yield Source(str(image), image)
        else:
            problem(f"{item}: no such file or folder")


def key_hash(key: str) -> int:
    """A 64-bit digest of an image key: a set of these costs ~60 bytes per image instead of
    the key itself (collisions: about 1 in 10^7 over a billion pairs, never in practice)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class KeySet:
    """A set of image keys held as 64-bit digests."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._hashes = {key_hash(k) for k in keys}

    def add(self, key: str) -> bool:
        """Add ``key``; False when it was already there."""
        h = key_hash(key)
        if h in self._hashes:
            return False
        self._hashes.add(h)
        return True

    def __contains__(self, key: str) -> bool:
        return key_hash(key) in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)


def unique(sources: Iterator[Source]) -> Iterator[Source]:
    """Drop repeats (the same file reached through a folder and a glob, say)."""
    seen = KeySet()
    for source in sources:
        if seen.add(source.key):
            yield source
