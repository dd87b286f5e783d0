"""A tiny stand-in for ``captioner.api.Captioner`` for web tests and the load benchmark.

It follows the public contract (``caption(images, beam_size, max_length, return_attention)
-> list[CaptionResult]``) without a model: the caption names the image's mean colour and size,
so a test can tell which request got which result, and every call's batch size is recorded.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

try:  # the real result type once captioner.api exists
    from captioner.api import CaptionResult  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - api.py not written yet

    @dataclass
    class CaptionResult:  # type: ignore[no-redef]
        caption: str
        tokens: list[str]
        score: float
        attention: np.ndarray | None
        alternatives: list[tuple[str, float]] = field(default_factory=list)


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
    "grey": (128, 128, 128),
}


def colour_name(image: np.ndarray) -> str:
    mean = image.reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda n: float(((mean - np.array(COLOURS[n])) ** 2).sum()))


class FakeCaptioner:
    """Deterministic captions; records batch sizes; can be slowed down or held at a gate."""

    def __init__(self, grid_size: int = 7, delay_s: float = 0.0, per_image_s: float = 0.0):
        self.grid_size = grid_size
        self.delay_s = delay_s  # fixed cost per caption() call (what batching amortises)
        self.per_image_s = per_image_s
        self.gate: threading.Event | None = None  # when set: each call waits for it
        self.fail_on_colour: str | None = None  # raise for images of this colour
        self.calls: list[dict] = []
        self.started = threading.Event()  # set when a call has begun
        self._lock = threading.Lock()

    @property
    def batch_sizes(self) -> list[int]:
        with self._lock:
            return [c["batch_size"] for c in self.calls]

    def caption(self, images, beam_size=3, max_length=20, return_attention=True):
        if not isinstance(images, (list, tuple)):
            images = [images]
        with self._lock:
            self.calls.append(
                {
                    "batch_size": len(images),
                    "beam_size": beam_size,
                    "max_length": max_length,
                    "return_attention": return_attention,
                }
            )
        self.started.set()
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise RuntimeError("FakeCaptioner gate was never opened")
        time.sleep(self.delay_s + self.per_image_s * len(images))
        return [self._one(np.asarray(im), beam_size, max_length, return_attention) for im in images]

    def _one(self, image, beam_size, max_length, return_attention):
        from captioner.errors import ImageLoadError

        colour = colour_name(image)
        if colour == self.fail_on_colour:
            raise ImageLoadError(f"fake failure for a {colour} image")
        height, width = image.shape[:2]
        tokens = ["a", colour, "picture", f"{width}x{height}", "with", "beam", str(beam_size)]
        tokens = tokens[:max_length]
        alternatives = [
            (" ".join(tokens if i == 0 else [*tokens[:-1], f"alt{i}"]), -0.1 - 0.2 * i)
            for i in range(beam_size)
        ]
        attention = self._attention(len(tokens)) if return_attention else None
        result = CaptionResult(
            caption=" ".join(tokens),
            tokens=tokens,
            score=alternatives[0][1],
            attention=attention,
            alternatives=alternatives,
        )
        if hasattr(result, "concepts"):  # grounded, like the bundled model: a pure blue image
            result.concepts = [(colour, 0.9)]  # is "out of domain", every other colour in
            result.in_domain = 0.0 if colour == "blue" else 0.5
            result.out_of_domain = colour == "blue"
        return result

    def _attention(self, n_tokens: int) -> np.ndarray:
        """A Gaussian blob per word, wandering across the grid; each map sums to 1."""
        g = self.grid_size
        ys, xs = np.mgrid[0:g, 0:g]
        maps = []
        for t in range(n_tokens):
            cy = (t * 2 + 1) % g
            cx = (t * 3 + 1) % g
            m = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 2.0)
            maps.append(m / m.sum())
        return np.asarray(maps, dtype=np.float32).reshape(n_tokens, g, g)
