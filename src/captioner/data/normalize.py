"""Image normalization methods: RGB uint8 (H, W, 3) in, float32 (H, W, 3) out.

Four ways to turn pixel values into network inputs, kept side by side so they can be compared
(``captioner.viz.previews.render_normalize_preview`` draws them):

- ``minmax``: stretch the image's own min..max to 0..1.
- ``mean_std``: subtract the image's global mean, divide by its global std.
- ``per_channel``: the same, per colour channel.
- ``encoder``: what the pretrained encoder was trained with, ``(x - mean) / std``. The
  constants live here, in the data layer (``ENCODER_MEAN``/``ENCODER_STD``, the defaults of
  ``captioner.features.encoders.EncoderSpec``); a caller with another spec passes its
  ``spec.mean, spec.std`` down, so this module never imports the features layer above it.
  Training and prediction use ``captioner.features.encoders.preprocess``, which also resizes.

A constant image (zero range / zero std) gives finite values, never NaN: the divisor falls back
to 1, so min-max and the standardizations return zeros there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from captioner.data.images import array_to_rgb
from captioner.errors import ConfigError

# Below this a spread counts as zero. uint8 images never get close: their smallest nonzero std
# is well above 1e-3.
_EPS = 1e-6

# x' = (x - mean) / std on RGB 0..255: what the EfficientNet-Lite weights (born in TF-Lite)
# were trained with; features.encoders.EncoderSpec takes its defaults from here
ENCODER_MEAN = 127.0
ENCODER_STD = 128.0


def _as_float(image: np.ndarray) -> np.ndarray:
    """Validated RGB uint8 (H, W, 3) -> float64 copy (the statistics are computed in float64)."""
    return array_to_rgb(np.asarray(image), "image").astype(np.float64)


def _safe(divisor: np.ndarray | float) -> np.ndarray:
    divisor = np.asarray(divisor, dtype=np.float64)
    return np.where(divisor > _EPS, divisor, 1.0)


def minmax(image: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] over the whole image: (x - min) / (max - min)."""
    x = _as_float(image)
    lo, hi = x.min(), x.max()
    return ((x - lo) / _safe(hi - lo)).astype(np.float32)


def mean_std(image: np.ndarray) -> np.ndarray:
    """Global standardization: (x - mean) / std over all pixels and channels together."""
    x = _as_float(image)
    return ((x - x.mean()) / _safe(x.std())).astype(np.float32)


def per_channel(image: np.ndarray) -> np.ndarray:
    """Per-channel standardization: each of R, G, B to mean 0 and variance 1 on its own."""
    x = _as_float(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    std = x.std(axis=(0, 1), keepdims=True)
    return ((x - mean) / _safe(std)).astype(np.float32)


def encoder(image: np.ndarray, mean: float = ENCODER_MEAN, std: float = ENCODER_STD) -> np.ndarray:
    """The encoder's own preprocessing, (x - mean) / std, without the resize.

    The defaults are every bundled encoder's (``EncoderSpec.mean``/``std``); for a named
    encoder, pass ``spec.mean, spec.std`` from ``captioner.features.encoders.get_spec``.
    """
    x = _as_float(image)
    return ((x - mean) / _safe(std)).astype(np.float32)


NORMALIZATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "minmax": minmax,
    "mean_std": mean_std,
    "per_channel": per_channel,
    "encoder": encoder,
}


def normalize(image: np.ndarray, method: str = "encoder") -> np.ndarray:
    """Apply the named method from ``NORMALIZATIONS``; an unknown name raises ``ConfigError``."""
    if method not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown normalization {method!r}; choose one of {', '.join(NORMALIZATIONS)}"
        )
    return NORMALIZATIONS[method](image)
