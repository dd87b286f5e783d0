"""Atomic writes: a killed process leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# files we write get the usual permissions (mkstemp alone would make them owner-only)
_FILE_MODE = 0o666 & ~_current_umask()


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` in one step."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def unwritable_reason(path: str | os.PathLike[str], folder: bool) -> str | None:
    """Why an output (a folder when ``folder``, else a file) cannot be written now, or None:
    a folder where a file goes or the reverse, a file in the way of its folder, or a place this
    user cannot write (a temporary file is tried there and removed at once). Creates nothing
    that stays, so outputs are checked before hours of work, not after."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        return "a file is in the way: give a folder" if folder else "give a file name, not a folder"
    place = path if folder and path.is_dir() else path.parent
    while not place.exists() and place != place.parent:
        place = place.parent  # made when the output is written
    if not place.is_dir():
        return f"{place} is a file, so no folder can be made there"
    try:
        fd, probe = tempfile.mkstemp(prefix=".captioner-write-check.", dir=place)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write in {place} ({exc.strerror})"
    return None
