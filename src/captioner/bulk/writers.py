"""Where bulk captions go: a JSONL or CSV file appended chunk by chunk (resumable, and safe
against a kill at any point), a sidecar ``.txt`` beside each image, or a stream (stdout).

Append safety: each chunk is one ``write`` on an ``O_APPEND`` descriptor followed by fsync;
a run killed mid-write leaves at most one torn last line, which the next run cuts off before
reading back the keys already written. So a kill + rerun ends with every image exactly once.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from captioner.bulk.inputs import KeySet, Source
from captioner.errors import DataError
from captioner.io import atomic_write_text

if TYPE_CHECKING:
    from captioner.api import CaptionResult

CSV_FIELDS = ("path", "caption", "score", "concepts", "in_domain", "out_of_domain")


def result_record(key: str, result: CaptionResult) -> dict:
    """One output object: image, caption, score, and the grounding fields when present."""
    record: dict = {"image": key, "caption": result.caption, "score": round(result.score, 4)}
    if result.concepts:
        record["concepts"] = [[word, round(float(p), 4)] for word, p in result.concepts]
    if result.in_domain is not None:
        record["in_domain"] = round(float(result.in_domain), 4)
        record["out_of_domain"] = bool(result.out_of_domain)
    return record


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
        writer.writerow(
            [r["image"], r["caption"], r["score"], concepts, r.get("in_domain", ""), ood]
        )
    return buffer.getvalue()


class Sink(Protocol):
    """What the bulk loop writes to."""

    def is_done(self, source: Source) -> bool: ...

    def write(self, chunk: list[tuple[Source, CaptionResult]]) -> None: ...

    def close(self) -> None: ...


class AppendFile:
    """A JSONL (``fmt="jsonl"``) or CSV file, appended one chunk at a time, resumable.

    Opening it cuts a torn last line off, reads the keys already written (``done``) and takes
    an exclusive lock, so two runs never append to the same file."""

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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
        if self._truncate:
            os.ftruncate(self._fd, 0)
            self._truncate = False
        if self.fmt == "csv" and os.fstat(self._fd).st_size == 0:
            self._append(csv_lines([], header=True))

    def _recover(self) -> tuple[KeySet, bool]:
        """Cut a torn last line; return (keys already written, whether a line was cut)."""
        done, good_end, torn = KeySet(), 0, False
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    torn = True  # the last line, written by a run that was killed
                    break
                key = self._key(raw, number)
                if key is not None:
                    done.add(key)
                good_end += len(raw)
        if torn:
            os.ftruncate(self._fd, good_end)
        return done, torn

    def _key(self, raw: bytes, number: int) -> str | None:
        """The image key of one complete line (None for the CSV header)."""
        where = f"{self.path} line {number}"
        try:
            text = raw.decode("utf-8")
            if self.fmt == "jsonl":
                key = json.loads(text)["image"]
            else:
                row = next(csv.reader([text]))
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
            raise DataError(f"{where}: 'image' is not a string")
        return key

    def is_done(self, source: Source) -> bool:
        return source.key in self.done

    def _append(self, text: str) -> None:
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:  # one write in practice; loop in case the kernel takes less
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

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
    an image whose sidecar exists counts as done."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite

    @staticmethod
    def sidecar(source: Source) -> Path:
        if source.path is None:
            raise DataError(f"{source.key}: sidecar .txt files need image files, not tar members")
        return source.path.with_suffix(".txt")

    def is_done(self, source: Source) -> bool:
        return not self.overwrite and self.sidecar(source).exists()

    def write(self, chunk: list[tuple[Source, CaptionResult]]) -> None:
        for source, result in chunk:
            target = self.sidecar(source)
            try:
                atomic_write_text(target, result.caption + "\n")
            except OSError as exc:
                raise DataError(f"{target}: cannot write the sidecar ({exc.strerror})") from exc

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
            text = "".join(f"{r['image']}\t{r['caption']}\n" for r in records)
        self._started = True
        self.handle.write(text)
        self.handle.flush()

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
