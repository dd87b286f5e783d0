"""The one image loader every entry point uses (CLI, training features, web uploads)."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

from captioner.errors import ImageLoadError

# Limits (a "bomb" is a small file whose header claims a huge picture):
# - MAX_IMAGE_PIXELS: the most pixels ever decoded (64 MP = 192 MB of RGB), any format.
# - JPEGs over DRAFT_ABOVE_PIXELS are decoded at 1/2, 1/4 or 1/8 scale (libjpeg does this while
#   decoding, in bounded memory), keeping at least DRAFT_SIDE pixels on each side: the encoder
#   reads ~224-260 px and the attention figure 256 px, so a 100 MP phone photo decodes to about
#   1400x1000. Ordinary photos (up to 16 MP) are decoded in full.
# - MAX_JPEG_PIXELS: the largest JPEG accepted at all (1000 MP, well above any camera), which
#   bounds the decoding time of a reduced decode. Pillow's own Image.MAX_IMAGE_PIXELS is set to
#   it, so Pillow's bomb error (at twice that) stays only as an outer guard.
# Other formats cannot be decoded reduced, so they are refused above MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 64_000_000
DRAFT_ABOVE_PIXELS = 16_000_000
DRAFT_SIDE = 512
MAX_JPEG_PIXELS = 1_000_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


def _megapixels(pixels: int) -> str:
    if pixels < 1_000_000:
        return f"{pixels:,} pixels"
    return f"{pixels / 1e6:,.0f} MP" if pixels >= 10_000_000 else f"{pixels / 1e6:.1f} MP"


def _kb(n: int) -> str:
    return f"{n:,} bytes" if n < 10_000 else f"{n / 1024:,.0f} KB"


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled so that its long side is ``max_side`` (aspect ratio kept)."""
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_and_reduce(
    image: Image.Image, name: str, max_side: int | None = None, data_bytes: int | None = None
) -> None:
    """Refuse sizes over the limits (read from the header: nothing is decoded yet) and set a
    large JPEG to decode reduced (to ``max_side`` on the long edge when the caller only needs
    that much, else when it is over DRAFT_ABOVE_PIXELS)."""
    width, height = image.size
    pixels = width * height
    what = f"a {width}x{height} {image.format or 'image'} ({_megapixels(pixels)})"
    if not isinstance(image, JpegImagePlugin.JpegImageFile):  # (MPO photos are JPEGs too)
        if pixels > MAX_IMAGE_PIXELS:
            raise ImageLoadError(
                f"{name}: {what} is over the limit of {_megapixels(MAX_IMAGE_PIXELS)} (only "
                f"JPEG photos are decoded at reduced size, up to {_megapixels(MAX_JPEG_PIXELS)})"
            )
        return
    if pixels > MAX_JPEG_PIXELS:
        raise ImageLoadError(
            f"{name}: {what} is over the limit of {_megapixels(MAX_JPEG_PIXELS)} for a JPEG"
        )
    if pixels > MAX_IMAGE_PIXELS and data_bytes is not None:
        # Every 8x8 block of a Huffman-coded JPEG costs at least one bit (its DC code), so fewer
        # bytes than blocks / 8 cannot hold the picture: libjpeg would fill the rest with grey.
        least = -(-width // 8) * -(-height // 8) // 8
        if data_bytes < least:
            raise ImageLoadError(
                f"{name}: {what} is over the limit of {_megapixels(MAX_IMAGE_PIXELS)} and its "
                f"{_kb(data_bytes)} cannot hold that many pixels (at least {_kb(least)}): "
                "truncated, or a header that lies"
            )
    if max_side is not None and max(width, height) > max_side:
        image.draft(None, _fit((width, height), max_side))  # image.size becomes the reduced size
    elif pixels > DRAFT_ABOVE_PIXELS:
        image.draft(None, (DRAFT_SIDE, DRAFT_SIDE))
    reduced = image.size[0] * image.size[1]
    if reduced > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"{name}: {what} is over the limit: even decoded at reduced size it is "
            f"{image.size[0]}x{image.size[1]} ({_megapixels(reduced)}; the limit is "
            f"{_megapixels(MAX_IMAGE_PIXELS)})"
        )


@contextlib.contextmanager
def _as_image_error(name: str) -> Iterator[None]:
    """Any failure of Pillow or its codecs becomes one ImageLoadError naming the file.

    Decoders raise far more than OSError on malformed input (IndexError counting the frames of
    a cut GIF, TypeError for a TIFF without its size, struct.error, ZeroDivisionError...), and
    one bad file must never take down a bulk run or a server worker.
    """
    try:
        with warnings.catch_warnings():
            # our own limits are checked from the header before decoding; Pillow's warning is
            # superseded, its error (over 2x MAX_JPEG_PIXELS) stays as an outer guard
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # and a damaged file gets one error, not a screen of "Skipping tag 257" first
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            Image.MAX_IMAGE_PIXELS = MAX_JPEG_PIXELS
            yield
    except ImageLoadError:
        raise
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{name}: file not found") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(f"{name}: is a directory, not an image") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not an image (or a format Pillow cannot read)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"{name}: image too large to decode safely (its header claims over "
            f"{_megapixels(2 * MAX_JPEG_PIXELS)})"
        ) from exc
    except MemoryError as exc:
        raise ImageLoadError(f"{name}: not enough memory to decode this image") from exc
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a bad image
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ImageLoadError(f"{name}: corrupt or truncated image ({why})") from exc


def open_image(
    source: str | os.PathLike | bytes, name: str, max_side: int | None = None
) -> Image.Image:
    """Open and check an image from its header, without decoding it.

    Raises ImageLoadError for anything that is not an image or is over the limits. With
    ``max_side``, a JPEG is set to decode at the smallest scale that still gives that many
    pixels on the long edge, so ``image.size`` is what :func:`decode_image` will decode: the
    decoding cost that a server counts before it decodes (see :func:`decoded_pixels`).
    """
    with _as_image_error(name):
        if isinstance(source, bytes):
            if not source:
                raise ImageLoadError(f"{name}: empty file")
            handle: str | os.PathLike | io.BytesIO = io.BytesIO(source)
            size = len(source)
        else:
            handle = source
            path = Path(source)
            size = path.stat().st_size if path.is_file() else None
            if size == 0:
                raise ImageLoadError(f"{name}: empty file")
        image = Image.open(handle)
        _check_and_reduce(image, name, max_side, size)
        return image


def decoded_pixels(image: Image.Image) -> int:
    """Pixels :func:`decode_image` will decode for an image from :func:`open_image`."""
    return image.size[0] * image.size[1]


def decode_image(image: Image.Image, name: str, max_side: int | None = None) -> np.ndarray:
    """Decode an opened image (the first frame of an animation) to RGB uint8 (H, W, 3), shrunk
    to ``max_side`` on the long edge before any conversion copies it."""
    with _as_image_error(name):
        image.load()  # decode now, so truncation is found here and not later
        method = _transpose_method(image)  # before a resize drops the TIFF tags
        if max_side is not None and max(image.size) > max_side:
            image = _resamplable(image)
            image = image.resize(_fit(image.size, max_side), Image.BICUBIC, reducing_gap=3.0)
        image = _flatten(image)
        if method is not None:
            image = image.transpose(method)
        return np.asarray(image, dtype=np.uint8)


_RESAMPLABLE = ("RGB", "RGBA", "L", "LA", "CMYK", "I", "F")
_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _transpose_method(image: Image.Image) -> Image.Transpose | None:
    try:
        return _ORIENTATIONS.get(image.getexif().get(0x0112))
    except Exception:  # a broken EXIF block must not lose the picture
        return None


def _resamplable(image: Image.Image) -> Image.Image:
    """A mode that resizes by averaging (a palette's indices cannot be averaged), converted at
    most once at full size and at no more than 4 bytes a pixel."""
    if image.mode in _RESAMPLABLE:
        return image
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "PA":
        return image.convert("RGBA")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")
    return image.convert("RGB")


def _flatten(image: Image.Image) -> Image.Image:
    """Any mode (L, P, CMYK, RGBA, I;16...) to RGB, transparency on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = (array - lo) / (hi - lo or 1.0) * 255.0
        image = Image.fromarray(scaled.astype(np.uint8))
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and flatten any mode (L, P, CMYK, RGBA, I;16...) to RGB."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the picture
        pass
    return _flatten(image)


def load_image(
    source: ImageInput, name: str | None = None, max_side: int | None = None
) -> np.ndarray:
    """Any supported input -> RGB uint8 array (H, W, 3). Raises ImageLoadError naming the file.

    ``max_side``: the caller needs no more than this on the long edge (a JPEG is then decoded
    reduced, anything else shrunk right after decoding). None keeps the full size.
    """
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, name or "array")
    if isinstance(source, Image.Image):
        name = name or "image"
        with _as_image_error(name):
            return np.asarray(to_rgb(source), dtype=np.uint8)
    name = name or ("upload" if isinstance(source, bytes) else str(Path(source)))
    image = open_image(source, name, max_side)
    try:
        return decode_image(image, name, max_side)
    finally:
        image.close()  # the file now, not when the garbage collector gets to it


def array_to_rgb(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Accept (H, W), (H, W, 1|3|4) uint8 or float in [0, 1]; return RGB uint8 (H, W, 3)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageLoadError(f"{name}: expected an (H, W), (H, W, 1|3|4) array, got {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(
            array.dtype, np.integer
        ):
            raise ImageLoadError(f"{name}: unsupported array dtype {array.dtype}")
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ImageLoadError(f"{name}: array has NaN or infinite values")
        if array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize (the dataset images are already squashed to squares), bicubic."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)
