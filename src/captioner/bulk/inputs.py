"""What a bulk captioning run reads: folders (recursively), file lists, globs and tar shards,
as a lazy stream of ``Source``s, so a million photos never sit in memory as a list.

Every enumeration is deterministic (each folder's entries sorted), so a first counting pass
(for the progress bar's total) and the captioning pass see the same images in the same order.

File names are bytes on Linux and need not be UTF-8: they are carried as ``str`` with the
undecodable bytes as surrogates (``os.fsdecode``), so the file can still be opened, and written
out as ``display_key`` (those bytes as ``\\xNN``), which is valid UTF-8 in every output.
"""

from __future__ import annotations

import glob
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from captioner.data.image_source import IMAGE_SUFFIXES
from captioner.data.webdataset_source import MAX_MEMBER_BYTES
from captioner.errors import ImageLoadError

SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class Source:
    """One image to caption: ``key`` is what the output calls it (the path as given, or
    ``shard.tar/member`` inside a tar shard); ``data`` holds a shard member's bytes; ``error``
    says why an input cannot be read (reported and skipped when its turn comes)."""

    key: str
    path: Path | None = None
    data: bytes | None = None
    error: str | None = None

    def load(self):
        """What ``load_image`` takes: the path, or the member's bytes."""
        return self.data if self.data is not None else self.path


def key_bytes(key: str) -> bytes:
    """The bytes of a name: its undecodable bytes, carried as surrogates, restored."""
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: kept, never refused
        return key.encode("utf-8", "surrogatepass")


def display_key(key: str) -> str:
    """``key`` as valid UTF-8 text: bytes of a non-UTF-8 file name become ``\\xNN``."""
    return key_bytes(key).decode("utf-8", "backslashreplace")


def _kind(path: Path) -> str:
    """ "dir", "file" or "" (missing, or a name the system refuses: too long, a NUL byte)."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return ""
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else ""


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
    """One path per line; blank lines and ``#`` comments skipped; read lazily. Lines are file
    names as bytes (any encoding: Latin-1 names reach their files, see ``display_key``); a NUL
    byte means this is not a list of names (a binary file): refused before anything is done."""
    try:
        handle = open(list_path, "rb")
    except OSError as exc:
        raise ImageLoadError(f"{list_path}: cannot read the file list ({exc.strerror})") from exc
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                if b"\0" in raw:
                    raise ImageLoadError(
                        f"{list_path} line {number}: a NUL byte, so this is not a list of "
                        "file names (one per line); is it a binary file?"
                    )
                line = os.fsdecode(raw.strip())
                if line and not line.startswith("#"):
                    yield line
        except OSError as exc:
            raise ImageLoadError(f"{list_path}: cannot read the file list ({exc})") from exc


def tar_members(shard: Path, with_data: bool) -> Iterator[Source]:
    """Image members of an uncompressed tar shard (WebDataset layout), in archive order.

    Streamed (mode ``r|``) when the bytes are wanted, so a shard is read once, front to back;
    the counting pass only reads headers. A member over MAX_MEMBER_BYTES (its header's size,
    so a sparse 1.5 GB member of a 30 KB tar is never expanded) and a damaged shard come
    through as a Source with ``error``: reported and skipped, the run goes on."""
    try:
        archive = tarfile.open(shard, "r|" if with_data else "r:")
    except (tarfile.TarError, OSError) as exc:
        yield Source(str(shard), error=f"{shard}: not a readable tar shard ({exc})")
        return
    reading = str(shard)  # what an error is charged to: the member being read, else the shard
    with archive:
        try:
            for member in archive:
                if not member.isfile() or not is_image_name(member.name):
                    continue
                key = f"{shard}/{member.name}"
                if not with_data:
                    yield Source(key)
                elif member.size > MAX_MEMBER_BYTES:
                    yield Source(key, error=_too_large(key, member.size))
                else:
                    reading = key
                    handle = archive.extractfile(member)
                    data = handle.read() if handle else b""
                    reading = str(shard)
                    yield Source(key, data=data)
        except (tarfile.TarError, OSError, EOFError) as exc:
            yield Source(reading, error=f"{reading}: the tar shard is damaged here ({exc})")


def _too_large(key: str, size: int) -> str:
    return (
        f"{display_key(key)}: {size / 1e6:.0f} MB, over the limit of "
        f"{MAX_MEMBER_BYTES / 1e6:.0f} MB for one image in a tar shard"
    )


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
        kind = _kind(path)
        if kind == "dir":
            found = False
            for image in walk_images(path):
                found = True
                yield Source(str(image), image)
            if not found:
                suffixes = ", ".join(IMAGE_SUFFIXES)
                problem(f"{display_key(item)}: no images in this folder ({suffixes})")
        elif kind == "file" and path.suffix.lower() == SHARD_SUFFIX:
            found = False
            for source in tar_members(path, with_data):
                found = True
                yield source
            if not found:
                problem(f"{display_key(item)}: no images in this tar shard")
        elif kind == "file":
            yield Source(str(path), path)
        elif glob.has_magic(item):
            matches = sorted(glob.iglob(item, recursive=True))
            found = [Path(p) for p in matches if is_image_name(p) and _kind(Path(p)) == "file"]
            if not found:
                problem(f"{display_key(item)}: no images match this pattern")
            for image in found:
                yield Source(str(image), image)
        else:
            problem(f"{display_key(item)}: no such file or folder")


def key_hash(key: str) -> int:
    """A 64-bit digest of an image key: a set of these costs ~60 bytes per image instead of
    the key itself (collisions: about 1 in 10^7 over a billion pairs, never in practice)."""
    digest = hashlib.blake2b(key_bytes(key), digest_size=8).digest()
    return int.from_bytes(digest, "big")


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
