"""Progress bars only where someone watches them: on a terminal, never in logs or pipes.

``progress_bar`` takes tqdm's arguments; every bar in the toolkit goes through it, so a run
redirected to a file (or under nohup, CI, a test runner) writes no bar noise.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*args: Any, disable: bool = False, **kwargs: Any) -> tqdm:
    """tqdm(*args, **kwargs) on stderr (or ``file``), switched off when that is not a TTY."""
    stream = kwargs.setdefault("file", sys.stderr)
    return tqdm(*args, disable=disable or not is_terminal(stream), **kwargs)
