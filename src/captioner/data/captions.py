"""Caption file readers: Flickr8k CSV and token file, Karpathy JSON, COCO JSON, and (through
data/manifests.py) CSV/TSV/JSONL manifests of (image path, caption).

Every reader returns the same thing: an ordered mapping ``image file name -> captions``, plus the
dataset's own split assignment when the format carries one (Karpathy JSON does): a
``CaptionSet`` (``data/caption_set.py``, importable from here too).
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from pathlib import Path

from captioner.data.caption_set import SPLIT_NAMES, CaptionSet
from captioner.data.manifests import read_manifest
from captioner.errors import DataError

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")


def _add(captions: dict[str, list[str]], image: str, caption: str) -> None:
    caption = caption.strip()
    if image and caption:
        captions.setdefault(image, []).append(caption)


def read_flickr_csv(path: Path) -> CaptionSet:
    """Kaggle-style ``captions.txt``: header ``image,caption``, csv-quoted captions."""
    captions: dict[str, list[str]] = OrderedDict()
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise DataError(f"{path}: expected a header 'image,caption', found {header!r}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{line_no}: expected 'image,caption', found {row!r}")
            _add(captions, row[0].strip(), ",".join(row[1:]))
    return CaptionSet(captions, source=str(path))


def read_flickr_token(path: Path) -> CaptionSet:
    """Original ``Flickr8k.token.txt``: ``image.jpg#n<TAB>caption`` per line."""
    captions: dict[str, list[str]] = OrderedDict()
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, sep, caption = line.partition("\t")
            if not sep or "#" not in key:
                raise DataError(f"{path}:{line_no}: expected 'image#n<TAB>caption', found {line!r}")
            image = key.rsplit("#", 1)[0]
            # the original file has one malformed id ('x.jpg.1#0'); keep the real file name
            if ".jpg." in image:
                image = image.split(".jpg.", 1)[0] + ".jpg"
            _add(captions, image, caption)
    return CaptionSet(captions, source=str(path))


def read_karpathy_json(path: Path, data: dict) -> CaptionSet:
    """Karpathy ``dataset_*.json``: images with ``filename``, ``split`` and ``sentences``."""
    try:
        return _read_karpathy(path, data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed Karpathy caption JSON ({exc!r})") from exc


def _read_karpathy(path: Path, data: dict) -> CaptionSet:
    captions: dict[str, list[str]] = OrderedDict()
    splits: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for entry in data["images"]:
        name = entry.get("filename")
        if not name:
            raise DataError(f"{path}: an image entry has no 'filename'")
        if entry.get("filepath"):
            name = f"{entry['filepath']}/{name}"
        for sentence in entry.get("sentences", []):
            _add(captions, name, sentence.get("raw") or " ".join(sentence.get("tokens", [])))
        split = entry.get("split", "train")
        split = "train" if split == "restval" else split
        if split in splits:
            splits[split].append(name)
    return CaptionSet(captions, {k: v for k, v in splits.items() if v}, source=str(path))


def read_coco_json(path: Path, data: dict) -> CaptionSet:
    """COCO ``captions_*.json``: ``images`` (id, file_name), ``annotations`` (image_id, caption)."""
    try:
        return _read_coco(path, data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed COCO caption JSON ({exc!r})") from exc


def _read_coco(path: Path, data: dict) -> CaptionSet:
    names = {img["id"]: img["file_name"] for img in data["images"]}
    captions: dict[str, list[str]] = OrderedDict((names[i], []) for i in names)
    for ann in data["annotations"]:
        if ann["image_id"] not in names:
            raise DataError(f"{path}: annotation for unknown image_id {ann['image_id']}")
        _add(captions, names[ann["image_id"]], ann["caption"])
    return CaptionSet(OrderedDict((k, v) for k, v in captions.items() if v), source=str(path))


def read_captions(path: str | Path) -> CaptionSet:
    """Read any supported caption file, choosing the reader from its content."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"caption file not found: {path}")
    try:
        return _read_any(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc})") from exc


def _read_any(path: Path) -> CaptionSet:
    if path.suffix.lower() in MANIFEST_SUFFIXES and path.name != "captions.txt":
        result = read_manifest(path)
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            result = read_coco_json(path, data)
        elif isinstance(data, dict) and "images" in data:
            result = read_karpathy_json(path, data)
        else:
            raise DataError(f"{path}: neither a COCO nor a Karpathy caption JSON")
    else:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
        if "\t" in first and "#" in first.split("\t", 1)[0]:
            result = read_flickr_token(path)
        else:
            result = read_flickr_csv(path)
    if not result.captions:
        raise DataError(f"{path}: no captions found")
    return result


def find_caption_file(data_dir: Path) -> Path:
    """The caption file of a dataset folder, in order of preference."""
    found = find_caption_file_or_none(data_dir)
    if found is None:
        raise DataError(f"{data_dir}: no caption file ({', '.join(CAPTION_FILE_PATTERNS)})")
    return found


CAPTION_FILE_PATTERNS = (
    "captions.txt",
    "Flickr8k.token.txt",
    "dataset_*.json",
    "captions_*.json",
    "*.jsonl",
    "*.csv",
    "*.tsv",
)


def find_caption_file_or_none(data_dir: Path) -> Path | None:
    """The first caption file of a dataset folder in order of preference, or None."""
    for pattern in CAPTION_FILE_PATTERNS:
        found = sorted(data_dir.glob(pattern))
        if found:
            return found[0]
    return None
