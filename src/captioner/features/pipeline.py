"""`captioner features`: make sure every cache a training run needs exists and is complete."""

from __future__ import annotations

from pathlib import Path

import torch

from captioner.data.prepare import PreparedData
from captioner.features.cache import cache_dir_for, extract_to_cache, is_current, load_cache
from captioner.features.encoders import get_spec
from captioner.features.onnx import FeatureExtractor


def feature_root(prepared: PreparedData) -> Path:
    return prepared.work_dir / "features"


def split_images(prepared: PreparedData) -> list[str]:
    """View 0 covers every captioned image (split images first); augmented views only the
    training images."""
    s = prepared.splits
    in_splits = s.train + s.val + s.test
    seen = set(in_splits)
    return in_splits + [name for name in prepared.captions if name not in seen]


def ensure_features(
    prepared: PreparedData,
    encoder: str = "efficientnet-lite0",
    *,
    backend: str = "auto",
    augment_views: int = 0,
    augment_strength: str = "medium",
    augment_seed: int = 0,
    batch_size: int = 16,
    threads: int | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    verify: bool = False,
) -> dict[int, Path]:
    """Extract (or resume, or rebuild when stale) the caches; return {view: cache dir}.
    On a CUDA ``device`` the encoder runs there in PyTorch; on the CPU ``backend`` decides.
    Shards whose size differs from the manifest's record are extracted again; ``verify``
    (`captioner features`) also hashes every shard, so a shard edited in place is found too."""
    spec = get_spec(encoder)
    extractor = None  # built only when a cache needs extracting
    dirs = {}
    for view in range(augment_views + 1):
        names = split_images(prepared) if view == 0 else prepared.splits.train
        augment = {"seed": augment_seed, "strength": augment_strength} if view else None
        cache_dir = cache_dir_for(feature_root(prepared), encoder, spec.image_size, view, augment)
        current = is_current(
            cache_dir, prepared.image_source, names, spec, view=view, augment=augment, verify=verify
        )
        if extractor is None and not current:
            if device is not None and device.type == "cuda":
                from captioner.features.gpu_encoder import DeviceExtractor

                extractor = DeviceExtractor(encoder, device)
            else:
                extractor = FeatureExtractor(encoder, backend, threads)
        if extractor is not None:
            extract_to_cache(
                prepared.image_source,  # a folder, or tar shards read in place
                names,
                cache_dir,
                extractor,
                view=view,
                augment=augment,
                batch_size=batch_size,
                progress=progress,
            )
        dirs[view] = cache_dir
    return dirs


def load_features(cache_dirs: dict[int, Path]):
    """{view: (names, fp16 features)} for the given caches."""
    return {view: load_cache(path) for view, path in cache_dirs.items()}
