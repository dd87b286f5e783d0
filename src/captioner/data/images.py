"""The one image loader every entry point uses (CLI, training features, web uploads)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from captioner.errors import ImageLoadError

# Larger than any real photo we expect, small enough that a crafted header can't eat the RAM.
MAX_IMAGE_PIXELS = 64_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


def _open(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            handle = io.BytesIO(source) if isinstance(source, bytes) else source
            image = Image.open(handle)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageLoadError(
                    f"{name}: {width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS:,}"
                )
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
        raise ImageLoadError(f"{name}: image too large to decode safely ({exc})") from exc
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
