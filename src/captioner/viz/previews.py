"""Preview figures for the data pipeline: normalization methods and augmented views.

Both functions draw on a bare ``matplotlib.figure.Figure`` (Agg rendering, no pyplot global
state, safe in threads and on headless machines) and write the PNG atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from captioner.data import normalize as norm
from captioner.data.augment import augment_image
from captioner.data.images import ImageInput, load_image
from captioner.errors import ConfigError
from captioner.io import atomic_path

_PANEL_INCHES = 3.0
_DPI = 100


def _display(array: np.ndarray) -> np.ndarray:
    """Min-max rescale to [0, 1] for imshow only (a constant array shows mid-gray)."""
    lo, hi = float(array.min()), float(array.max())
    if hi - lo <= 1e-12:
        return np.full_like(array, 0.5, dtype=np.float32)
    return ((array - lo) / (hi - lo)).astype(np.float32)


def _save(fig: Figure, out_path: str | os.PathLike[str]) -> Path:
    out = Path(out_path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return out


def _panel_height(image: np.ndarray) -> float:
    height, width = image.shape[:2]
    return float(np.clip(_PANEL_INCHES * height / width, 1.5, 6.0))  # very wide/tall: letterbox


def render_normalize_preview(
    image: ImageInput,
    out_path: str | os.PathLike[str],
    encoder: str = "efficientnet-lite0",
) -> Path:
    """Write a PNG of five panels: original, min-max, mean-std, per-channel, encoder preprocessing.

    Each panel is titled with its method and the actual value range (min..max) of the array.
    Standardized arrays are rescaled to [0, 1] for display only, as the figure's caption says.
    ``image`` is anything ``load_image`` accepts. Returns ``out_path`` as a Path.
    """
    rgb = load_image(image)
    panels: list[tuple[str, np.ndarray, np.ndarray]] = [("original (uint8)", rgb, rgb)]
    for label, key in (
        ("min-max", "minmax"),
        ("mean-std", "mean_std"),
        ("per-channel", "per_channel"),
    ):
        values = norm.NORMALIZATIONS[key](rgb)
        panels.append((label, values, _display(values)))
    # imported here: the encoders module pulls in torch, which the other panels don't need
    from captioner.features.encoders import get_spec

    spec = get_spec(encoder)  # an unknown name: ConfigError
    values = norm.encoder(rgb, spec.mean, spec.std)
    panels.append((f"encoder: {encoder}", values, _display(values)))

    fig_height = _panel_height(rgb) + 0.95  # inches: two title lines above, caption below
    fig = Figure(figsize=(_PANEL_INCHES * len(panels), fig_height))
    axes = fig.subplots(1, len(panels))
    for ax, (label, values, shown) in zip(axes, panels, strict=True):
        ax.imshow(shown, interpolation="antialiased")
        lo, hi = float(values.min()), float(values.max())
        span = f"{lo:.0f}..{hi:.0f}" if values.dtype == np.uint8 else f"{lo:.2f}..{hi:.2f}"
        ax.set_title(f"{label}\nrange {span}", fontsize=10)
        ax.set_axis_off()
    fig.text(
        0.5,
        0.12 / fig_height,
        "Titles give each array's actual value range (min..max). Panels 3-5 are rescaled to "
        "[0, 1] for display only.",
        ha="center",
        va="bottom",
        fontsize=8,
        color="0.35",
    )
    fig.subplots_adjust(
        left=0.01, right=0.99, top=1 - 0.55 / fig_height, bottom=0.35 / fig_height, wspace=0.05
    )
    return _save(fig, out_path)


def render_augment_preview(
    image: ImageInput,
    out_path: str | os.PathLike[str],
    n: int = 8,
    seed: int = 0,
    strength: str = "medium",
) -> Path:
    """Write a grid PNG: the original plus ``n`` augmented views titled "view 1".."view n".

    View k uses ``augment_image(image, seed + k - 1, strength)``, so a figure is reproducible from
    its seed. ``image`` is anything ``load_image`` accepts. Returns ``out_path`` as a Path.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    rgb = load_image(image)
    views = [("original", rgb)]
    views += [(f"view {k}", augment_image(rgb, seed + k - 1, strength)) for k in range(1, n + 1)]

    cols = math.ceil(math.sqrt(len(views)))
    rows = math.ceil(len(views) / cols)
    fig = Figure(figsize=(_PANEL_INCHES * cols, (_panel_height(rgb) + 0.4) * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (title, view) in zip(axes, views, strict=False):
        ax.imshow(view, interpolation="antialiased")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"augmentation: strength={strength}, seed={seed}", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)
