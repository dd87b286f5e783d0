"""Which kind of dataset a folder holds, and reading it into captions + an image source.

Detection, in order (the first that matches wins):
    a caption file   captions.txt, Flickr8k.token.txt, dataset_*.json, captions_*.json
                     (images in a folder beside it: ``images/``, ``Images/``...)
    a manifest       *.jsonl, *.csv, *.tsv of (image path, caption); paths relative to the
                     manifest's folder (or absolute, or to an images folder beside it)
    tar shards       *.tar (WebDataset, read in place)
    sidecar folder   images with a NAME.txt of captions beside each, in any subfolder

``detect`` is cheap (it only looks at names and sizes), so prepare can tell whether a work dir
is already up to date before reading anything; ``read_layout`` does the reading, and counts
what it leaves out (missing or corrupt images, empty captions, bad rows) in ``CaptionSet.bad``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from captioner.data.captions import (
    MANIFEST_SUFFIXES,
    CaptionSet,
    find_caption_file_or_none,
    read_captions,
)
from captioner.data.image_source import FolderSource, ImageSource, image_problem
from captioner.data.manifests import read_sidecar_folder, sidecar_images
from captioner.data.webdataset_source import ShardSource, find_shards, read_shards
from captioner.errors import DataError

IMAGE_DIR_CANDIDATES = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", ".")
_PROBE = 50  # manifest names tried when choosing the folder they are relative to


@dataclass
class Layout:
    """A detected dataset: its format and where captions and images are."""

    format: str  # "captions" | "manifest" | "webdataset" | "sidecar"
    data_dir: Path
    images_dir: Path
    caption_file: Path | None = None
    shards: list[Path] = field(default_factory=list)
    derived: bool = False  # images_dir is chosen from the manifest's names while reading

    def info(self) -> dict:
        """What dataset.json records (the legacy caption-file layout keeps its old keys, so
        work dirs prepared before these formats existed stay valid)."""
        info = {
            "data_dir": str(self.data_dir.resolve()),
            "caption_file": str(self.caption_file.resolve()) if self.caption_file else "",
            "images_dir": str(self.images_dir),
        }
        if self.format != "captions":
            info["format"] = self.format
        if self.shards:
            digest = hashlib.sha256()
            for shard in self.shards:
                digest.update(f"{shard.resolve()}\0{shard.stat().st_size}\n".encode())
            info["shards"] = {"count": len(self.shards), "fingerprint": digest.hexdigest()}
        return info


def find_images_dir(data_dir: Path) -> Path:
    for candidate in IMAGE_DIR_CANDIDATES:
        folder = data_dir / candidate
        if folder.is_dir() and any(
            p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in folder.iterdir()
        ):
            return folder.resolve()
    raise DataError(
        f"{data_dir}: no image folder found (looked for {', '.join(IMAGE_DIR_CANDIDATES)})"
    )


def detect(
    data_dir: Path, caption_file: Path | None = None, images_dir: Path | None = None
) -> Layout:
    """The layout of ``data_dir`` (an explicit caption file or images folder overrides)."""
    caption_file = caption_file or find_caption_file_or_none(data_dir)
    if caption_file is not None:
        is_manifest = (
            caption_file.suffix.lower() in MANIFEST_SUFFIXES and caption_file.name != "captions.txt"
        )
        if is_manifest:
            if images_dir:
                return Layout("manifest", data_dir, images_dir.resolve(), caption_file)
            return Layout(
                "manifest", data_dir, caption_file.parent.resolve(), caption_file, derived=True
            )
        images = images_dir.resolve() if images_dir else find_images_dir(data_dir)
        return Layout("captions", data_dir, images, caption_file)
    if shards := find_shards(data_dir):
        return Layout("webdataset", data_dir, data_dir.resolve(), shards=shards)
    root = images_dir or data_dir
    if sidecar_images(root):
        return Layout("sidecar", data_dir, root.resolve())
    raise DataError(
        f"{data_dir}: no dataset found: no caption file (captions.txt, Flickr8k.token.txt, "
        "dataset_*.json, captions_*.json), no manifest (*.jsonl, *.csv, *.tsv), no WebDataset "
        "shards (*.tar) and no images with a sidecar .txt of captions"
    )


def read_layout(
    layout: Layout, reader: Callable[[Path], CaptionSet] = read_captions, check_images: bool = True
) -> tuple[CaptionSet, ImageSource]:
    """Captions of the images that are there (and, for the new formats, readable), and the
    source to read those images from. ``reader`` reads a caption file or manifest."""
    if layout.format == "webdataset":
        captions, index = read_shards(layout.shards, layout.data_dir)
        return captions, ShardSource(index)
    if layout.format == "sidecar":
        captions = read_sidecar_folder(layout.images_dir)
    else:
        captions = reader(layout.caption_file)
    if layout.derived:
        layout.images_dir = _manifest_root(layout, captions)
    source = FolderSource(layout.images_dir)
    if layout.format != "captions":
        captions = _keep_readable(captions, source, check_images)
    return captions, source


def _manifest_root(layout: Layout, captions: CaptionSet) -> Path:
    """The folder the manifest's relative paths resolve in: its own, else an images folder of
    the data dir (a Flickr-style ``image,caption`` CSV names bare files in ``images/``)."""
    probe = list(captions.captions)[:_PROBE]
    candidates = [layout.caption_file.parent.resolve(), layout.data_dir.resolve()]
    candidates += [(layout.data_dir / c).resolve() for c in IMAGE_DIR_CANDIDATES]
    hits = [sum((folder / name).is_file() for name in probe) for folder in candidates]
    return candidates[max(range(len(candidates)), key=lambda i: (hits[i], -i))]


def _keep_readable(captions: CaptionSet, source: FolderSource, check_images: bool) -> CaptionSet:
    """Leave out (and count) images that are missing or, with ``check_images``, corrupt."""
    kept = type(captions.captions)()
    for name, texts in captions.captions.items():
        if not source.exists(name):
            captions.note_bad("missing image", name)
            continue
        if check_images:
            try:
                problem = image_problem(source.path(name).read_bytes())
            except OSError:
                problem = "unreadable image"
            if problem:
                captions.note_bad(problem, name)
                continue
        kept[name] = texts
    captions.captions = kept
    return captions
