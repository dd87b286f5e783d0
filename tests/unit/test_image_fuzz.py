"""Image-mutation fuzzing of the one image loader (issue 22: a probe mutated 12,000 images and
four unhandled exceptions came out of Pillow: IndexError, TypeError...).

Small synthetic PNG/JPEG/GIF/TIFF/BMP/WebP files (still and animated) are mutated
deterministically (seeded RNG): bit flips, byte overwrites with 0x00/0xFF, truncation, cut-outs,
duplicated spans and splices of one file's header onto another's body. Whatever comes out, the
loader answers with a picture or with ImageLoadError, never anything else; the web decoder
answers with a picture or a 415/422 UploadError.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

import captioner.data.images as images_module
from captioner.data.images import load_image
from captioner.errors import ImageLoadError
from captioner.web.decode import decode_upload
from captioner.web.upload import UploadError

SEED = 22
CASES_PER_SEED_FILE = 40


def _pattern(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    array[: height // 2, : width // 2] = (200, 30, 30)  # some flat area, some noise
    return Image.fromarray(array)


def _save(image: Image.Image | list[Image.Image], fmt: str, **options) -> bytes:
    buf = io.BytesIO()  # copies: a TIFF save leaves its encoder settings on the image
    if isinstance(image, list):
        image = [frame.copy() for frame in image]
        image[0].save(buf, fmt, save_all=True, append_images=image[1:], **options)
    else:
        image.copy().save(buf, fmt, **options)
    return buf.getvalue()


def seed_files() -> dict[str, bytes]:
    """The unmutated corpus: every format the loader accepts, with its variants."""
    a, b, c = (_pattern(24, 16, s) for s in range(3))
    frames = [a, b, c]
    return {
        "png": _save(a, "PNG"),
        "png-palette": _save(a.convert("P"), "PNG"),
        "png-rgba": _save(a.convert("RGBA"), "PNG"),
        "jpeg": _save(a, "JPEG", quality=80),
        "jpeg-progressive": _save(b, "JPEG", progressive=True),
        "jpeg-grey": _save(a.convert("L"), "JPEG"),
        "gif": _save(a.convert("P"), "GIF"),
        "gif-animated": _save(frames, "GIF", duration=50, loop=0),
        "tiff": _save(a, "TIFF"),
        "tiff-lzw-pages": _save(frames, "TIFF", compression="tiff_lzw"),
        "bmp": _save(a, "BMP"),
        "webp": _save(a, "WEBP", quality=70),
        "webp-lossless": _save(b, "WEBP", lossless=True),
        "webp-animated": _save(frames, "WEBP", duration=50),
    }


def mutate(data: bytes, donor: bytes, rng: random.Random) -> bytes:
    """One deterministic mutation of ``data`` (``donor``: another seed file, for splices)."""
    out = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # flip a few bits, mostly near the header where parsers decide sizes
        for _ in range(rng.randint(1, 8)):
            limit = len(out) if rng.random() < 0.5 else min(len(out), 96)
            out[rng.randrange(limit)] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del out[rng.randint(1, len(out) - 1) :]
    elif kind == 2:  # overwrite a few bytes with extremes (sizes, counts, offsets)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(out), 128))
            out[at : at + rng.randint(1, 4)] = bytes([rng.choice((0x00, 0xFF, 0x7F, 0x80))] * 4)
    elif kind == 3:  # cut a span out of the middle
        start = rng.randrange(len(out))
        del out[start : start + rng.randint(1, 64)]
    elif kind == 4:  # duplicate a span (repeated chunks, frames, IFDs)
        start = rng.randrange(len(out))
        span = out[start : start + rng.randint(1, 128)]
        at = rng.randrange(len(out))
        out[at:at] = span
    elif kind == 5:  # splice: this file's header onto the donor's body
        cut = rng.randint(4, min(len(out), 64))
        out = out[:cut] + bytearray(donor[min(cut, len(donor) - 1) :])
    else:  # splice: the donor's header onto this body (magic of one format, data of another)
        cut = rng.randint(4, min(len(donor), 64))
        out = bytearray(donor[:cut]) + out[cut:]
    return bytes(out)


def mutated_corpus() -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    seeds = seed_files()
    names = sorted(seeds)
    cases = []
    for name in names:
        for i in range(CASES_PER_SEED_FILE):
            donor = seeds[rng.choice(names)]
            cases.append((f"{name}#{i}", mutate(seeds[name], donor, rng)))
    return cases


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, bytes]]:
    cases = mutated_corpus()
    assert len(cases) == len(seed_files()) * CASES_PER_SEED_FILE >= 500
    return cases


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    """Limits scaled down (as the real ones, only smaller) so that a mutated header claiming a
    large picture is decided in milliseconds and the test stays small."""
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 1_000_000)
    monkeypatch.setattr(images_module, "MAX_JPEG_PIXELS", 16_000_000)
    monkeypatch.setattr(images_module, "DRAFT_ABOVE_PIXELS", 250_000)


def test_seed_files_all_load():
    for name, data in seed_files().items():
        out = load_image(data, name=name)
        assert out.dtype == np.uint8 and out.shape == (16, 24, 3), name


def test_mutations_are_deterministic():
    assert mutated_corpus() == mutated_corpus()


def test_mutated_images_give_a_picture_or_an_image_error(corpus):
    outcomes = {"decoded": 0, "refused": 0}
    for name, data in corpus:
        try:
            out = load_image(data, name=name)
        except ImageLoadError as exc:
            message = str(exc)
            assert message.startswith(f"{name}: ") and "\n" not in message, message
            outcomes["refused"] += 1
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, name
            outcomes["decoded"] += 1
    # the corpus exercises both outcomes (a fuzz run that refuses everything tests little)
    assert outcomes["decoded"] > 20 and outcomes["refused"] > 100, outcomes


def test_mutated_uploads_give_a_picture_or_415_422(corpus):
    for name, data in corpus:
        try:
            out = decode_upload(data, name, max_side=16)
        except UploadError as exc:
            assert exc.status in (415, 422), (name, exc.status, exc.message)
        else:
            assert out.dtype == np.uint8 and max(out.shape[:2]) <= 16, name
