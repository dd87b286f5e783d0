"""A full disk is one clear line, not a traceback.

Every writer is atomic (a temporary file renamed into place; checkpoints a temporary folder), so
a write that fails for lack of space leaves the last complete files as they were: the message
can say that rerunning the same command once there is space picks up from there. Python reports
it as ``OSError(ENOSPC)``, safetensors as a ``SafetensorError`` whose text carries the OS code.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from captioner.errors import CaptionerError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("No space left", "code: 28", "Disk quota exceeded", "code: 122")


class DiskFullError(CaptionerError):
    """The disk (or the user's quota) filled up while writing."""


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    return type(exc).__name__ == "SafetensorError" and any(w in str(exc) for w in _FULL_WORDS)


@contextmanager
def disk_full_is_one_line(command: str) -> Iterator[None]:
    """Turn a full disk inside ``command`` into a DiskFullError (the CLI's one-line errors)."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        raise DiskFullError(
            f"`captioner {command}` ran out of disk space{where}; what was written before is "
            "intact: free some space and rerun the same command to continue"
        ) from None
