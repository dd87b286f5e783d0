"""Where models live: the bundled one inside the package, or a directory the user names."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from captioner.errors import CheckpointError

DEFAULT_MODEL = "flickr8k"


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The model shipped inside the package (no download)."""
    return Path(str(resources.files("captioner") / "pretrained" / name))


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None or str(path) in ("", "default", DEFAULT_MODEL):
        path = bundled_model_dir()
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"the bundled model is missing from {path}; reinstall captioner "
                "or pass a model directory"
            )
        return path
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model directory not found: {path}")
    return path
