"""Normalization methods, the augmentation pipeline and their preview figures."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from captioner.data import normalize as norm
from captioner.data.augment import (
    STRENGTHS,
    BlendAlpha,
    RelativeResizedCrop,
    augment_image,
    build_augmenter,
)
from captioner.errors import ConfigError
from captioner.viz.previews import render_augment_preview, render_normalize_preview


def synthetic_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Gradients, a bright square and noise: enough structure for every transform to act on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [255 * xx / (width - 1), 255 * yy / (height - 1), np.full((height, width), 90.0)], axis=2
    )
    image[height // 4 : height // 2, width // 4 : width // 2] = (250, 240, 30)
    image += rng.normal(0, 8, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- normalization


def test_registry_names():
    assert set(norm.NORMALIZATIONS) == {"minmax", "mean_std", "per_channel", "encoder"}


@pytest.mark.parametrize("method", sorted(norm.NORMALIZATIONS))
def test_normalization_shape_dtype_and_no_mutation(method):
    image = synthetic_image()
    before = image.copy()
    out = norm.NORMALIZATIONS[method](image)
    assert out.shape == image.shape
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(image, before)


def test_minmax_spans_zero_to_one():
    out = norm.minmax(synthetic_image())
    assert out.min() == pytest.approx(0.0)
    assert out.max() == pytest.approx(1.0)


def test_minmax_uses_the_image_range_not_0_255():
    image = np.full((4, 4, 3), 100, np.uint8)
    image[0, 0] = 150
    out = norm.minmax(image)
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[1, 1, 0] == 0.0


def test_mean_std_is_standardized_globally():
    out = norm.mean_std(synthetic_image())
    assert float(out.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(out.std()) == pytest.approx(1.0, abs=1e-4)
    # global: the channels keep their differences (the blue channel is mostly constant)
    assert abs(float(out[..., 2].mean())) > 0.1


def test_per_channel_standardizes_each_channel():
    out = norm.per_channel(synthetic_image())
    np.testing.assert_allclose(out.mean(axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1)), 1.0, atol=1e-4)


def test_encoder_matches_spec_formula():
    from captioner.features.encoders import ENCODERS, EncoderSpec, get_spec

    image = synthetic_image()
    expected = (image.astype(np.float32) - 127.0) / 128.0
    np.testing.assert_allclose(norm.encoder(image), expected, rtol=0, atol=1e-6)
    spec = get_spec("efficientnet-lite1")
    np.testing.assert_allclose(norm.encoder(image, spec.mean, spec.std), expected, atol=1e-6)
    assert norm.normalize(image, "encoder").shape == image.shape
    # one source for the constants: the data layer's, which every bundled spec uses
    assert (EncoderSpec.mean, EncoderSpec.std) == (norm.ENCODER_MEAN, norm.ENCODER_STD)
    assert {(s.mean, s.std) for s, _ in ENCODERS.values()} == {(127.0, 128.0)}


def test_encoder_unknown_name_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown encoder"):
        render_normalize_preview(synthetic_image(), tmp_path / "x.png", encoder="resnet-9000")
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ConfigError):
        norm.normalize(synthetic_image(), "zscore")


@pytest.mark.parametrize("value", [0, 77, 255])
@pytest.mark.parametrize("method", ["minmax", "mean_std", "per_channel"])
def test_constant_image_gives_finite_zeros(method, value):
    image = np.full((8, 8, 3), value, np.uint8)
    with np.errstate(all="raise"):  # no division by zero, no invalid ops
        out = norm.NORMALIZATIONS[method](image)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, 0.0)


def test_per_channel_with_one_constant_channel():
    image = synthetic_image()
    image[..., 1] = 42
    out = norm.per_channel(image)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[..., 1], 0.0)
    assert float(out[..., 0].std()) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("strength", sorted(STRENGTHS))
def test_augment_same_seed_same_output(strength):
    image = synthetic_image()
    first = augment_image(image, seed=7, strength=strength)
    for _ in range(2):
        np.testing.assert_array_equal(augment_image(image, seed=7, strength=strength), first)


def test_augment_different_seeds_differ():
    image = synthetic_image()
    views = [augment_image(image, seed=s) for s in range(6)]
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            assert not np.array_equal(views[i], views[j]), (i, j)


def test_augment_matches_a_freshly_built_pipeline():
    """augment_image reuses a cached pipeline; reseeding must make that invisible."""
    image = synthetic_image()
    for seed in (0, 3):
        fresh = build_augmenter("medium", seed=seed)(image=image.copy())["image"]
        np.testing.assert_array_equal(augment_image(image, seed=seed), fresh)


@pytest.mark.parametrize("shape", [(48, 64, 3), (64, 48, 3), (33, 33, 3), (300, 40, 3)])
@pytest.mark.parametrize("strength", sorted(STRENGTHS))
def test_augment_keeps_shape_and_dtype_and_input(shape, strength):
    image = synthetic_image(shape[0], shape[1])
    before = image.copy()
    for seed in range(5):
        out = augment_image(image, seed=seed, strength=strength)
        assert out.shape == shape
        assert out.dtype == np.uint8
        assert out is not image
    np.testing.assert_array_equal(image, before)


def test_augment_actually_changes_images():
    image = synthetic_image()
    changed = sum(not np.array_equal(augment_image(image, seed=s), image) for s in range(10))
    assert changed == 10  # the resized crop always runs


def test_augment_unknown_strength():
    with pytest.raises(ConfigError):
        build_augmenter("extreme")
    with pytest.raises(ConfigError):
        augment_image(synthetic_image(), seed=0, strength="extreme")


def test_build_augmenter_fixed_size():
    out = build_augmenter("medium", size=32, seed=0)(image=synthetic_image())["image"]
    assert out.shape == (32, 32, 3)
    out = build_augmenter("light", size=(20, 30), seed=0)(image=synthetic_image())["image"]
    assert out.shape == (20, 30, 3)


def test_pipeline_transforms_draw_independently():
    """Compose(seed=s) alone gives every transform the same stream, so a p=0.5 flip and a
    p=0.5 colour jitter would fire together; the shared stream must decorrelate them."""
    image = synthetic_image(24, 24)
    pipeline = build_augmenter("medium", seed=123)
    pipeline.save_applied_params = True
    flips = jitters = both = 0
    for _ in range(400):
        names = {name for name, _ in pipeline(image=image)["applied_transforms"]}
        flip, jitter = "HorizontalFlip" in names, "ColorJitter" in names
        flips, jitters, both = flips + flip, jitters + jitter, both + (flip and jitter)
    assert 140 < flips < 260 and 140 < jitters < 260
    assert 60 < both < 140  # ~100 when independent, ~200 when locked together


def test_relative_resized_crop_keeps_aspect_and_area():
    crop = RelativeResizedCrop(scale=(0.8, 1.0), ratio=(0.9, 1 / 0.9), p=1.0)
    crop.set_random_seed(0)
    seen = set()
    for _ in range(100):
        params = crop.get_params_dependent_on_data({"shape": (375, 500, 3)}, {})
        x1, y1, x2, y2 = params["crop_coords"]
        assert 0 <= x1 < x2 <= 500 and 0 <= y1 < y2 <= 375
        assert 0.75 <= (x2 - x1) * (y2 - y1) / (375 * 500) <= 1.0
        assert 0.85 <= ((x2 - x1) / (y2 - y1)) / (500 / 375) <= 1.2
        seen.add((x1, y1, x2, y2))
    assert len(seen) > 50  # not a fixed fallback crop


@pytest.mark.parametrize("mode", ["grayscale", "equalize", "channel_shift"])
def test_blend_alpha_modes(mode):
    image = synthetic_image()
    before = image.copy()
    blend = BlendAlpha(alpha=(1.0, 1.0), modes=(mode,), max_shift=40, p=1.0)
    out = A.Compose([blend], seed=0)(image=image)["image"]
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    np.testing.assert_array_equal(image, before)
    if mode == "grayscale":  # alpha 1: all three channels equal
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 1], out[..., 2])


def test_blend_alpha_zero_is_identity():
    image = synthetic_image()
    out = A.Compose([BlendAlpha(alpha=(0.0, 0.0), p=1.0)], seed=0)(image=image)["image"]
    np.testing.assert_array_equal(out, image)


def test_blend_alpha_validates_arguments():
    with pytest.raises(ValueError):
        BlendAlpha(alpha=(0.6, 0.2))
    with pytest.raises(ValueError):
        BlendAlpha(modes=("sepia",))


# ---------------------------------------------------------------- previews


def test_normalize_preview_writes_png(tmp_path):
    out = render_normalize_preview(synthetic_image(), tmp_path / "sub" / "normalize.png")
    assert out == tmp_path / "sub" / "normalize.png"
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert width >= 1000 and height >= 200  # five panels side by side
    assert [p.name for p in out.parent.iterdir()] == ["normalize.png"]  # no temp file left


def test_normalize_preview_constant_image(tmp_path):
    out = render_normalize_preview(np.full((30, 30, 3), 9, np.uint8), tmp_path / "flat.png")
    with Image.open(out) as png:
        assert png.format == "PNG"


def test_augment_preview_writes_png(tmp_path):
    out = render_augment_preview(synthetic_image(), tmp_path / "augment.png", n=5, seed=1)
    with Image.open(out) as png:
        assert png.format == "PNG"
        width, height = png.size
    assert width >= 600 and height >= 300  # 3x2 grid for the original + 5 views
    with pytest.raises(ConfigError):
        render_augment_preview(synthetic_image(), tmp_path / "none.png", n=0)
