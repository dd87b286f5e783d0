"""Training-time image augmentation (albumentations 2.x).

The pipeline, in order: a mild random resized crop back to the input size, horizontal flip, a
small rotation / scale (Affine), colour jitter, ``BlendAlpha`` (blend the image with a grayscale,
equalized or colour-shifted copy of itself, as imgaug's ``BlendAlpha`` did in the original
project), then one of blur / motion blur / Gaussian noise. ``strength`` picks how far each goes.

``augment_image(image, seed)`` is deterministic: the same seed gives the same output on every call
and in every process. Note that a horizontal flip swaps "left" and "right" in a scene; captions
that mention them become wrong for the flipped view (rare in Flickr8k, accepted here).
"""

from __future__ import annotations

import math
import random
import threading
from typing import Annotated, Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import AfterValidator

from captioner.data.images import array_to_rgb
from captioner.errors import ConfigError

BlendMode = Literal["grayscale", "equalize", "channel_shift"]

STRENGTHS: dict[str, dict[str, Any]] = {
    "light": {
        "crop_scale": (0.9, 1.0),
        "rotate": 5.0,
        "scale": (0.95, 1.05),
        "p_affine": 0.3,
        "jitter": 0.1,
        "hue": 0.02,
        "p_jitter": 0.3,
        "blend_alpha": (0.0, 0.3),
        "p_blend": 0.1,
        "noise_std": (0.01, 0.03),
        "blur_sigma": (0.3, 0.8),
        "p_blur_noise": 0.1,
    },
    "medium": {
        "crop_scale": (0.8, 1.0),
        "rotate": 10.0,
        "scale": (0.9, 1.1),
        "p_affine": 0.5,
        "jitter": 0.2,
        "hue": 0.04,
        "p_jitter": 0.5,
        "blend_alpha": (0.0, 0.5),
        "p_blend": 0.25,
        "noise_std": (0.02, 0.05),
        "blur_sigma": (0.3, 1.2),
        "p_blur_noise": 0.2,
    },
    "strong": {
        "crop_scale": (0.8, 1.0),
        "rotate": 15.0,
        "scale": (0.85, 1.15),
        "p_affine": 0.7,
        "jitter": 0.3,
        "hue": 0.06,
        "p_jitter": 0.8,
        "blend_alpha": (0.0, 0.7),
        "p_blend": 0.4,
        "noise_std": (0.03, 0.08),
        "blur_sigma": (0.5, 1.6),
        "p_blur_noise": 0.3,
    },
}


def _check_alpha(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"alpha must satisfy 0 <= low <= high <= 1, got {value}")
    return value


def _check_modes(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("modes must name at least one foreground")
    return value


def _check_shift(value: int) -> int:
    if not 0 <= value <= 255:
        raise ValueError(f"max_shift must be in 0..255, got {value}")
    return value


class BlendAlpha(A.ImageOnlyTransform):
    """Blend the image with an augmented copy of itself: ``alpha * fg + (1 - alpha) * image``.

    Like imgaug's ``BlendAlpha(factor, foreground=...)``. Each call draws ``alpha`` uniformly from
    ``alpha`` and one foreground from ``modes``:

    - ``grayscale``: the luminance (ITU-R BT.601 weights) copied to all three channels;
    - ``equalize``: per-channel histogram equalization;
    - ``channel_shift``: a random offset in ``[-max_shift, max_shift]`` added to each channel.

    Image targets only; uint8 in, uint8 out. Randomness comes from the transform's own generators,
    so ``Compose(..., seed=...)`` makes it reproducible.
    """

    class InitSchema(BaseTransformInitSchema):
        alpha: Annotated[tuple[float, float], AfterValidator(_check_alpha)]
        modes: Annotated[tuple[BlendMode, ...], AfterValidator(_check_modes)]
        max_shift: Annotated[int, AfterValidator(_check_shift)]

    def __init__(
        self,
        alpha: tuple[float, float] = (0.0, 0.5),
        modes: tuple[BlendMode, ...] = ("grayscale", "equalize", "channel_shift"),
        max_shift: int = 40,
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.alpha = alpha
        self.modes = tuple(modes)
        self.max_shift = max_shift

    def get_params(self) -> dict[str, Any]:
        shift = [self.py_random.randint(-self.max_shift, self.max_shift) for _ in range(3)]
        return {
            "alpha": self.py_random.uniform(*self.alpha),
            "mode": self.py_random.choice(self.modes),
            "shift": np.asarray(shift, dtype=np.float32),
        }

    def apply(
        self, img: np.ndarray, alpha: float, mode: str, shift: np.ndarray, **params: Any
    ) -> np.ndarray:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"BlendAlpha expects an RGB uint8 (H, W, 3) image, got {img.shape}")
        foreground = self._foreground(img, mode, shift)
        blended = alpha * foreground + (1.0 - alpha) * img.astype(np.float32)
        return np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    @staticmethod
    def _foreground(img: np.ndarray, mode: str, shift: np.ndarray) -> np.ndarray:
        if mode == "grayscale":
            gray = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if mode == "equalize":
            channels = [cv2.equalizeHist(np.ascontiguousarray(img[:, :, c])) for c in range(3)]
            return np.stack(channels, axis=2).astype(np.float32)
        if mode == "channel_shift":
            return np.clip(img.astype(np.float32) + shift, 0, 255)
        raise ValueError(f"unknown BlendAlpha mode {mode!r}")


class RelativeResizedCrop(A.RandomResizedCrop):
    """``RandomResizedCrop`` whose crop keeps (roughly) the input's aspect ratio.

    The stock transform's ``ratio`` is the crop's absolute width/height, so on a 500x375 photo a
    near-square crop covering 80-100% of the area does not fit and it falls back to the same
    centre crop every time. Here the crop covers a fraction of the area drawn from ``scale`` and
    its aspect is the input's aspect times a factor drawn (log-uniformly) from ``ratio``; its
    position is uniform. The crop is resized to ``size`` (height, width), or with ``size=None``
    back to each input's own size, so one pipeline serves every image size.
    Image and mask targets only.
    """

    def __init__(
        self,
        size: tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (0.9, 1.0 / 0.9),
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ):
        # The parent validates scale, ratio and interpolation; (1, 1) stands in for size=None.
        super().__init__(
            size=size or (1, 1), scale=scale, ratio=ratio, interpolation=interpolation, p=p
        )
        self.size = None if size is None else tuple(size)

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, tuple[int, int, int, int]]:
        height, width = params["shape"][:2]
        area = self.py_random.uniform(*self.scale)
        factor = math.exp(self.py_random.uniform(*map(math.log, self.ratio)))
        crop_h = min(height, max(1, round(height * math.sqrt(area / factor))))
        crop_w = min(width, max(1, round(width * math.sqrt(area * factor))))
        y1 = self.py_random.randint(0, height - crop_h)
        x1 = self.py_random.randint(0, width - crop_w)
        return {"crop_coords": (x1, y1, x1 + crop_w, y1 + crop_h)}

    def _crop_resize(
        self,
        img: np.ndarray,
        crop_coords: tuple[int, int, int, int],
        shape: tuple[int, ...],
        interp: int,
    ) -> np.ndarray:
        x1, y1, x2, y2 = crop_coords
        height, width = self.size or shape[:2]
        crop = np.ascontiguousarray(img[y1:y2, x1:x2])
        if crop.shape[:2] == (height, width):
            return crop
        out = cv2.resize(crop, (width, height), interpolation=interp)
        return out.reshape(height, width, *img.shape[2:])  # cv2 drops a trailing 1-channel axis

    def apply(
        self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        return self._crop_resize(img, crop_coords, params["shape"], self.interpolation)

    def apply_to_mask(
        self, mask: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        return self._crop_resize(mask, crop_coords, params["shape"], self.mask_interpolation)


def build_augmenter(
    strength: str = "medium",
    size: int | tuple[int, int] | None = None,
    seed: int | None = None,
) -> A.Compose:
    """The training augmentation pipeline for RGB uint8 images.

    ``strength`` is one of ``STRENGTHS`` (light, medium, strong). ``size`` (int or (height,
    width)) fixes the output size; ``None`` keeps each input's size. ``seed`` makes the pipeline's
    sequence of outputs reproducible (all transforms draw from one shared generator, so their
    random decisions are independent of each other).
    """
    if strength not in STRENGTHS:
        raise ConfigError(
            f"unknown augmentation strength {strength!r}; choose one of {', '.join(STRENGTHS)}"
        )
    cfg = STRENGTHS[strength]
    hw = (size, size) if isinstance(size, int) else size
    crop = RelativeResizedCrop(size=hw, scale=cfg["crop_scale"], ratio=(0.9, 1.0 / 0.9))
    jitter = cfg["jitter"]
    pipeline = A.Compose(
        [
            crop,
            A.HorizontalFlip(p=0.5),
            A.Affine(
                rotate=(-cfg["rotate"], cfg["rotate"]),
                scale=cfg["scale"],
                border_mode=cv2.BORDER_REFLECT_101,
                p=cfg["p_affine"],
            ),
            A.ColorJitter(
                brightness=jitter,
                contrast=jitter,
                saturation=jitter,
                hue=cfg["hue"],
                p=cfg["p_jitter"],
            ),
            BlendAlpha(alpha=cfg["blend_alpha"], p=cfg["p_blend"]),
            A.OneOf(
                [
                    A.GaussianBlur(blur_limit=(3, 5), sigma_limit=cfg["blur_sigma"], p=1.0),
                    A.MotionBlur(blur_limit=(3, 5), p=1.0),
                    A.GaussNoise(std_range=cfg["noise_std"], p=1.0),
                ],
                p=cfg["p_blur_noise"],
            ),
        ],
        seed=seed,
    )
    # Compose(seed=s) seeds every transform with the same s, so their first draws coincide
    # (e.g. the flip and the colour jitter would always fire together). One shared stream keeps
    # the run reproducible and the transforms' decisions independent.
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return pipeline


_local = threading.local()  # per-thread pipelines: building one costs more than applying it


def _cached_augmenter(strength: str) -> A.Compose:
    cache: dict[str, A.Compose] = _local.__dict__.setdefault("pipelines", {})
    if strength not in cache:
        cache[strength] = build_augmenter(strength)
    return cache[strength]


def augment_image(image: np.ndarray, seed: int, strength: str = "medium") -> np.ndarray:
    """One augmented view of ``image``, the same for the same ``(seed, strength)``.

    ``image`` is RGB uint8 (H, W, 3) (other layouts ``array_to_rgb`` accepts are converted); the
    result is a new RGB uint8 array of the same (H, W, 3) shape. The input is not modified.
    """
    rgb = array_to_rgb(np.asarray(image), "image")
    if rgb is image:
        rgb = rgb.copy()  # albumentations may work in place on some paths; never on the caller's
    pipeline = _cached_augmenter(strength)
    # Reseeding the whole pipeline gives exactly what build_augmenter(strength, seed=seed) would.
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
    out = pipeline(image=rgb)["image"]
    return np.ascontiguousarray(out, dtype=np.uint8)
