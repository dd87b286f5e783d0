"""Where bulk captions go: a JSONL or CSV file appended chunk by chunk (resumable, and safe
against a kill at any point), a sidecar ``.txt`` beside each image, or a stream (stdout).

Append safety: each chunk is one ``write`` on an ``O_APPEND`` descriptor followed by fsync;
a run killed mid-write leaves at most one torn last record, which the next run cuts off before
reading back the keys already written. So a kill + rerun ends with every image exactly once.
A write that fails (disk full) is undone to the last whole chunk and stops the run with one
line; a rerun resumes after what was written.

Every format names the image ``path`` (JSONL said ``image`` before; both are read back) and
lists concepts as ``{"word", "probability"}`` objects, as the REST API does.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from captioner.bulk.inputs import KeySet, Source, display_key, is_image_name
from captioner.errors import DataError
from captioner.io import atomic_write_text

if TYPE_CHECKING:
    from captioner.api import CaptionResult

CSV_FIELDS = ("path", "caption", "score", "concepts", "in_domain", "out_of_domain")
OUT_OF_DOMAIN_MARK = "  [out of domain]"  # after a caption in the text format


def _rounded(value: float | None) -> float | None:
    """4 decimals; None for NaN or infinity (not valid JSON), as the REST API does."""
    value = float(value) if value is not None else math.nan
    return round(value, 4) if math.isfinite(value) else None


def result_record(key: str, result: CaptionResult) -> dict:
    """One output object: path, caption, score, and the grounding fields when present."""
    record: dict = {"path": display_key(key), "caption": result.caption}
    record["score"] = _rounded(result.score)
    if result.concepts:
        record["concepts"] = [
            {"word": str(word), "probability": _rounded(p) or 0.0} for word, p in result.concepts
        ]
    if result.in_domain is not None:
        record["in_domain"] = _rounded(result.in_domain)
        record["out_of_domain"] = bool(result.out_of_domain)
        record["short"] = bool(getattr(result, "short", False))
    return record


def text_line(record: dict) -> str:
    """path<TAB>caption, marked when the photo is unlike the training photos."""
    mark = OUT_OF_DOMAIN_MARK if record.get("out_of_domain") else ""
    return f"{record['path']}\t{record['caption']}{mark}\n"


def jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def csv_lines(records: Iterable[dict], header: bool = False) -> str:
    """Records -> CSV text (column ``path`` holds the image key, concepts as JSON)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(CSV_FIELDS)
    for r in records:
        concepts = json.dumps(r["concepts"], ensure_ascii=False) if "concepts" in r else ""
        ood = "" if "out_of_domain" not in r else str(r["out_of_domain"]).lower()
        score = "" if r["score"] is None else r["score"]
        in_domain = "" if r.get("in_domain") is None else r["in_domain"]
        writer.writerow([r["path"], r["caption"], score, concepts, in_domain, ood])
    return buffer.getvalue()


class Sink(Protocol):
    """What the bulk loop writes to."""

    def is_done(self, source: Source) -> bool: ...

    def write(self, chunk: list[tuple[Source, CaptionResult]]) -> None: ...

    def close(self) -> None: ...


class AppendFile:
    """A JSONL (``fmt="jsonl"``) or CSV file, appended one chunk at a time, resumable.

    Opening it cuts a torn last record off, reads the keys already written (``done``) and takes
    an exclusive lock, so two runs never append to the same file. CSV is read back record by
    record (a quoted path may hold a newline), never line by line."""

    def __init__(self, path: Path, fmt: str, overwrite: bool = False) -> None:
        if fmt not in ("jsonl", "csv"):
            raise ValueError(fmt)
        self.path, self.fmt = Path(path), fmt
        self.done, self.torn = KeySet(), False
        self._fd, self._truncate = -1, overwrite
        if not self.path.exists():
            return  # created by the first write: a run that finds nothing leaves no file
        self._fd = self._open(os.O_RDWR | os.O_APPEND)
        try:
            if not overwrite:
                self.done, self.torn = self._recover()
        except BaseException:
            self.close()
            raise

    def _open(self, flags: int) -> int:
        """Open with ``flags`` and take the exclusive lock."""
        try:
            fd = os.open(self.path, flags, 0o666)
        except FileExistsError as exc:
            raise DataError(f"{self.path}: appeared while this run started (another run?)") from exc
        except OSError as exc:
            raise DataError(f"{self.path}: cannot open for writing ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise DataError(f"{self.path}: another run is writing to this file") from exc
        return fd

    def _ready(self) -> None:
        """Before the first append: create the file, or empty it (overwrite); CSV header."""
        if self._fd < 0:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(f"{self.path.parent}: cannot create the folder ({exc})") from exc
            self._fd = self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
        if self._truncate:
            os.ftruncate(self._fd, 0)
            self._truncate = False
        if self.fmt == "csv" and os.fstat(self._fd).st_size == 0:
            self._append(csv_lines([], header=True))

    def _recover(self) -> tuple[KeySet, bool]:
        """Cut a torn last record; return (keys already written, whether a record was cut)."""
        done, good_end, number = KeySet(), 0, 0
        record, quotes = b"", 0
        with open(self.path, "rb") as handle:
            for raw in handle:
                record += raw
                if not raw.endswith(b"\n"):
                    break  # the last record, written by a run that was killed
                quotes += raw.count(b'"')
                if self.fmt == "csv" and quotes % 2:
                    continue  # a newline inside a quoted field: the record goes on
                number += 1
                key = self._key(record, number)
                if key is not None:
                    done.add(key)
                good_end += len(record)
                record, quotes = b"", 0
        if record:
            os.ftruncate(self._fd, good_end)
        return done, bool(record)

    def _key(self, raw: bytes, number: int) -> str | None:
        """The image key of one complete record (None for the CSV header)."""
        where = f"{self.path} {'line' if self.fmt == 'jsonl' else 'record'} {number}"
        try:
            text = raw.decode("utf-8")
            if self.fmt == "jsonl":
                record = json.loads(text)
                key = record["path"] if "path" in record else record["image"]  # older files
            else:
                row = next(csv.reader(io.StringIO(text, newline="")))
                if number == 1:
                    if tuple(row) != CSV_FIELDS:
                        raise DataError(
                            f"{where}: the header is not captioner's ({','.join(CSV_FIELDS)}); "
                            "choose another --output or pass --overwrite"
                        )
                    return None
                key = row[0]
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, StopIteration) as exc:
            raise DataError(
                f"{where}: not a captioner {self.fmt.upper()} record, so this run will not "
                "append to it; choose another --output or pass --overwrite"
            ) from exc
        if not isinstance(key, str):
            raise DataError(f"{where}: 'path' is not a string")
        return key

    def is_done(self, source: Source) -> bool:
        return display_key(source.key) in self.done

    def _append(self, text: str) -> None:
        """One write + fsync; on failure (disk full) the file is cut back to where it was, so
        it holds whole chunks only, and the run stops with one line."""
        view = memoryview(text.encode("utf-8"))
        start = os.fstat(self._fd).st_size
        try:
            while view:  # one write in practice; loop in case the kernel takes less
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # the next run cuts the torn record off instead
            raise DataError(
                f"{self.path}: cannot write ({exc.strerror or exc}); the captions before this "
                "chunk are kept and a rerun resumes after them"
            ) from exc

    def write(self, chunk: list[tuple[Source, CaptionResult]]) -> None:
        records = [result_record(s.key, r) for s, r in chunk]
        self._ready()
        if self.fmt == "jsonl":
            self._append("".join(jsonl_line(r) for r in records))
        else:
            self._append(csv_lines(records))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the lock
            self._fd = -1


class Sidecars:
    """``photo.txt`` beside each ``photo.jpg`` (caption only, one line), written atomically;
    an image whose sidecar exists counts as done. Images that share a name but not a suffix
    in one folder (``a.jpg`` and ``a.png``) get ``a.jpg.txt`` and ``a.png.txt``: one ``a.txt``
    would keep only one of their captions."""

    FOLDERS_KEPT = 256  # folders whose shared stems are remembered

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._shared: OrderedDict[Path, frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()  # is_done runs in the decode thread, write in the main

    def _shared_stems(self, folder: Path) -> frozenset[str]:
        """The stems of ``folder`` that more than one image file has (one listing per folder)."""
        with self._lock:
            if folder in self._shared:
                self._shared.move_to_end(folder)
                return self._shared[folder]
        seen: set[str] = set()
        shared: set[str] = set()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if is_image_name(entry.name):
                        stem = os.path.splitext(entry.name)[0]
                        (shared if stem in seen else seen).add(stem)
        except OSError:
            pass
        with self._lock:
            self._shared[folder] = frozen = frozenset(shared)
            while len(self._shared) > self.FOLDERS_KEPT:
                self._shared.popitem(last=False)
        return frozen

    def sidecar(self, source: Source) -> Path:
        path = source.path
        if path is None:
            raise DataError(
                f"{display_key(source.key)}: sidecar .txt files need image files, not tar members"
            )
        if path.suffix.lower() == ".txt" or path.stem in self._shared_stems(path.parent):
            return path.with_name(path.name + ".txt")
        return path.with_suffix(".txt")

    def is_done(self, source: Source) -> bool:
        if self.overwrite:
            return False
        target = self.sidecar(source)
        try:
            return os.path.exists(target)  # False for a name the system refuses (too long)
        except ValueError:
            return False

    def write(self, chunk: list[tuple[Source, CaptionResult]]) -> None:
        for source, result in chunk:
            target = self.sidecar(source)
            try:
                atomic_write_text(target, result.caption + "\n")
            except OSError as exc:
                where = display_key(str(target))
                raise DataError(f"{where}: cannot write the sidecar ({exc.strerror})") from exc

    def close(self) -> None:
        pass


class Stream:
    """Records to an open text stream as they come: ``text`` (path<TAB>caption), ``jsonl`` or
    ``csv`` (header first). Nothing to resume."""

    def __init__(self, handle: IO[str], fmt: str) -> None:
        self.handle, self.fmt, self._started = handle, fmt, False

    def is_done(self, source: Source) -> bool:
        return False

    def write(self, chunk: list[tuple[Source, CaptionResult]]) -> None:
        records = [result_record(s.key, r) for s, r in chunk]
        if self.fmt == "jsonl":
            text = "".join(jsonl_line(r) for r in records)
        elif self.fmt == "csv":
            text = csv_lines(records, header=not self._started)
        else:
            text = "".join(text_line(r) for r in records)
        self._started = True
        try:
            self.handle.write(text)
            self.handle.flush()
        except OSError as exc:
            raise DataError(f"cannot write the captions ({exc.strerror or exc})") from exc

    def close(self) -> None:
        pass


class Collect:
    """Keeps every record (for the whole-file formats: a JSON array, or text to a file)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def is_done(self, source: Source) -> bool:
        return False

    def write(self, chunk: list[tuple[Source, CaptionResult]]) -> None:
        self.records += [result_record(s.key, r) for s, r in chunk]

    def close(self) -> None:
        pass
