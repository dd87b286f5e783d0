"""Readers for web-scale caption manifests and per-image caption sidecars.

- CSV / TSV with a header naming an image column and a caption column (the columns that
  img2dataset and most dataset dumps use: ``image``/``filepath``/``path``/``file_name`` and
  ``caption``/``text``/``title``/``sentence``).
- JSONL: one object per line with the same keys; the caption may be a list of captions.
- A folder of images each with a sidecar ``NAME.txt`` (one caption per line), searched
  recursively (img2dataset's "files" output: ``00000/000000001.jpg`` + ``.txt`` + ``.json``).

Image names are kept as written (relative to the manifest's folder, or absolute). A malformed
row or an empty caption is counted in ``CaptionSet.bad`` and left out; it never stops the read.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import OrderedDict
from pathlib import Path

from captioner.data.caption_set import CaptionSet
from captioner.data.image_source import IMAGE_SUFFIXES
from captioner.errors import DataError

IMAGE_KEYS = ("image", "image_path", "filepath", "file_path", "path", "file_name", "filename")
CAPTION_KEYS = ("caption", "captions", "text", "title", "sentence", "raw")


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


def _add_captions(result: CaptionSet, image: object, caption: object, where: str) -> None:
    """Add one row's caption(s); count it as bad instead when a field is missing or empty."""
    if not isinstance(image, str) or not image.strip():
        result.note_bad("no image name", where)
        return
    texts = caption if isinstance(caption, list) else [caption]
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        result.note_bad("empty caption", where)
        return
    result.captions.setdefault(image.strip(), []).extend(texts)


def read_delimited(path: Path, delimiter: str) -> CaptionSet:
    """CSV or TSV manifest with a header row."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions are still captions
    result = CaptionSet(OrderedDict(), source=str(path))
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None) or []
        image_col, caption_col = _pick(header, IMAGE_KEYS), _pick(header, CAPTION_KEYS)
        if image_col is None or caption_col is None:
            raise DataError(
                f"{path}: the header needs an image column ({', '.join(IMAGE_KEYS)}) and a "
                f"caption column ({', '.join(CAPTION_KEYS)}); found {header!r}"
            )
        i, j = header.index(image_col), header.index(caption_col)
        for line_no, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                result.note_bad("malformed row", f"{path.name}:{line_no}")
                continue
            _add_captions(result, row[i], row[j], f"{path.name}:{line_no}")
    return result


def read_jsonl(path: Path) -> CaptionSet:
    """JSON Lines manifest: ``{"image": ..., "caption": ... | [...]}`` per line."""
    result = CaptionSet(OrderedDict(), source=str(path))
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                result.note_bad("malformed row", where)
                continue
            if not isinstance(row, dict):
                result.note_bad("malformed row", where)
                continue
            image_key, caption_key = _pick(list(row), IMAGE_KEYS), _pick(list(row), CAPTION_KEYS)
            if image_key is None or caption_key is None:
                result.note_bad("malformed row", where)
                continue
            _add_captions(result, row[image_key], row[caption_key], where)
    return result


def read_manifest(path: str | Path) -> CaptionSet:
    """A CSV, TSV or JSONL manifest, chosen by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return read_delimited(path, "\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: not a manifest (.csv, .tsv or .jsonl)")


def sidecar_images(root: Path) -> list[Path]:
    """Images under ``root`` (recursively) that have a sidecar ``.txt`` beside them."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()
    )


def read_sidecar_folder(root: str | Path) -> CaptionSet:
    """Every image under ``root`` with its ``NAME.txt`` of captions (one a line); an image
    without one, or with an empty one, is counted as bad."""
    root = Path(root)
    result = CaptionSet(OrderedDict(), source=str(root))
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        name = image.relative_to(root).as_posix()
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            result.note_bad("no caption file", name)
            continue
        try:
            lines = sidecar.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            result.note_bad("unreadable caption file", name)
            continue
        _add_captions(result, name, lines, name)
    return result
