"""Per-word attention figures: where the decoder looked while it wrote each word.

The encoder squashes every image to a square and returns a ``grid x grid`` feature map, so an
attention map covers the whole (unsquashed) picture: it is upsampled smoothly (bicubic) to the
displayed image's size, whatever its aspect ratio, and blended over it.

Under the caption, a grounded model's result also shows what the encoder sees (its concepts)
and the in-domain verdict, so the picture alone says whether the caption can be trusted.

The figure is drawn on a bare ``matplotlib.figure.Figure`` (Agg, no pyplot global state) and
written atomically, like the previews in :mod:`captioner.viz.previews`.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from captioner.data.images import load_image
from captioner.errors import ConfigError
from captioner.io import atomic_path

if TYPE_CHECKING:
    from captioner.api import CaptionResult

DISPLAY_SIDE = 256  # longest side of the displayed image, in pixels
COLORMAP = "inferno"  # perceptually uniform, readable in grayscale
ALPHA = 0.6  # weight of the attention colour over the photo

_PANEL_INCHES = 2.4  # width of one panel
_MAX_COLS = 5  # panels per row: long captions wrap onto more rows
_DPI = 100
_LINE_INCHES = 0.22  # height of one line of small text
_TITLE_INCHES = 0.3  # height of one line of the figure title
_MARGIN_INCHES = 0.15  # left and right of the panel grid
IN_DOMAIN_COLOUR = "#1a7f37"  # green: like the training photos
OUT_OF_DOMAIN_COLOUR = "#b42318"  # red: the caption may well be wrong


def display_image(image: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    """Resize (bicubic, aspect ratio kept) so the longest side is ``side`` pixels."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), dtype=np.uint8)


def upsample_attention(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (g, g) attention map -> (height, width) float32 in [0, 1], scaled to its own maximum.

    Bicubic interpolation of the grid cells (PIL, float mode) gives a smooth map; the overshoot
    bicubic can produce below zero is clipped.
    """
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 2:
        raise ConfigError(f"an attention map must be 2-D (grid, grid), got shape {grid.shape}")
    big = Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC)
    heat = np.clip(np.asarray(big, dtype=np.float32), 0.0, None)
    peak = float(heat.max())
    return heat / peak if peak > 0 else heat


def overlay_attention(
    image: np.ndarray, grid: np.ndarray, alpha: float = ALPHA, cmap: str = COLORMAP
) -> np.ndarray:
    """Blend one attention map, upsampled and coloured, over an RGB uint8 image -> RGB uint8."""
    height, width = image.shape[:2]
    heat = upsample_attention(grid, height, width)
    colour = colormaps[cmap](heat)[..., :3]  # (H, W, 3) in [0, 1]
    blended = (1.0 - alpha) * (image.astype(np.float32) / 255.0) + alpha * colour
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def _maps(result: CaptionResult, grid_size: int) -> np.ndarray | None:
    """The result's attention as (T, g, g), or None when it has none."""
    if result.attention is None:
        return None
    maps = np.asarray(result.attention, dtype=np.float32)
    if maps.ndim == 2:  # (T, P) flattened grids
        maps = maps.reshape(len(maps), grid_size, grid_size)
    if maps.ndim != 3 or len(maps) != len(result.tokens):
        raise ConfigError(
            f"attention of shape {maps.shape} does not match {len(result.tokens)} words"
        )
    return maps


def grounding_lines(result: CaptionResult, width: int) -> list[tuple[str, str]]:
    """(text, colour) lines saying what the encoder sees and whether the photo is in domain;
    none for a model without grounding (``in_domain`` None). Concepts wrap at ``width``."""
    if result.in_domain is None:
        return []
    seen = ", ".join(f"{word} {p:.2f}" for word, p in result.concepts)
    wrapped = textwrap.wrap(
        f"the encoder sees: {seen or '(no concept above its threshold)'}", width
    )
    lines = [(line, "black") for line in wrapped]
    score = f"in-domain score {result.in_domain:.3f}"
    if result.out_of_domain:
        verdict = (
            f"OUT OF DOMAIN ({score}): unlike the training photos, the caption may well be wrong"
        )
        lines += [(line, OUT_OF_DOMAIN_COLOUR) for line in textwrap.wrap(verdict, width)]
    else:
        lines.append((f"in domain ({score}): like the training photos", IN_DOMAIN_COLOUR))
    return lines


def render_attention_figure(
    image: np.ndarray,
    result: CaptionResult,
    out_path: str | os.PathLike[str],
    references: list[str] | None = None,
    grid_size: int = 7,
    max_cols: int = _MAX_COLS,
) -> Path:
    """Write ``attention_figure(...)`` as a PNG, atomically; returns ``out_path``."""
    fig = attention_figure(image, result, references, grid_size, max_cols)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return out


def attention_figure(
    image: np.ndarray,
    result: CaptionResult,
    references: list[str] | None = None,
    grid_size: int = 7,
    max_cols: int = _MAX_COLS,
) -> Figure:
    """The image, then one panel per generated word with its attention overlay.

    Panels run in rows of at most ``max_cols``; the generated caption is the figure title, with
    the result's concepts and in-domain verdict under it (grounded models), and the human
    ``references`` (when given) are listed below the panels. ``image`` is an RGB uint8 array
    (anything ``load_image`` accepts also works); ``result`` a ``CaptionResult`` with attention
    (without it, the word panels show the plain image).
    """
    if max_cols < 1:
        raise ConfigError(f"max_cols must be at least 1, got {max_cols}")
    rgb = display_image(load_image(image))
    maps = _maps(result, grid_size)
    panels: list[tuple[str, np.ndarray]] = [("image", rgb)]
    for t, word in enumerate(result.tokens):
        panels.append((word, rgb if maps is None else overlay_attention(rgb, maps[t])))

    cols = min(max_cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    height, width = rgb.shape[:2]
    # inches; imshow keeps the aspect ratio, so a very wide or tall image is letterboxed
    image_h = float(np.clip(_PANEL_INCHES * height / width, 0.3, 2 * _PANEL_INCHES))
    cell_h = image_h + 0.3  # room for the word above each panel
    fig_w = max(_PANEL_INCHES * cols + 2 * _MARGIN_INCHES, 6.0)
    chars_per_line = int((fig_w - 2 * _MARGIN_INCHES) * 13)  # ~13 per inch at 9.5 pt

    caption = result.caption or "(empty caption)"
    title_lines = textwrap.wrap(f"\u201c{caption}\u201d", width=int(fig_w * 8)) or [""]
    subtitle = f"score {result.score:.3f} (length-normalised log-probability)"
    if maps is None:
        subtitle += "; no attention maps"
    grounded = grounding_lines(result, chars_per_line)
    header_h = _TITLE_INCHES * len(title_lines) + _LINE_INCHES * (1 + len(grounded)) + 0.15

    ref_lines: list[str] = []
    if references:
        ref_lines.append("human references:")
        for i, ref in enumerate(references, start=1):
            wrapped = textwrap.wrap(ref, width=chars_per_line - 6) or [""]
            ref_lines.append(f"{i}. {wrapped[0]}")
            ref_lines += [f"    {line}" for line in wrapped[1:]]
    footer_lines = list(ref_lines)
    if maps is not None:
        footer_lines.insert(
            0,
            f"attention: {maps.shape[1]}x{maps.shape[2]} grid, upsampled "
            "bicubic, each map scaled to its own maximum",
        )
    footer_h = _LINE_INCHES * len(footer_lines) + 0.2

    fig_h = header_h + rows * cell_h + footer_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    fig.text(
        0.5,
        1 - 0.1 / fig_h,
        "\n".join(title_lines),
        ha="center",
        va="top",
        fontsize=13,
        fontweight="bold",
    )
    fig.text(
        0.5,
        1 - (0.12 + _TITLE_INCHES * len(title_lines)) / fig_h,
        subtitle,
        ha="center",
        va="top",
        fontsize=9,
        color="0.35",
    )
    for i, (line, colour) in enumerate(grounded, start=1):
        fig.text(
            0.5,
            1 - (0.12 + _TITLE_INCHES * len(title_lines) + _LINE_INCHES * i) / fig_h,
            line,
            ha="center",
            va="top",
            fontsize=9.5,
            color=colour,
            fontweight="normal" if colour == "black" else "bold",
        )

    grid_left = (fig_w - _PANEL_INCHES * cols) / 2  # centre the panel grid
    pad = 0.04  # inches between panels
    for k, (label, shown) in enumerate(panels):
        row, col = divmod(k, cols)
        top = header_h + row * cell_h + 0.3  # inches from the figure top to the image top
        ax = fig.add_axes(
            (
                (grid_left + col * _PANEL_INCHES + pad) / fig_w,
                1 - (top + image_h) / fig_h,
                (_PANEL_INCHES - 2 * pad) / fig_w,
                (image_h - pad) / fig_h,
            )
        )
        ax.imshow(shown, interpolation="antialiased")
        ax.set_axis_off()
        ax.set_title(
            label,
            fontsize=11,
            pad=3,
            fontstyle="italic" if k == 0 else "normal",
            color="0.35" if k == 0 else "black",
        )

    y = footer_h - 0.1  # inches from the bottom
    for i, line in enumerate(footer_lines):
        is_note = maps is not None and i == 0
        fig.text(
            _MARGIN_INCHES / fig_w,
            y / fig_h,
            line,
            ha="left",
            va="top",
            fontsize=8 if is_note else 9.5,
            color="0.35" if is_note else "black",
            fontweight="bold" if line == "human references:" else "normal",
        )
        y -= _LINE_INCHES
    return fig
