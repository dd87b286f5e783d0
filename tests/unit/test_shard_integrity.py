"""Feature shards are verified: a shard cut short, emptied or edited in place is found (its size
by every caller, its SHA-256 by `captioner features`) and only that shard is extracted again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import captioner.features.pipeline as pipeline
from captioner.data.prepare import PreparedData
from captioner.data.splits import Splits, SplitSettings
from captioner.features.cache import MANIFEST, extract_to_cache, is_current, load_cache
from captioner.features.encoders import get_spec
from captioner.features.onnx import FeatureExtractor
from captioner.features.pipeline import ensure_features
from captioner.features.shard_integrity import FILES

ENCODER = "efficientnet-lite0"


class Counting:
    def __init__(self, inner: FeatureExtractor):
        self.inner, self.spec, self.backend = inner, inner.spec, inner.backend
        self.images = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.images += batch.shape[0]
        return self.inner(batch)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(ENCODER, backend="onnx", threads=1)


@pytest.fixture
def setup(tmp_path, shapes_prepared, extractor):
    """Six images extracted into three shards of two; returns (images, names, cache dir)."""
    names = sorted(shapes_prepared.captions)[:6]
    images = tmp_path / "images"
    images.mkdir()
    for name in names:
        shutil.copy(shapes_prepared.images_dir / name, images / name)
    cache = tmp_path / "cache"
    _extract(images, names, cache, extractor)
    return images, names, cache


def _extract(images, names, cache, extractor):
    return extract_to_cache(
        images, names, cache, extractor, batch_size=2, shard_size=2, progress=False
    )


def _current(images, names, cache, verify):
    spec = get_spec(ENCODER)
    return is_current(cache, images, names, spec, shard_size=2, verify=verify)


def _manifest(cache: Path) -> dict:
    return json.loads((cache / MANIFEST).read_text())


def test_a_new_cache_records_every_shards_size_and_hash(setup):
    _, _, cache = setup
    records = _manifest(cache)[FILES]
    assert sorted(records) == ["00000", "00001", "00002"]
    for key, record in records.items():
        assert record["bytes"] == (cache / f"shard_{key}.safetensors").stat().st_size
        assert len(record["sha256"]) == 64


@pytest.mark.parametrize("keep", [1 / 3, 0.0])
def test_a_cut_shard_is_found_by_size_and_only_it_is_extracted_again(setup, extractor, keep):
    images, names, cache = setup
    shard = cache / "shard_00001.safetensors"
    before = load_cache(cache)[1]
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * keep)])
    assert not _current(images, names, cache, verify=False)  # train's cheap check sees it
    counting = Counting(extractor)
    _extract(images, names, cache, counting)
    assert counting.images == 2  # that shard alone
    assert _current(images, names, cache, verify=True)
    np.testing.assert_array_equal(load_cache(cache)[1].numpy(), before.numpy())


def test_a_shard_edited_in_place_is_found_by_its_hash(setup, extractor):
    images, names, cache = setup
    shard = cache / "shard_00002.safetensors"
    with safe_open(str(shard), framework="numpy") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    tensors["features"][0] = np.nan  # same size: only the content hash can tell
    save_file(tensors, str(shard), metadata=metadata)
    assert _current(images, names, cache, verify=False)
    assert not _current(images, names, cache, verify=True)
    counting = Counting(extractor)
    _extract(images, names, cache, counting)
    assert counting.images == 2
    assert np.isfinite(load_cache(cache)[1].float().numpy()).all()


def test_a_cache_without_records_is_adopted_not_rebuilt(setup, extractor):
    images, names, cache = setup
    saved = _manifest(cache)
    del saved[FILES]
    (cache / MANIFEST).write_text(json.dumps(saved))
    assert _current(images, names, cache, verify=False)  # old caches keep training
    assert not _current(images, names, cache, verify=True)
    counting = Counting(extractor)
    _extract(images, names, cache, counting)
    assert counting.images == 0
    assert sorted(_manifest(cache)[FILES]) == ["00000", "00001", "00002"]
    assert _current(images, names, cache, verify=True)


def test_ensure_features_with_verify_rebuilds_a_damaged_shard(
    shapes_prepared, tmp_path, extractor, monkeypatch
):
    s = shapes_prepared.splits
    splits = Splits(SplitSettings("random", 0.2, 0.2, 0), s.train[:4], s.val[:1], s.test[:1])
    keep = splits.train + splits.val + splits.test
    prepared = PreparedData(
        tmp_path / "work",
        shapes_prepared.images_dir,
        {n: shapes_prepared.captions[n] for n in keep},
        splits,
        shapes_prepared.vocab,
    )
    made: list[Counting] = []
    monkeypatch.setattr(
        pipeline, "FeatureExtractor", lambda *a, **k: made.append(Counting(extractor)) or made[-1]
    )
    monkeypatch.setattr(
        pipeline, "extract_to_cache", lambda *a, **k: extract_to_cache(*a, **{**k, "shard_size": 2})
    )
    monkeypatch.setattr(
        pipeline, "is_current", lambda *a, **k: is_current(*a, **{**k, "shard_size": 2})
    )
    dirs = ensure_features(prepared, batch_size=2, progress=False)
    shard = dirs[0] / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one byte of one grid
    shard.write_bytes(bytes(data))
    ensure_features(prepared, batch_size=2, progress=False)
    assert len(made) == 1  # train's size check trusts it: nothing extracted
    ensure_features(prepared, batch_size=2, progress=False, verify=True)
    assert len(made) == 2 and made[1].images == 2  # `features` hashes it: that shard again
    assert shard.read_bytes() != bytes(data)


def test_the_features_command_verifies(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from captioner.cli.main import app

    seen = {}

    def fake_ensure(data, encoder, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(pipeline, "ensure_features", fake_ensure)
    monkeypatch.setattr(PreparedData, "load", classmethod(lambda cls, work: object()))
    result = CliRunner().invoke(app, ["features", "--work-dir", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen.get("verify") is True


def test_no_extraction_bar_where_stderr_is_not_a_terminal(setup, extractor, capsys):
    images, names, _ = setup
    capsys.readouterr()
    extract_to_cache(images, names, images.parent / "fresh", extractor, progress=True)
    assert "img/s" not in capsys.readouterr().err  # logs and pipes get no bar noise
