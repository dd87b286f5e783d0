"""Per-shard integrity of a feature cache: the byte size and SHA-256 of every shard file, written
into the manifest when the shard is made and checked before the shard is trusted.

A shard cut short, emptied or edited in place (one grid set to NaN) used to pass as long as the
file existed: `captioner features` found nothing to do and training failed on it every time.
`features` now hashes every shard (about 1 s per GB) and re-extracts only the damaged ones;
`train` checks the sizes only (free), which catches a cut file, and re-extracts those.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

FILES = "files"  # manifest key: {shard key: {"bytes": n, "sha256": hex}}
_CHUNK = 1 << 20


def shard_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"shard_{key}.safetensors"


def file_record(path: Path) -> dict:
    """What the manifest keeps of a shard file: its size and content hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _self_consistent(path: Path) -> bool:
    """For shards written before records were kept: the safetensors header parses and the file
    is exactly as long as the header says (a cut or emptied file is not)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        end = max(int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__")
        return path.stat().st_size == 8 + length + end
    except Exception:  # noqa: BLE001 - any unreadable header means a damaged shard
        return False


def shard_problem(cache_dir: Path, key: str, record: dict | None, full: bool) -> str | None:
    """Why shard ``key`` cannot be trusted, or None when it can. ``full``: hash the file;
    otherwise compare its size only. A shard without a record is checked for consistency."""
    path = shard_path(cache_dir, key)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if record is None:
        return None if _self_consistent(path) else f"inconsistent ({size} bytes)"
    if size != record.get("bytes"):
        return f"{size} bytes, {record.get('bytes')} when written"
    if full and file_record(path)["sha256"] != record.get("sha256"):
        return "its content changed since it was written (SHA-256 differs)"
    return None


def verify_shards(
    cache_dir: Path, manifest: dict, full: bool
) -> tuple[dict[str, int], dict[str, dict], dict[str, str]]:
    """(shards to keep {key: count}, their records, damaged {key: why}). Shards without a record
    that pass the consistency check get one now (old caches are adopted, not rebuilt)."""
    records = manifest.get(FILES) or {}
    kept, kept_records, damaged = {}, {}, {}
    for key, count in (manifest.get("shards") or {}).items():
        record = records.get(key)
        problem = shard_problem(cache_dir, key, record, full)
        if problem is None:
            kept[key] = count
            kept_records[key] = record or file_record(shard_path(cache_dir, key))
        elif problem != "missing":
            damaged[key] = problem
    return kept, kept_records, damaged


def all_sound(cache_dir: Path, manifest: dict, full: bool) -> bool:
    """Whether every shard of ``manifest`` passes the check. A shard without a record (a cache
    from before records were kept) passes the cheap check when consistent, never the full one:
    `features` then records it."""
    records = manifest.get(FILES) or {}
    shards = manifest.get("shards") or {}
    return all(
        (key in records or not full)
        and shard_problem(cache_dir, key, records.get(key), full) is None
        for key in shards
    )
