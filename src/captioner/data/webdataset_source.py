"""WebDataset tar shards (img2dataset's output: ``KEY.jpg`` + ``KEY.txt`` [+ ``KEY.json``]).

``read_shards`` streams every shard once with the ``webdataset`` library (captions from
``.txt``, or ``caption``/``text`` in ``.json``; each image gets a cheap validity check), and
indexes where each image's bytes lie in its shard (tar member offsets, from the standard
``tarfile`` reader's headers). ``ShardSource`` then reads an image by name with one seek, so
the feature cache extracts straight from the shards without unpacking them.

Image names are ``<shard path relative to the data folder>/<member name>``
(``00000.tar/000000012.jpg``): unique across shards, and they say where the image is.
Shards must be uncompressed ``.tar`` (what img2dataset writes): a compressed member cannot be
read in place. A sample without an image or a caption, a corrupt image or an unreadable
member or shard is counted in ``CaptionSet.bad`` and left out; it never stops the run.
A member over ``MAX_MEMBER_BYTES`` is left out by its header's size before a byte of it is
read: a sparse 1.5 GB member of a 30 KB tar would otherwise be expanded in memory.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from captioner.data.caption_set import CaptionSet
from captioner.data.image_source import image_problem
from captioner.errors import DataError
from captioner.io import atomic_write_json, read_json

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_INDEX = "shards.json"  # in the work dir: shard paths and member offsets
# the largest member read from a shard: an uncompressed 64 MP RGBA image (the decoder's pixel
# limit) is 256 MB; anything larger cannot be an image we would decode
MAX_MEMBER_BYTES = 300_000_000


def find_shards(data_dir: Path) -> list[Path]:
    """The ``.tar`` shards under ``data_dir`` (recursively), in name order."""
    return sorted(p for p in Path(data_dir).rglob("*.tar") if p.is_file())


def _member_offsets(shard: Path) -> dict[str, tuple[int, int]]:
    """member name -> (byte offset of its data, size), for the complete members of a shard."""
    offsets: dict[str, tuple[int, int]] = {}
    total = shard.stat().st_size
    try:
        with tarfile.open(shard, mode="r:") as archive:
            while True:
                try:
                    member = archive.next()
                except tarfile.TarError:
                    break  # truncated or damaged past here: keep the members before it
                if member is None:
                    break
                if member.isreg() and member.offset_data + member.size <= total:
                    offsets[member.name] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError):
        return {}
    return offsets


def _caption_of(sample: dict) -> list[str]:
    texts: list = []
    if isinstance(sample.get("txt"), bytes):
        texts = sample["txt"].decode("utf-8", errors="replace").splitlines()
    elif isinstance(sample.get("json"), bytes):
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
        value = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        texts = value if isinstance(value, list) else [value]
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def _tar_files(
    stream: IO[bytes], url: str, too_large: Callable[[str], None], handler: Callable
) -> Iterator[dict]:
    """webdataset's tar_file_expander for one shard, with a size check before each member is
    read (``too_large(name)`` for those left out); ends with its end-of-shard marker ``{}``."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if not member.isreg() or member.name.startswith("__"):
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    too_large(member.name)
                    continue
                handle = archive.extractfile(member)
                yield {"fname": member.name, "data": handle.read(), "__url__": url}
                archive.members = []  # a streamed shard keeps no member list
    except (tarfile.TarError, OSError, EOFError) as exc:
        handler(exc)
    yield {}


def read_shards(shards: list[Path], root: Path) -> tuple[CaptionSet, dict]:
    """Captions of every good sample, and the index a ShardSource reads images with."""
    from webdataset.tariterators import group_by_keys

    root = Path(root)
    result = CaptionSet(OrderedDict(), source=str(root))
    index: dict = {"shards": [], "members": {}}
    for shard in shards:
        shard_name = shard.relative_to(root).as_posix()
        offsets = _member_offsets(shard)
        if not offsets:
            result.note_bad("unreadable shard", shard_name)
            continue
        shard_id = len(index["shards"])
        index["shards"].append(str(shard.resolve()))

        def count(exc: Exception, where: str = shard_name) -> bool:
            result.note_bad("corrupt member", where)
            return True  # go on with the next member (or shard)

        def too_large(member: str, where: str = shard_name) -> None:
            result.note_bad(f"over {MAX_MEMBER_BYTES // 1_000_000} MB", f"{where}/{member}")

        with open(shard, "rb") as stream:
            files = _tar_files(stream, shard_name, too_large, count)
            for sample in group_by_keys(files, handler=count):
                _add_sample(result, index, sample, shard_name, shard_id, offsets)
    return result, index


def _add_sample(
    result: CaptionSet, index: dict, sample: dict, shard_name: str, shard_id: int, offsets: dict
) -> None:
    key = sample["__key__"]
    where = f"{shard_name}/{key}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        result.note_bad("no image", where)
        return
    member = f"{key}.{ext}"
    if member not in offsets:
        # the suffix was lower-cased by webdataset; find the member as it is spelt
        member = next((m for m in offsets if m.lower() == member.lower()), member)
    if member not in offsets:
        result.note_bad("corrupt member", where)
        return
    problem = image_problem(sample[ext])
    if problem:
        result.note_bad(problem, where)
        return
    captions = _caption_of(sample)
    if not captions:
        result.note_bad("empty caption", where)
        return
    name = f"{shard_name}/{member}"
    result.captions[name] = captions
    index["members"][name] = [shard_id, *offsets[member]]


class ShardSource:
    """Images read in place from tar shards, by the names ``read_shards`` gave them."""

    def __init__(self, index: dict, index_path: Path | None = None) -> None:
        self.shards = [Path(p) for p in index["shards"]]
        self.members: dict[str, list[int]] = index["members"]
        self.index_path = index_path

    @classmethod
    def load(cls, work_dir: Path) -> ShardSource:
        path = Path(work_dir) / SHARD_INDEX
        if not path.is_file():
            raise DataError(f"{work_dir}: the shard index {SHARD_INDEX} is missing (prepare again)")
        return cls(read_json(path), path)

    def save(self, work_dir: Path) -> Path:
        path = Path(work_dir) / SHARD_INDEX
        index = {"shards": [str(p) for p in self.shards], "members": self.members}
        atomic_write_json(path, index)
        return path

    def exists(self, name: str) -> bool:
        entry = self.members.get(name)
        if entry is None:
            return False
        shard = self.shards[entry[0]]
        return shard.is_file() and shard.stat().st_size >= entry[1] + entry[2]

    def size(self, name: str) -> int:
        return self.members[name][2]

    def read(self, name: str) -> bytes:
        """The image's bytes, with one seek into its shard (OSError when it cannot be read)."""
        entry = self.members.get(name)
        if entry is None:
            raise FileNotFoundError(f"{name} is not in the shard index")
        shard_id, offset, size = entry
        with open(self.shards[shard_id], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise OSError(f"{self.shards[shard_id]}: truncated at {name}")
        return data

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.read(name)).hexdigest()

    def mtime_ns(self, name: str) -> int:
        return self.shards[self.members[name][0]].stat().st_mtime_ns

    def locate(self, name: str) -> bytes:
        return self.read(name)

    def describe(self) -> str:
        return f"{len(self.shards)} tar shards" + (
            f" (index {self.index_path})" if self.index_path else ""
        )
