"""Encoders, preprocessing, the ONNX Runtime extractor (parity with PyTorch) and the sharded
feature cache: complete/resumable/stale detection, damaged shards, augmented views and
``ensure_features``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import captioner.features.pipeline as pipeline
from captioner.data.images import load_image
from captioner.data.prepare import PreparedData
from captioner.data.splits import Splits, SplitSettings
from captioner.errors import CacheError, ConfigError
from captioner.features import onnx as onnx_module
from captioner.features.cache import (
    MANIFEST,
    cache_dir_for,
    dataset_fingerprint,
    extract_to_cache,
    is_current,
    load_cache,
    view_seed,
)
from captioner.features.encoders import ENCODERS, build_encoder, get_spec, preprocess
from captioner.features.onnx import FeatureExtractor, export_encoder
from captioner.features.pipeline import ensure_features, load_features

ENCODER = "efficientnet-lite0"
AUGMENT = {"seed": 0, "strength": "medium"}


# ---- shared, expensive things: one ONNX export and one torch encoder per module --------------
@pytest.fixture(scope="module")
def ort_extractor() -> FeatureExtractor:
    extractor = FeatureExtractor(ENCODER, backend="onnx", threads=1)
    assert extractor.backend == "onnx"
    return extractor


@pytest.fixture(scope="module")
def torch_extractor() -> FeatureExtractor:
    extractor = FeatureExtractor(ENCODER, backend="torch")
    assert extractor.backend == "torch"
    return extractor


@pytest.fixture(scope="module")
def names(shapes_prepared) -> list[str]:
    return sorted(shapes_prepared.captions)[:6]


@pytest.fixture(scope="module")
def reference(shapes_prepared, names, ort_extractor) -> np.ndarray:
    """Features of ``names`` by direct extraction, float32 (6, 49, 1280)."""
    images = [load_image(shapes_prepared.images_dir / n) for n in names]
    return ort_extractor(preprocess(images, ort_extractor.spec))


@pytest.fixture
def images_dir(tmp_path, shapes_prepared, names) -> Path:
    """A private copy of the subset's images (tests may change them)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        shutil.copy(shapes_prepared.images_dir / name, folder / name)
    return folder


class Counting:
    """Wraps an extractor: counts calls and images, and can fail after ``fail_after`` calls."""

    def __init__(self, inner: FeatureExtractor, fail_after: int | None = None):
        self.inner = inner
        self.spec = inner.spec
        self.backend = inner.backend
        self.fail_after = fail_after
        self.calls = 0
        self.images = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.images += batch.shape[0]
        return self.inner(batch)


def extract(images_dir, names, cache_dir, extractor, **kwargs) -> Path:
    kwargs = {"batch_size": 2, "shard_size": 2, "progress": False, **kwargs}
    return extract_to_cache(images_dir, names, cache_dir, extractor, **kwargs)


def manifest(cache_dir: Path) -> dict:
    return json.loads((cache_dir / MANIFEST).read_text())


# ---- encoder specs and preprocessing -------------------------------------------------------
def test_encoder_keeps_the_lite_relu6_activations():
    """Lite models use ReLU6; swapping in Swish (revision 1's bug) degrades the features."""
    encoder = build_encoder(ENCODER)
    activations = {type(m).__name__ for m in encoder.modules()}
    assert "ReLU6" in activations
    assert not {"Swish", "MemoryEfficientSwish"} & activations
    with torch.no_grad():
        grid = encoder(torch.randn(1, 3, 224, 224) * 3)
    assert float(grid.min()) >= 0.0 and float(grid.max()) <= 6.0


def test_encoder_specs():
    spec = get_spec(ENCODER)
    assert (spec.image_size, spec.channels, spec.grid, spec.num_pixels) == (224, 1280, 7, 49)
    assert (spec.mean, spec.std) == (127.0, 128.0)
    assert get_spec("efficientnet-lite1").grid == 8  # ceil(240 / 32)
    assert get_spec("efficientnet-lite2").grid == 9  # ceil(260 / 32)
    assert spec.to_json() == {
        "name": ENCODER,
        "image_size": 224,
        "channels": 1280,
        "mean": 127.0,
        "std": 128.0,
        "revision": 2,
    }
    assert set(ENCODERS) == {
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
        "efficientnet-lite2-224",
    }
    with pytest.raises(ConfigError, match="unknown encoder 'resnet'"):
        get_spec("resnet")


def test_lite2_224_is_lite2s_weights_on_a_7x7_grid():
    """The 224 px variant must load lite2's ImageNet weights, not fall back to anything else."""
    spec = get_spec("efficientnet-lite2-224")
    assert (spec.image_size, spec.grid, spec.num_pixels) == (224, 7, 49)
    native, small = build_encoder("efficientnet-lite2"), build_encoder("efficientnet-lite2-224")
    a, b = native.state_dict(), small.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert small(torch.zeros(1, 3, 224, 224)).shape == (1, 49, 1280)


def test_preprocess_normalises_and_resizes():
    spec = get_spec(ENCODER)
    red = np.zeros((50, 80, 3), dtype=np.uint8)
    red[..., 0] = 255
    grey = np.full((224, 224, 3), 127, dtype=np.uint8)
    black = np.zeros((10, 10, 3), dtype=np.uint8)
    batch = preprocess([red, grey, black], spec)
    assert batch.shape == (3, 3, 224, 224)
    assert batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(batch[0, 0], (255 - 127) / 128)  # channels first, R G B
    np.testing.assert_allclose(batch[0, 1:], -127 / 128)
    np.testing.assert_array_equal(batch[1], 0.0)
    np.testing.assert_allclose(batch[2], -127 / 128)


def test_preprocess_matches_formula_on_real_image(shapes_prepared, names):
    spec = get_spec(ENCODER)
    image = load_image(shapes_prepared.images_dir / names[0])  # 96x96
    assert image.shape == (96, 96, 3)
    batch = preprocess([image], spec)
    from captioner.data.images import resize

    expected = (resize(image, 224).astype(np.float32) - 127.0) / 128.0
    np.testing.assert_allclose(batch[0], expected.transpose(2, 0, 1), rtol=0, atol=1e-6)


# ---- ONNX Runtime vs PyTorch ---------------------------------------------------------------
def test_ort_matches_torch(shapes_prepared, names, ort_extractor, torch_extractor):
    images = [load_image(shapes_prepared.images_dir / n) for n in names[:2]]
    batch = preprocess(images, ort_extractor.spec)
    ort_out = ort_extractor(batch)
    torch_out = torch_extractor(batch)
    assert ort_out.shape == torch_out.shape == (2, 49, 1280)
    assert ort_out.dtype == np.float32 and torch_out.dtype == np.float32
    magnitude = float(np.abs(torch_out).max())
    assert magnitude > 0.1  # real activations, not zeros
    max_diff = float(np.abs(ort_out - torch_out).max())
    assert max_diff <= 1e-3 * max(1.0, magnitude), (max_diff, magnitude)
    # the images differ, so do their features
    assert np.abs(ort_out[0] - ort_out[1]).max() > 1e-2


def test_export_encoder_reuses_the_file(ort_extractor, monkeypatch):
    path = export_encoder(ENCODER)
    assert path.is_file() and path.suffix == ".onnx"
    assert str(onnx_module.cache_root()) in str(path)

    def boom(name):
        raise AssertionError("re-exported an existing ONNX file")

    monkeypatch.setattr(onnx_module, "build_encoder", boom)
    assert export_encoder(ENCODER) == path


# ---- the cache -------------------------------------------------------------------------------
def test_extract_writes_shards_and_complete_manifest(
    images_dir, names, tmp_path, ort_extractor, reference
):
    cache = tmp_path / "cache"
    counting = Counting(ort_extractor)
    assert extract(images_dir, names, cache, counting) == cache
    assert counting.calls == 3 and counting.images == 6
    shards = sorted(p.name for p in cache.glob("shard_*.safetensors"))
    assert shards == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "shard_00002.safetensors",
    ]
    saved = manifest(cache)
    assert saved["complete"] is True
    assert saved["shards"] == {"00000": 2, "00001": 2, "00002": 2}
    assert saved["dataset"] == {"fingerprint": dataset_fingerprint(images_dir, names), "count": 6}
    assert saved["encoder"] == ort_extractor.spec.to_json()
    assert saved["view"] == 0 and saved["augment"] is None
    assert saved["dtype"] == "float16" and saved["shard_size"] == 2
    with safe_open(str(cache / "shard_00001.safetensors"), framework="numpy") as handle:
        assert json.loads(handle.metadata()["images"]) == names[2:4]
        assert handle.get_tensor("features").dtype == np.float16
    assert not list(cache.glob("*.tmp"))

    loaded_names, features = load_cache(cache)
    assert loaded_names == names
    assert features.dtype == torch.float16
    assert tuple(features.shape) == (6, 49, 1280)
    np.testing.assert_allclose(features.float().numpy(), reference, rtol=2e-3, atol=2e-3)


def test_second_call_does_not_reextract(images_dir, names, tmp_path, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names, cache, ort_extractor)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.calls == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


def test_interrupted_extraction_resumes(images_dir, names, tmp_path, ort_extractor, reference):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        extract(images_dir, names, cache, Counting(ort_extractor, fail_after=1))
    saved = manifest(cache)
    assert saved["complete"] is False
    assert saved["shards"] == {"00000": 2}
    assert [p.name for p in cache.glob("shard_*")] == ["shard_00000.safetensors"]
    with pytest.raises(CacheError, match="incomplete"):
        load_cache(cache)
    first_shard = (cache / "shard_00000.safetensors").stat().st_mtime_ns

    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.calls == 2 and counting.images == 4  # only the two missing shards
    assert (cache / "shard_00000.safetensors").stat().st_mtime_ns == first_shard
    assert manifest(cache)["complete"] is True
    loaded_names, features = load_cache(cache)
    assert loaded_names == names
    np.testing.assert_allclose(features.float().numpy(), reference, rtol=2e-3, atol=2e-3)


def test_deleted_shard_is_reextracted(images_dir, names, tmp_path, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names, cache, ort_extractor)
    (cache / "shard_00001.safetensors").unlink()
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.calls == 1 and counting.images == 2
    assert load_cache(cache)[0] == names


def test_stale_cache_rebuilt_when_an_image_changes(
    images_dir, names, tmp_path, ort_extractor, capsys
):
    names = names[:4]
    cache = tmp_path / "cache"
    extract(images_dir, names, cache, ort_extractor)
    _, before = load_cache(cache)
    old_fingerprint = manifest(cache)["dataset"]["fingerprint"]
    # replace one image by another one (different size on disk, different pixels)
    changed = images_dir / names[3]
    shutil.copy(images_dir / names[0], changed)
    assert dataset_fingerprint(images_dir, names) != old_fingerprint
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.calls == 2  # everything, not just the changed shard
    assert "stale" in capsys.readouterr().out
    assert manifest(cache)["dataset"]["fingerprint"] == dataset_fingerprint(images_dir, names)
    loaded_names, after = load_cache(cache)
    assert loaded_names == names
    torch.testing.assert_close(after[3], after[0])  # now the same picture
    assert (after[3].float() - before[3].float()).abs().max() > 1e-2
    torch.testing.assert_close(after[1], before[1], atol=2e-3, rtol=2e-3)


def test_stale_cache_rebuilt_when_names_change(images_dir, names, tmp_path, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names[:4], cache, ort_extractor)
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.calls == 3
    assert load_cache(cache)[0] == names


def test_stale_cache_rebuilt_when_shard_size_changes(images_dir, names, tmp_path, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names[:4], cache, ort_extractor)
    counting = Counting(ort_extractor)
    extract(images_dir, names[:4], cache, counting, shard_size=4)
    assert counting.calls == 2  # one shard of 4, two batches of 2
    assert sorted(p.name for p in cache.glob("shard_*")) == ["shard_00000.safetensors"]
    assert manifest(cache)["shards"] == {"00000": 4}


def test_corrupt_manifest_is_rebuilt(images_dir, names, tmp_path, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names[:2], cache, ort_extractor)
    (cache / MANIFEST).write_text("{broken")
    counting = Counting(ort_extractor)
    extract(images_dir, names[:2], cache, counting)
    assert counting.calls == 1
    assert manifest(cache)["complete"] is True


def test_damaged_shard_is_reported(images_dir, names, tmp_path, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names[:4], cache, ort_extractor)
    shard = cache / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="unreadable") as info:
        load_cache(cache)
    assert str(shard) in str(info.value)


def test_load_cache_errors(tmp_path, images_dir, names, ort_extractor):
    with pytest.raises(CacheError, match="no feature cache"):
        load_cache(tmp_path / "nothing")
    cache = tmp_path / "cache"
    extract(images_dir, names[:2], cache, ort_extractor)
    saved = manifest(cache)
    saved["dataset"]["count"] = 3
    (cache / MANIFEST).write_text(json.dumps(saved))
    with pytest.raises(CacheError, match="has 2 images, manifest says 3"):
        load_cache(cache)


def test_damaged_manifest_is_a_cache_error(tmp_path, images_dir, names, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names[:2], cache, ort_extractor)
    (cache / MANIFEST).write_text('{"complete": tr')
    with pytest.raises(CacheError):
        load_cache(cache)


def test_empty_name_list_gives_complete_empty_cache(tmp_path, images_dir, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, [], cache, ort_extractor)
    assert manifest(cache)["complete"] is True
    loaded_names, features = load_cache(cache)
    assert loaded_names == [] and features.numel() == 0


def _same_size_copies(images_dir: Path, names: list[str]) -> None:
    """Re-save the images as uncompressed PNGs: same dimensions give the same byte size, so an
    in-place edit of one by another's pixels keeps the size."""
    from PIL import Image

    for name in names:
        Image.open(images_dir / name).convert("RGB").save(images_dir / name, compress_level=0)


def test_image_edited_in_place_with_same_size_and_mtime_is_noticed(
    images_dir, names, tmp_path, ort_extractor, capsys
):
    import os

    from PIL import Image

    names = names[:2]
    _same_size_copies(images_dir, names)
    cache = tmp_path / "cache"
    extract(images_dir, names, cache, ort_extractor)
    _, before = load_cache(cache)
    edited = images_dir / names[0]
    size, stat = edited.stat().st_size, edited.stat()
    Image.open(images_dir / names[1]).convert("RGB").save(edited, compress_level=0)
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or rsync -t would
    assert edited.stat().st_size == size and edited.stat().st_mtime_ns == stat.st_mtime_ns
    assert not is_current(cache, images_dir, names, ort_extractor.spec, shard_size=2)
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.images == 2 and "stale" in capsys.readouterr().out
    _, after = load_cache(cache)
    torch.testing.assert_close(after[0], after[1])  # the edited image is now the other picture
    assert (after[0].float() - before[0].float()).abs().max() > 1e-2


def test_missing_image_is_named_and_leaves_the_cache_alone(
    images_dir, names, tmp_path, ort_extractor
):
    cache = tmp_path / "cache"
    extract(images_dir, names, cache, ort_extractor)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    kept = tmp_path / "kept.png"
    shutil.move(images_dir / names[2], kept)
    (images_dir / names[4]).unlink()
    counting = Counting(ort_extractor)
    with pytest.raises(CacheError, match="2 of 6 images are missing") as info:
        extract(images_dir, names, cache, counting)
    assert names[2] in str(info.value) and names[4] in str(info.value)
    assert counting.calls == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps  # nothing touched
    assert not is_current(cache, images_dir, names, ort_extractor.spec, shard_size=2)
    # once they are back (the same bytes), the cache is current again: nothing to extract
    shutil.move(kept, images_dir / names[2])
    shutil.copy(images_dir / names[0], images_dir / names[4])  # this one comes back changed
    extract(images_dir, names, cache, counting)
    assert counting.images == 6  # changed content: rebuilt (after the check, not before)


def _as_format1(cache: Path, images_dir: Path, names: list[str]) -> None:
    """Rewrite a cache's manifest as the previous format wrote it (names and sizes only)."""
    import hashlib

    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{(images_dir / name).stat().st_size}\n".encode())
    saved = manifest(cache)
    saved["format"] = 1
    saved["dataset"]["fingerprint"] = digest.hexdigest()
    (cache / MANIFEST).write_text(json.dumps(saved))


def test_format1_cache_is_upgraded_in_place_when_its_shards_postdate_the_images(
    images_dir, names, tmp_path, ort_extractor, capsys
):
    import os

    cache = tmp_path / "cache"
    for name in names:  # images older than the cache, as when it was built from them
        os.utime(images_dir / name, ns=(1_000_000_000_000_000_000,) * 2)
    extract(images_dir, names, cache, ort_extractor)
    _, before = load_cache(cache)
    _as_format1(cache, images_dir, names)
    assert not is_current(cache, images_dir, names, ort_extractor.spec, shard_size=2)
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.calls == 0  # verified, not re-extracted
    assert "upgraded in place" in capsys.readouterr().out
    assert manifest(cache)["format"] == 2 and manifest(cache)["complete"] is True
    assert is_current(cache, images_dir, names, ort_extractor.spec, shard_size=2)
    torch.testing.assert_close(load_cache(cache)[1], before, rtol=0, atol=0)


def test_format1_cache_reextracts_the_shards_of_images_changed_after_them(
    images_dir, names, tmp_path, ort_extractor, capsys
):
    import os

    from PIL import Image

    names = names[:4]
    _same_size_copies(images_dir, names)
    for name in names:
        os.utime(images_dir / name, ns=(1_000_000_000_000_000_000,) * 2)
    cache = tmp_path / "cache"
    extract(images_dir, names, cache, ort_extractor)
    _as_format1(cache, images_dir, names)
    # edited in place after the old cache was built: same size, so format 1 missed it
    Image.open(images_dir / names[0]).convert("RGB").save(images_dir / names[3], compress_level=0)
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)
    assert counting.images == 2  # the shard holding names[3], not the other one
    assert "extracting 1 again" in capsys.readouterr().out
    _, after = load_cache(cache)
    torch.testing.assert_close(after[3], after[0])
    assert is_current(cache, images_dir, names, ort_extractor.spec, shard_size=2)


def test_format1_cache_of_other_images_is_rebuilt(images_dir, names, tmp_path, ort_extractor):
    cache = tmp_path / "cache"
    extract(images_dir, names[:4], cache, ort_extractor)
    _as_format1(cache, images_dir, names[:4])
    counting = Counting(ort_extractor)
    extract(images_dir, names, cache, counting)  # other names: stale, rebuilt
    assert counting.images == 6 and manifest(cache)["format"] == 2


# ---- augmented views -----------------------------------------------------------------------
def test_view_seed_and_cache_dir():
    seeds = {view_seed(n, v, s) for n in ("a.png", "b.png") for v in (1, 2) for s in (0, 1)}
    assert len(seeds) == 8
    assert view_seed("a.png", 1, 0) == view_seed("a.png", 1, 0)
    assert all(0 <= s < 2**31 for s in seeds)
    assert cache_dir_for(Path("root"), ENCODER, 224, 3) == Path("root", f"{ENCODER}-224", "view3")
    default = {"seed": 0, "strength": "medium"}
    assert cache_dir_for(Path("r"), ENCODER, 224, 1, default).name == "view1"
    other = cache_dir_for(Path("r"), ENCODER, 224, 1, {"seed": 3, "strength": "strong"})
    assert other.name == "view1-strong-seed3"  # never the default run's folder


def test_augmented_view_differs_and_is_deterministic(
    images_dir, names, tmp_path, ort_extractor, reference
):
    subset = names[:3]
    plain = torch.from_numpy(reference[:3])
    a = extract(images_dir, subset, tmp_path / "v1a", ort_extractor, view=1, augment=AUGMENT)
    b = extract(images_dir, subset, tmp_path / "v1b", ort_extractor, view=1, augment=AUGMENT)
    saved = manifest(a)
    assert saved["view"] == 1 and saved["augment"] == AUGMENT
    names_a, feats_a = load_cache(a)
    names_b, feats_b = load_cache(b)
    assert names_a == names_b == subset
    torch.testing.assert_close(feats_a, feats_b, rtol=0, atol=0)
    per_image = (feats_a.float() - plain).abs().flatten(1).max(dim=1).values
    assert bool((per_image > 1e-2).all()), per_image


def test_augment_settings_change_rebuilds(images_dir, names, tmp_path, ort_extractor):
    subset = names[:2]
    cache = tmp_path / "v1"
    extract(images_dir, subset, cache, ort_extractor, view=1, augment=AUGMENT)
    _, before = load_cache(cache)
    counting = Counting(ort_extractor)
    extract(images_dir, subset, cache, counting, view=1, augment=AUGMENT)
    assert counting.calls == 0
    other = {"seed": 1, "strength": "medium"}
    extract(images_dir, subset, cache, counting, view=1, augment=other)
    assert counting.calls == 1
    assert manifest(cache)["augment"] == other
    _, after = load_cache(cache)
    assert (after.float() - before.float()).abs().max() > 1e-2


def test_augmented_view_needs_settings(images_dir, names, tmp_path, ort_extractor):
    with pytest.raises(CacheError, match="augment settings"):
        extract(images_dir, names[:2], tmp_path / "v1", ort_extractor, view=1, augment=None)
    assert not (tmp_path / "v1").exists()


# ---- ensure_features -------------------------------------------------------------------------
@pytest.fixture
def small_prepared(shapes_prepared, tmp_path) -> PreparedData:
    """A prepared dataset of 6 images (4 train, 1 val, 1 test) with its own work dir."""
    s = shapes_prepared.splits
    splits = Splits(SplitSettings("random", 0.2, 0.2, 0), s.train[:4], s.val[:1], s.test[:1])
    keep = splits.train + splits.val + splits.test
    return PreparedData(
        tmp_path / "work",
        shapes_prepared.images_dir,
        {n: shapes_prepared.captions[n] for n in keep},
        splits,
        shapes_prepared.vocab,
    )


def test_ensure_features(small_prepared, ort_extractor, monkeypatch):
    made: list[Counting] = []

    def factory(name, backend="auto", threads=None):
        assert name == ENCODER
        made.append(Counting(ort_extractor))
        return made[-1]

    monkeypatch.setattr(pipeline, "FeatureExtractor", factory)
    dirs = ensure_features(small_prepared, augment_views=1, batch_size=4, progress=False)
    root = small_prepared.work_dir / "features" / f"{ENCODER}-224"
    assert dirs == {0: root / "view0", 1: root / "view1"}
    assert len(made) == 1  # one extractor serves every view
    assert made[0].images == 6 + 4  # view 0: every split; view 1: the training images only
    features = load_features(dirs)
    s = small_prepared.splits
    assert features[0][0] == s.train + s.val + s.test
    assert features[1][0] == s.train
    assert tuple(features[0][1].shape) == (6, 49, 1280)
    assert tuple(features[1][1].shape) == (4, 49, 1280)
    assert manifest(dirs[1])["augment"] == {"seed": 0, "strength": "medium"}

    # current caches: the encoder is not even built
    def refuse(*args, **kwargs):
        raise AssertionError("built an extractor although every cache is current")

    monkeypatch.setattr(pipeline, "FeatureExtractor", refuse)
    assert ensure_features(small_prepared, augment_views=1, progress=False) == dirs

    # another augmentation seed gets its own view 1 folder; view 0 and the seed-0 view 1 stay
    monkeypatch.setattr(pipeline, "FeatureExtractor", factory)
    seeded = ensure_features(
        small_prepared, augment_views=1, augment_seed=5, batch_size=4, progress=False
    )
    assert seeded == {0: root / "view0", 1: root / "view1-medium-seed5"}
    assert len(made) == 2 and made[1].images == 4
    assert manifest(seeded[1])["augment"] == {"seed": 5, "strength": "medium"}
    assert manifest(dirs[1])["augment"] == {"seed": 0, "strength": "medium"}  # not overwritten

    # a cache made by an older encoder revision (same name and size) is stale, not current
    old = manifest(dirs[0])
    old["encoder"] = {**old["encoder"], "revision": 1}
    (dirs[0] / "manifest.json").write_text(json.dumps(old))
    ensure_features(small_prepared, augment_views=1, augment_seed=5, batch_size=4, progress=False)
    assert len(made) == 3 and made[2].images == 6  # view 0 re-extracted, view 1 still current
    assert manifest(dirs[0])["encoder"]["revision"] == 2


def test_ensure_features_resumes_incomplete_cache(small_prepared, ort_extractor, monkeypatch):
    counting = Counting(ort_extractor)
    monkeypatch.setattr(pipeline, "FeatureExtractor", lambda *a, **k: counting)
    monkeypatch.setattr(
        pipeline, "extract_to_cache", lambda *a, **k: extract_to_cache(*a, **{**k, "shard_size": 2})
    )
    dirs = ensure_features(small_prepared, batch_size=2, progress=False)
    assert counting.images == 6 and set(dirs) == {0}
    # what a process killed after the first two shards leaves behind
    saved = manifest(dirs[0])
    assert saved["shards"] == {"00000": 2, "00001": 2, "00002": 2}
    saved["shards"] = {"00000": 2, "00001": 2}
    saved["complete"] = False
    (dirs[0] / MANIFEST).write_text(json.dumps(saved))
    (dirs[0] / "shard_00002.safetensors").unlink()
    with pytest.raises(CacheError, match="incomplete"):
        load_cache(dirs[0])
    ensure_features(small_prepared, batch_size=2, progress=False)
    assert counting.images == 6 + 2  # only the missing shard
    assert manifest(dirs[0])["complete"] is True
    s = small_prepared.splits
    assert load_cache(dirs[0])[0] == s.train + s.val + s.test
