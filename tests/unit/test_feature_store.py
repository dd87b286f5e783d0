"""Out-of-core training features: the same grids as the old in-RAM loader, read on demand;
damaged caches are clear errors; --device/--precision paths run on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from captioner.devices import autocast, dist_backend, grad_scaler, resolve_device, resolve_precision
from captioner.errors import CacheError, ConfigError, DataError
from captioner.features.cache import load_cache
from captioner.training.batching import image_batches
from captioner.training.feature_store import TrainingFeatures, open_cache

P, C = 4, 6  # a tiny grid


def write_cache(folder: Path, names: list[str], seed: int, shard_size: int = 3) -> np.ndarray:
    """A cache as features/cache.py writes it (fp16 shards + manifest); returns its grids."""
    folder.mkdir(parents=True)
    grids = np.random.default_rng(seed).standard_normal((len(names), P, C)).astype(np.float16)
    shards = {}
    for k, start in enumerate(range(0, len(names), shard_size)):
        part = names[start : start + shard_size]
        save_file(
            {"features": grids[start : start + shard_size]},
            str(folder / f"shard_{k:05d}.safetensors"),
            metadata={"images": json.dumps(part)},
        )
        shards[f"{k:05d}"] = len(part)
    manifest = {"complete": True, "shards": shards, "dataset": {"count": len(names)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return grids


@pytest.fixture
def caches(tmp_path):
    """View 0 over every image (train, dev and test interleaved), two augmented train views."""
    everything = [f"img{i}.jpg" for i in range(11)]
    train = ["img7.jpg", "img0.jpg", "img3.jpg", "img9.jpg", "img4.jpg", "img1.jpg", "img10.jpg"]
    val = ["img2.jpg", "img8.jpg", "img5.jpg"]
    dirs = {0: tmp_path / "view0", 1: tmp_path / "view1", 2: tmp_path / "view2"}
    write_cache(dirs[0], everything, seed=0, shard_size=4)
    write_cache(dirs[1], train, seed=1)
    write_cache(dirs[2], train, seed=2, shard_size=5)
    return dirs, train, val


def old_loader(dirs: dict[int, Path], train: list[str], val: list[str]):
    """What training/loop.py did before: every view in RAM, stacked, view 0 indexed by name."""
    views = {v: load_cache(d) for v, d in dirs.items()}
    names0, feats0 = views[0]
    row0 = {n: i for i, n in enumerate(names0)}
    train_views = [feats0[torch.tensor([row0[n] for n in train])]]
    train_views += [views[v][1] for v in sorted(dirs) if v > 0]
    return torch.stack(train_views), feats0[torch.tensor([row0[n] for n in val])]


def test_batches_are_the_old_loaders_grids_bit_for_bit(caches):
    dirs, train, val = caches
    old_train, old_val = old_loader(dirs, train, val)
    store = TrainingFeatures(dirs, train, val)
    for epoch in range(3):
        choice = store.view_choice(seed=5, epoch=epoch)
        generator = torch.Generator().manual_seed(5 * 7 + epoch)  # the old view_choice
        assert torch.equal(choice, torch.randint(0, 3, (len(train),), generator=generator))
        batches = image_batches(len(train), 3, seed=5, epoch=epoch)
        got = list(store.prefetch(choice, batches))
        assert [b for b, _ in got] == list(range(len(batches)))
        for (_, grids), images in zip(got, batches, strict=True):
            assert grids.dtype == torch.float16
            assert torch.equal(grids, old_train[choice[images], images])
    assert len(store.val) == 3
    assert torch.equal(store.val[0:2], old_val[0:2])
    assert torch.equal(store.val[1:], old_val[1:])


def test_prefetch_resumes_at_a_batch_inside_the_epoch(caches):
    dirs, train, val = caches
    store = TrainingFeatures(dirs, train, val)
    choice = store.view_choice(0, 0)
    batches = image_batches(len(train), 2, seed=0, epoch=0)
    whole = dict(store.prefetch(choice, batches))
    resumed = list(store.prefetch(choice, batches, start=2))
    assert [b for b, _ in resumed] == list(range(2, len(batches)))
    for b, grids in resumed:
        assert torch.equal(grids, whole[b])
    assert list(store.prefetch(choice, batches, start=len(batches))) == []


def test_features_are_not_loaded_into_memory(caches, monkeypatch):
    """The old loader read every shard whole (safetensors load_file); the store never does."""
    import captioner.features.cache as cache

    def refuse(*args, **kwargs):
        raise AssertionError("a whole shard was loaded into memory")

    monkeypatch.setattr(cache, "load_file", refuse)
    dirs, train, val = caches
    store = TrainingFeatures(dirs, train, val)
    assert store.batch(store.view_choice(0, 0), torch.tensor([0, 6])).shape == (2, P, C)
    assert store.reader.row_bytes == P * C * 2


def test_truncated_shard_is_a_clear_error(caches):
    dirs, train, val = caches
    shard = dirs[1] / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match="truncated"):
        TrainingFeatures(dirs, train, val)


def test_garbage_shard_and_incomplete_cache_are_clear_errors(caches):
    dirs, train, val = caches
    (dirs[2] / "shard_00000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00nonsense")
    with pytest.raises(CacheError, match="unreadable"):
        open_cache(dirs[2])
    manifest = json.loads((dirs[1] / "manifest.json").read_text())
    (dirs[1] / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(dirs[1])


def test_a_training_image_missing_from_a_view_is_a_clear_error(caches):
    dirs, train, val = caches
    with pytest.raises(DataError, match="view 0 has no grid for training image img99.jpg"):
        TrainingFeatures(dirs, [*train[:-1], "img99.jpg"], val)


# ---- devices --------------------------------------------------------------------------------


def test_device_resolution_and_precision_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None  # the CPU keeps fp32: same numbers as before
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert dist_backend(cpu) == "gloo" and dist_backend(torch.device("cuda", 0)) == "nccl"
    assert not grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert grad_scaler(cpu, torch.float16).is_enabled()
    with autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_cuda_device_selects_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="one process per GPU"):
        resolve_device("cuda")


def test_train_cli_with_an_absent_gpu_is_one_line_and_exit_code(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run(
        [sys.executable, "-m", "captioner", "train", "--device", "cuda"]
        + ["--work-dir", str(tmp_path / "w"), "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_device_extractor_matches_the_torch_encoder_on_the_cpu():
    """`features --device cuda` runs this extractor; on the CPU it must equal the torch path."""
    from captioner.features.gpu_encoder import DeviceExtractor
    from captioner.features.onnx import FeatureExtractor

    gpu_path = DeviceExtractor("efficientnet-lite0", torch.device("cpu"))
    reference = FeatureExtractor("efficientnet-lite0", backend="torch")
    size = gpu_path.spec.image_size
    batch = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    grid = gpu_path(batch)
    assert grid.shape == (2, gpu_path.spec.num_pixels, gpu_path.spec.channels)
    np.testing.assert_allclose(grid, reference(batch), rtol=0, atol=1e-5)
    grid2, logits = gpu_path.with_concepts(batch)
    assert logits.shape == (2, 1000) and np.array_equal(grid2, grid)
