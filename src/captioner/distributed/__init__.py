"""Scaling captioning out to many machines on Ray Data (optional: ``pip install 'captioner[ray]'``).

``captioner.distributed.ray_data`` holds the adapter; it imports ``ray`` only when used, so
this package costs nothing where Ray is not installed. The module is not called ``ray.py`` so
it can never shadow the real ``ray`` package.
"""

from __future__ import annotations

__all__ = ["CaptionBatch", "caption_dataset"]


def __getattr__(name: str):
    """Lazy re-exports: importing the package must not import ray (or the model code)."""
    if name in __all__:
        from captioner.distributed import ray_data

        return getattr(ray_data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
