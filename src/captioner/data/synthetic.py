"""A tiny synthetic captioning dataset: coloured shapes on a plain background.

Lets the whole pipeline (prepare -> features -> train -> decode -> evaluate) run in seconds on a
fresh clone with no downloaded data, and gives tests a ground truth to assert against.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"above": "below", "left": "right"}


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, box: tuple[int, int, int, int]):
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def describe(first: tuple[str, str], second: tuple[str, str], relation: str) -> list[str]:
    """Five reference captions for 'first is <relation> second', like Flickr8k's five."""
    a, b = f"{first[0]} {first[1]}", f"{second[0]} {second[1]}"
    if relation == "above":
        return [
            f"a {a} above a {b}",
            f"a {b} below a {a}",
            f"a {a} is above a {b}",
            f"a {a} sits over a {b}",
            f"a {b} under a {a}",
        ]
    return [
        f"a {a} left of a {b}",
        f"a {b} right of a {a}",
        f"a {a} is left of a {b}",
        f"a {a} beside a {b}",
        f"a {b} to the right of a {a}",
    ]


def describe_one(obj: tuple[str, str]) -> list[str]:
    a = f"{obj[0]} {obj[1]}"
    return [
        f"a {a}",
        f"a {a} on a plain background",
        f"a single {a}",
        f"one {a}",
        f"a picture of a {a}",
    ]


def make_image(first, second, relation: str | None, size: int, rng: random.Random) -> Image.Image:
    background = (rng.randint(235, 255),) * 3  # light grey: the shapes carry the colour
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if second is None:  # one object, anywhere
        extent = rng.randint(int(size * 0.45), int(size * 0.8))
        x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
        _draw(draw, first[1], COLOURS[first[0]], (x, y, x + extent, y + extent))
        return image
    half = size // 2
    extent = rng.randint(int(size * 0.28), int(size * 0.4))
    jitter = lambda: rng.randint(0, half - extent)  # noqa: E731
    if relation == "above":
        x = rng.randint(0, size - extent)
        boxes = [(x, jitter()), (rng.randint(0, size - extent), half + jitter())]
    else:
        y = rng.randint(0, size - extent)
        boxes = [(jitter(), y), (half + jitter(), rng.randint(0, size - extent))]
    for (colour, shape), (x, y) in zip((first, second), boxes):
        _draw(draw, shape, COLOURS[colour], (x, y, x + extent, y + extent))
    return image


def make_shapes_dataset(
    out_dir: str | Path, num_images: int = 200, size: int = 96, seed: int = 0, objects: int = 2
) -> Path:
    """Write ``images/*.png`` and a Flickr-style ``captions.txt``; return ``out_dir``.

    ``objects=1``: one shape per image ("a red circle"), learnable in seconds; ``objects=2``:
    two shapes and their relation ("a red circle above a blue square")."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_images):
        first = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        name = f"shape_{i:05d}.png"
        if objects == 1:
            make_image(first, None, None, size, rng).save(out_dir / "images" / name)
            rows.extend((name, caption) for caption in describe_one(first))
            continue
        second = first
        while second == first:
            second = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        relation = rng.choice(list(RELATIONS))
        make_image(first, second, relation, size, rng).save(out_dir / "images" / name)
        rows.extend((name, caption) for caption in describe(first, second, relation))
    with open(out_dir / "captions.txt", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return out_dir
