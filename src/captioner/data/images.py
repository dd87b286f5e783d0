"""The one image loader every entry point uses (CLI, training features, web uploads)."""

from __future__ import annotations

import io
import os
import warnings
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


def _check_and_reduce(image: Image.Image, name: str) -> None:
    """Refuse sizes over the limits (read from the header: nothing is decoded yet) and set a
    large JPEG to decode reduced."""
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
    if pixels > DRAFT_ABOVE_PIXELS:
        image.draft(None, (DRAFT_SIDE, DRAFT_SIDE))  # image.size becomes the reduced size
    reduced = image.size[0] * image.size[1]
    if reduced > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"{name}: {what} is over the limit: even decoded at reduced size it is "
            f"{image.size[0]}x{image.size[1]} ({_megapixels(reduced)}; the limit is "
            f"{_megapixels(MAX_IMAGE_PIXELS)})"
        )


def _open(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # our own limits are checked from the header before decoding; Pillow's warning is
            # superseded, its error (over 2x MAX_JPEG_PIXELS) stays as an outer guard
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_JPEG_PIXELS
            handle = io.BytesIO(source) if isinstance(source, bytes) else source
            image = Image.open(handle)
            _check_and_reduce(image, name)
            image.load()  # decode now, so truncation is found here and not later
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP: the first frame
            return image
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
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({exc})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and flatten any mode (L, P, CMYK, RGBA, I;16...) to RGB."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the picture
        pass
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


def load_image(source: ImageInput, name: str | None = None) -> np.ndarray:
    """Any supported input -> RGB uint8 array (H, W, 3). Raises ImageLoadError naming the file."""
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, name or "array")
    if isinstance(source, Image.Image):
        return np.asarray(to_rgb(source), dtype=np.uint8)
    if isinstance(source, bytes):
        name = name or "upload"
        if not source:
            raise ImageLoadError(f"{name}: empty file")
        return np.asarray(to_rgb(_open(source, name)), dtype=np.uint8)
    path = Path(source)
    name = name or str(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ImageLoadError(f"{name}: empty file")
    return np.asarray(to_rgb(_open(path, name)), dtype=np.uint8)


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
