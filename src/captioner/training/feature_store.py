"""Out-of-core training features: rows of the sharded safetensors cache read on demand.

The old loader read every cached grid into RAM and then copied it (a stack of the views and an
index copy of view 0), about twice the cache's size: ~5 GB for Flickr8k with two augmented
views, ~85 GB for COCO with three. Here only an index is kept in memory (which shard file and
row holds each image of each view: a few bytes per image), and a batch's grids are read with
``os.pread`` straight from the shard files when it is needed, one batch ahead in a background
thread. Each shard's tensor is parsed from the safetensors header (8-byte length, JSON with
dtype, shape and data offsets), so a row is one contiguous read at a known offset.

Why ``pread`` rather than a memory map: pages of a mapped file that were touched count in the
process's resident memory until the kernel reclaims them, so a memory-mapped epoch over a 36 GB
cache shows RSS growing towards the cache size; ``pread`` goes through the page cache, which is
shared and reclaimable and never counts as the process's own. Resident memory is then bounded by
the model, a couple of batches and the index, independent of the dataset's size.

Values are the very fp16 bytes the old loader held, so training on them gives identical numbers.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captioner.errors import CacheError, DataError
from captioner.features.cache import complete_manifest

_DTYPES = {"F16": np.float16, "F32": np.float32}
PREFETCH_BATCHES = 4  # batches read ahead, each by its own thread
_MAX_OPEN_FILES = 64  # open shard descriptors kept (COCO x 3 views is ~660 shards)


@dataclass(frozen=True)
class Shard:
    path: Path
    names: list[str]
    data_start: int  # byte offset of row 0 in the file
    row_shape: tuple[int, ...]  # (P, C)
    dtype: np.dtype


def read_shard_header(path: Path) -> Shard:
    """The image names and the position of the ``features`` tensor in one shard file."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        info = header["features"]
        names = json.loads(header["__metadata__"]["images"])
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
    except Exception as exc:  # noqa: BLE001 - a damaged shard is reported, not used
        raise CacheError(
            f"feature shard {path} is unreadable ({exc!r}); delete it and rerun "
            "`captioner features` to rebuild it"
        ) from exc
    row_shape = shape[1:]
    row_bytes = int(np.prod(row_shape)) * dtype.itemsize
    if len(shape) != 3 or shape[0] != len(names) or end - start != shape[0] * row_bytes:
        raise CacheError(
            f"feature shard {path} holds a tensor of shape {shape} for {len(names)} images; "
            "delete it and rerun `captioner features` to rebuild it"
        )
    if path.stat().st_size < 8 + length + end:
        raise CacheError(f"feature shard {path} is truncated; rerun `captioner features`")
    return Shard(path, names, 8 + length + start, row_shape, dtype)


def open_cache(cache_dir: Path) -> list[Shard]:
    """The shards of a complete cache, in order (the checks of ``load_cache``, without reading
    the features)."""
    cache_dir = Path(cache_dir)
    manifest = complete_manifest(cache_dir)
    shards = [
        read_shard_header(cache_dir / f"shard_{key}.safetensors")
        for key in sorted(manifest["shards"])
    ]
    count = sum(len(s.names) for s in shards)
    if count != manifest["dataset"]["count"]:
        raise CacheError(
            f"feature cache {cache_dir} has {count} images, manifest says "
            f"{manifest['dataset']['count']}"
        )
    return shards


class ShardReader:
    """Reads rows from many shard files; open descriptors are kept in a small LRU."""

    def __init__(self, shards: list[Shard]):
        if not shards:
            raise DataError("no feature shards to read")
        self.shards = shards
        self.row_shape, self.dtype = shards[0].row_shape, shards[0].dtype
        for shard in shards:
            if (shard.row_shape, shard.dtype) != (self.row_shape, self.dtype):
                raise CacheError(
                    f"feature shard {shard.path} holds {shard.dtype} rows of {shard.row_shape}, "
                    f"the others {self.dtype} rows of {self.row_shape}: rerun `captioner features`"
                )
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def _fd(self, shard: int) -> int:
        with self._lock:
            fd = self._fds.pop(shard, None)
            if fd is None:
                fd = os.open(self.shards[shard].path, os.O_RDONLY)
                while len(self._fds) >= _MAX_OPEN_FILES:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds[shard] = fd
            return fd

    def read(self, shard_ids: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """(n,) shard and row of each wanted grid -> (n, P, C) tensor in the cache's dtype."""
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)  # (n, row_bytes)
        for i in np.lexsort((rows, shard_ids)):  # file order: friendlier to the disk
            shard = int(shard_ids[i])
            offset = self.shards[shard].data_start + int(rows[i]) * self.row_bytes
            data = os.pread(self._fd(shard), self.row_bytes, offset)
            if len(data) != self.row_bytes:
                raise CacheError(f"feature shard {self.shards[shard].path} ended early")
            flat[i] = np.frombuffer(data, dtype=np.uint8)
        return torch.from_numpy(out)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # descriptors of a dropped reader
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class RowSet:
    """An ordered list of cached grids that reads like an (N, P, C) tensor: ``len`` and slices
    (what validation uses), plus ``gather`` for any rows."""

    def __init__(self, reader: ShardReader, shard_ids: np.ndarray, rows: np.ndarray):
        self.reader, self.shard_ids, self.rows = reader, shard_ids, rows

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        return self.reader.read(self.shard_ids[index], self.rows[index])

    def __getitem__(self, key: slice) -> torch.Tensor:
        if not isinstance(key, slice):
            raise TypeError("RowSet takes slices; use gather() for other rows")
        return self.gather(np.arange(len(self))[key])


def _locate(shards_by_view: list[list[Shard]]) -> dict[tuple[int, str], tuple[int, int]]:
    """(view, name) -> (index in the flat shard list, row in that shard)."""
    where, flat = {}, 0
    for view, shards in enumerate(shards_by_view):
        for shard in shards:
            for row, name in enumerate(shard.names):
                where[(view, name)] = (flat, row)
            flat += 1
    return where


class TrainingFeatures:
    """Cached encoder grids a run trains and validates on, read from disk batch by batch."""

    def __init__(self, cache_dirs: dict[int, Path], train_names: list[str], val_names: list[str]):
        views = [open_cache(cache_dirs[v]) for v in sorted(cache_dirs)]
        self.reader = ShardReader([s for shards in views for s in shards])
        where = _locate(views)
        self.num_views, self.num_train = len(views), len(train_names)
        train = np.zeros((self.num_views, len(train_names), 2), dtype=np.int64)  # (V, N, 2)
        for view in range(self.num_views):
            for i, name in enumerate(train_names):
                found = where.get((view, name))
                if found is None:
                    raise DataError(
                        f"feature view {view} has no grid for training image {name}: rerun "
                        "`captioner features`"
                    )
                train[view, i] = found
        self._train = train
        missing = [n for n in val_names if (0, n) not in where]
        if missing:
            raise DataError(f"feature view 0 lacks {len(missing)} dev images, e.g. {missing[0]}")
        val = np.array([where[(0, n)] for n in val_names], dtype=np.int64).reshape(-1, 2)
        self.val = RowSet(self.reader, val[:, 0], val[:, 1])  # (N_val, P, C) fp16 on demand
        self.val_names = list(val_names)

    def view_choice(self, seed: int, epoch: int) -> torch.Tensor:
        """(N_train,) which view of each training image an epoch uses (seeded by the epoch)."""
        generator = torch.Generator().manual_seed(seed * 7 + epoch)
        return torch.randint(0, self.num_views, (self.num_train,), generator=generator)

    def batch(self, view_choice: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """images (I,) training rows -> their grids (I, P, C) fp16, each in its epoch's view."""
        images_np = images.numpy()
        views = view_choice[images].numpy()
        where = self._train[views, images_np]  # (I, 2)
        return self.reader.read(where[:, 0], where[:, 1])

    def prefetch(
        self,
        view_choice: torch.Tensor,
        batches: list[torch.Tensor],
        start: int = 0,
        ahead: int = PREFETCH_BATCHES,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(b, grids of batch b) for b >= start, in order; the next ``ahead`` batches are read
        by as many threads while this one trains. A cache larger than RAM is read from disk at
        random, where one read at a time waits on the disk's latency: several in flight keep
        it busy (measured at 16x: 81 captions/s with one batch ahead)."""
        if start >= len(batches):
            return
        with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="features") as pool:
            pending = deque(
                pool.submit(self.batch, view_choice, batches[b])
                for b in range(start, min(start + ahead, len(batches)))
            )
            for b in range(start, len(batches)):
                feats = pending.popleft().result()
                if b + ahead < len(batches):
                    pending.append(pool.submit(self.batch, view_choice, batches[b + ahead]))
                yield b, feats
