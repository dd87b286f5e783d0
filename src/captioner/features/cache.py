"""On-disk feature cache: extract once, reuse everywhere, never silently reuse a stale one.

One cache directory per (dataset, encoder, image size, view). View 0 is the plain image; view
k >= 1 is the k-th seeded augmentation of it. Features are written in shards of fp16 safetensors;
``manifest.json`` records what produced them and which shards are done, so an interrupted
extraction resumes at the first missing shard, and a cache made from other images, another
encoder or other augmentation settings is detected and rebuilt.

The images are fingerprinted by name, byte size and a SHA-256 of their whole content, so an
image edited in place (same size, even with its modification time put back) is noticed. A
whole-file hash is cheap next to decoding: 0.45 s for the 8,091 Flickr8k JPEGs (169 MB,
measured warm on an idle machine; 1.5 s on a busy one).
Modification times are deliberately left out of the fingerprint: they add nothing to a content
hash but would rebuild a cache whose images were merely copied or touched.

Caches of format 1 (fingerprint of names and sizes only) are upgraded in place, not rebuilt
silently: when names and sizes still match, every shard whose images all predate it (and whose
recorded image names are the expected ones) is kept, and only the other shards are re-extracted,
with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from captioner.data.image_source import ImageSource, as_image_source
from captioner.data.images import load_image
from captioner.errors import CacheError
from captioner.features.encoders import EncoderSpec, preprocess
from captioner.features.onnx import FeatureExtractor
from captioner.features.shard_integrity import (
    FILES,
    all_sound,
    file_record,
    shard_path,
    verify_shards,
)
from captioner.io import atomic_path, atomic_write_json, read_json
from captioner.progress import progress_bar as tqdm  # no bars when stderr is not a TTY

# ``images_dir`` below is a folder or any ImageSource (data/image_source.py: tar shards are read
# in place); a folder is wrapped in a FolderSource, so names resolve as ``images_dir / name``.
Images = Path | str | ImageSource

MANIFEST = "manifest.json"
SHARD_SIZE = 512  # images per safetensors shard: the unit of resumption
CACHE_FORMAT = 2  # 1: fingerprint of names and sizes only (upgraded in place, see above)
_SHOWN_MISSING = 10  # missing images named in the error message


def _content_hash(source: ImageSource, name: str) -> str:
    try:
        return source.sha256(name)
    except OSError as exc:
        raise CacheError(
            f"cannot read image {name} in {source.describe()} to fingerprint it: {exc}"
        ) from exc


def dataset_fingerprint(images_dir: Images, names: list[str]) -> str:
    """Names, byte sizes and content hashes of the images, in order: changes when any image is
    added, removed, renamed, reordered or edited (a missing one counts as size -1)."""
    digest = hashlib.sha256()
    source = as_image_source(images_dir)
    for name in names:
        if source.exists(name):
            size, content = source.size(name), _content_hash(source, name)
        else:
            size, content = -1, ""
        digest.update(f"{name}\0{size}\0{content}\n".encode())
    return digest.hexdigest()


def _legacy_fingerprint(images_dir: Images, names: list[str]) -> str:
    """Format 1's fingerprint: names and byte sizes only."""
    digest = hashlib.sha256()
    source = as_image_source(images_dir)
    for name in names:
        size = source.size(name) if source.exists(name) else -1
        digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()


def missing_images(images_dir: Images, names: list[str]) -> list[str]:
    source = as_image_source(images_dir)
    return [name for name in names if not source.exists(name)]


def _check_images_exist(images_dir: Images, names: list[str]) -> None:
    """Fail before touching the cache: a deleted image must not cost the features of the rest."""
    missing = missing_images(images_dir, names)
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING])
        more = f" and {len(missing) - _SHOWN_MISSING} more" if len(missing) > _SHOWN_MISSING else ""
        raise CacheError(
            f"{len(missing)} of {len(names)} images are missing from "
            f"{as_image_source(images_dir).describe()}: {shown}{more}. "
            "Restore them (the feature cache is left as it was), or prepare the data again "
            "without them"
        )


def view_seed(name: str, view: int, seed: int) -> int:
    return (zlib.crc32(name.encode()) + 1_000_003 * view + 7919 * seed) % (2**31)


def cache_dir_for(
    root: Path, encoder: str, image_size: int, view: int, augment: dict | None = None
) -> Path:
    """view0, and view1, view2... for the default augmentation (seed 0, medium); other seeds or
    strengths get their own folders (view1-strong-seed3), so trying one never overwrites another
    run's cache (and two runs with different seeds never write the same files)."""
    name = f"view{view}"
    if view and augment and (augment["seed"], augment["strength"]) != (0, "medium"):
        name += f"-{augment['strength']}-seed{augment['seed']}"
    return Path(root) / f"{encoder}-{image_size}" / name


def _expected_manifest(
    spec: EncoderSpec,
    fingerprint: str,
    count: int,
    view: int,
    augment: dict | None,
    shard_size: int,
) -> dict:
    return {
        "format": CACHE_FORMAT,
        "encoder": spec.to_json(),
        "view": view,
        "augment": augment if view > 0 else None,
        "dataset": {"fingerprint": fingerprint, "count": count},
        "dtype": "float16",
        "shard_size": shard_size,
    }


def is_current(
    cache_dir: Path,
    images_dir: Images,
    names: list[str],
    spec: EncoderSpec,
    *,
    view: int = 0,
    augment: dict | None = None,
    shard_size: int = SHARD_SIZE,
    verify: bool = False,
) -> bool:
    """Whether ``extract_to_cache`` would find nothing to do: the same manifest check, made
    without building an encoder (so a current cache costs no model load). Every shard must
    have its recorded size; ``verify`` also checks its SHA-256 (shard_integrity.py)."""
    manifest_path = Path(cache_dir) / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        saved = read_json(manifest_path)
    except ValueError:
        return False
    expected = _expected_manifest(
        spec, dataset_fingerprint(images_dir, names), len(names), view, augment, shard_size
    )
    return (
        {k: saved.get(k) for k in expected} == expected
        and saved.get("complete") is True
        and all_sound(Path(cache_dir), saved, full=verify)
    )


def _load_view(images_dir: Images, name: str, view: int, augment: dict | None) -> np.ndarray:
    located = as_image_source(images_dir).locate(name)  # a path, or bytes read from a shard
    image = load_image(located, name if isinstance(located, bytes) else None)
    if view > 0:
        from captioner.data.augment import augment_image

        image = augment_image(image, view_seed(name, view, augment["seed"]), augment["strength"])
    return image


def extract_to_cache(
    images_dir: Images,
    names: list[str],
    cache_dir: Path,
    extractor: FeatureExtractor,
    *,
    view: int = 0,
    augment: dict | None = None,
    batch_size: int = 16,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Extract features of ``names`` into ``cache_dir``, resuming or rebuilding as needed."""
    images_dir, cache_dir = as_image_source(images_dir), Path(cache_dir)
    if view > 0 and not augment:
        raise CacheError("augmented views need augment settings ({'seed', 'strength'})")
    _check_images_exist(images_dir, names)
    expected = _expected_manifest(
        extractor.spec,
        dataset_fingerprint(images_dir, names),
        len(names),
        view,
        augment,
        shard_size,
    )
    manifest_path = cache_dir / MANIFEST
    shards: dict[str, int] = {}
    records: dict[str, dict] = {}  # {key: {"bytes", "sha256"}} of each shard file
    saved_complete = False
    if manifest_path.is_file():
        try:
            saved = read_json(manifest_path)
        except json.JSONDecodeError:
            saved = {}
        if {k: saved.get(k) for k in expected} == expected:
            shards, records, damaged = verify_shards(cache_dir, saved, full=True)
            for key, why in damaged.items():
                print(
                    f"feature cache {cache_dir}: shard {key} is damaged ({why}); "
                    "extracting it again"
                )
                shard_path(cache_dir, key).unlink()
            if damaged:  # not complete until they are back
                atomic_write_json(
                    manifest_path, {**expected, "shards": shards, FILES: records, "complete": False}
                )
            saved_complete = saved.get("complete") is True and records == saved.get(FILES)
        elif (kept := _upgrade_legacy(cache_dir, saved, expected, images_dir, names)) is not None:
            shards = kept
            records = {key: file_record(shard_path(cache_dir, key)) for key in kept}
            atomic_write_json(
                manifest_path, {**expected, "shards": shards, FILES: records, "complete": False}
            )  # complete again below once nothing is left to do
        else:
            changed = [k for k in expected if saved.get(k) != expected[k]]
            print(f"feature cache {cache_dir} is stale ({', '.join(changed)} changed): rebuilding")
            shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    num_shards = (len(names) + shard_size - 1) // shard_size
    todo = [i for i in range(num_shards) if f"{i:05d}" not in shards]
    done_images = sum(shards.values())
    bar = tqdm(
        total=len(names),
        initial=done_images,
        unit="img",
        disable=not progress,
        desc=f"features {extractor.spec.name} view{view} ({extractor.backend})",
    )
    with ThreadPoolExecutor(max_workers=2) as pool:
        for shard in todo:
            shard_names = names[shard * shard_size : (shard + 1) * shard_size]
            outputs = []
            batches = [
                shard_names[i : i + batch_size] for i in range(0, len(shard_names), batch_size)
            ]
            # decode the next batch while the encoder runs on this one
            pending = pool.submit(_load_batch, images_dir, batches[0], view, augment, extractor)
            for b in range(len(batches)):
                batch = pending.result()
                if b + 1 < len(batches):
                    pending = pool.submit(
                        _load_batch, images_dir, batches[b + 1], view, augment, extractor
                    )
                outputs.append(extractor(batch).astype(np.float16))
                bar.update(len(batch))
            features = np.concatenate(outputs)  # (n, P, C)
            with atomic_path(cache_dir / f"shard_{shard:05d}.safetensors") as tmp:
                save_file(
                    {"features": features}, str(tmp), metadata={"images": json.dumps(shard_names)}
                )
            key = f"{shard:05d}"
            shards[key] = len(shard_names)
            records[key] = file_record(shard_path(cache_dir, key))
            complete = len(shards) == num_shards
            atomic_write_json(
                manifest_path, {**expected, "shards": shards, FILES: records, "complete": complete}
            )
    bar.close()
    if not todo and not saved_complete:  # all shards there (or zero images): mark complete
        atomic_write_json(
            manifest_path, {**expected, "shards": shards, FILES: records, "complete": True}
        )
    return cache_dir


def _upgrade_legacy(
    cache_dir: Path, saved: dict, expected: dict, images_dir: Images, names: list[str]
) -> dict[str, int] | None:
    """The shards of a format-1 cache that can be kept under the new fingerprint, or None when
    it is not a format-1 cache of these names and sizes (then it is rebuilt as stale). A shard
    is kept when it lists the expected images and none of them was modified after it was
    written; the others are deleted, to be extracted again."""
    legacy = {
        **expected,
        "format": 1,
        "dataset": {"fingerprint": _legacy_fingerprint(images_dir, names), "count": len(names)},
    }
    if {k: saved.get(k) for k in legacy} != legacy:
        return None
    shard_size, kept = expected["shard_size"], {}
    recorded = saved.get("shards", {})
    for key, count in recorded.items():
        path = cache_dir / f"shard_{key}.safetensors"
        start = int(key) * shard_size
        shard_names = names[start : start + shard_size]
        if (
            path.is_file()
            and count == len(shard_names)
            and _shard_predates(path, shard_names, images_dir)
        ):
            kept[key] = count
        elif path.is_file():
            path.unlink()
    redo = len(recorded) - len(kept)
    print(
        f"feature cache {cache_dir} has the old fingerprint (image names and sizes only): "
        f"upgraded in place to content hashes, keeping {len(kept)} verified shards"
        + (f" and extracting {redo} again (their images changed after extraction)" if redo else "")
    )
    return kept


def _shard_predates(path: Path, shard_names: list[str], images_dir: Images) -> bool:
    """Whether a shard holds ``shard_names`` and was written after each of them last changed."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            if json.loads(handle.metadata()["images"]) != shard_names:
                return False
    except Exception:  # noqa: BLE001 - an unreadable shard is extracted again
        return False
    written = path.stat().st_mtime_ns
    source = as_image_source(images_dir)
    return all(source.mtime_ns(n) < written for n in shard_names)


def _load_batch(images_dir, batch_names, view, augment, extractor) -> np.ndarray:
    images = [_load_view(images_dir, n, view, augment) for n in batch_names]
    return preprocess(images, extractor.spec)


def complete_manifest(cache_dir: Path) -> dict:
    """The manifest of a complete cache, or a CacheError that says how to get one (shared by
    this in-RAM loader and training's out-of-core feature store)."""
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(f"no feature cache at {cache_dir} (run `captioner features` first)")
    try:
        manifest = read_json(manifest_path)
    except ValueError as exc:
        raise CacheError(
            f"feature cache manifest {manifest_path} is unreadable ({exc}); rerun "
            "`captioner features` to rebuild it"
        ) from exc
    if not manifest.get("complete"):
        raise CacheError(
            f"feature cache {cache_dir} is incomplete: rerun `captioner features` to resume it"
        )
    return manifest


def load_cache(cache_dir: Path) -> tuple[list[str], torch.Tensor]:
    """All features of a complete cache: (names, fp16 tensor (N, P, C))."""
    cache_dir = Path(cache_dir)
    manifest = complete_manifest(cache_dir)
    names: list[str] = []
    parts = []
    for key in sorted(manifest["shards"]):
        path = cache_dir / f"shard_{key}.safetensors"
        try:
            with safe_open(str(path), framework="numpy") as handle:
                names.extend(json.loads(handle.metadata()["images"]))
            parts.append(load_file(str(path))["features"])
        except Exception as exc:  # noqa: BLE001 - a damaged shard is reported, not used
            raise CacheError(
                f"feature shard {path} is unreadable ({exc}); delete it and rerun "
                "`captioner features` to rebuild it"
            ) from exc
    if len(names) != manifest["dataset"]["count"]:
        raise CacheError(
            f"feature cache {cache_dir} has {len(names)} images, manifest says "
            f"{manifest['dataset']['count']}"
        )
    if not parts:
        return names, torch.zeros(0)
    return names, torch.from_numpy(np.concatenate(parts))
