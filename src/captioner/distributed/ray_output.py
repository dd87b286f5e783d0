"""Where ``caption --ray`` writes: caption rows streamed back from the cluster to one file on
the driver (captions are small: a million of them is ~200 MB of JSONL).

- jsonl: the single-machine layout (bulk.writers.AppendFile: one ``{"path": ...}`` record
  per line, appended and fsynced per batch), so an interrupted run resumes where it stopped.
- parquet: columns path, caption, score, concepts (JSON text), in_domain, out_of_domain,
  written to a temporary file and moved into place at the end: a failed run leaves nothing.

Concepts are ``{"word": ..., "probability": ...}`` objects in both, as in every other output
(bulk/writers.py, the REST API).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from captioner.errors import ConfigError, DataError

PARQUET_COLUMNS = ("path", "caption", "score", "concepts", "in_domain", "out_of_domain")


class Output(Protocol):
    done: set[str] | object  # keys already written (supports ``in``)

    def write(self, batch: dict[str, np.ndarray]) -> int: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


def concepts_json(concepts: Iterable[tuple[str, float]]) -> str:
    """The concepts column: JSON text of ``{"word", "probability"}`` objects (4 decimals; a
    non-finite probability as 0.0, as bulk/writers.py writes it)."""
    objects = []
    for word, p in concepts:
        p = float(p)
        objects.append({"word": str(word), "probability": round(p, 4) if math.isfinite(p) else 0.0})
    return json.dumps(objects, ensure_ascii=False)


def parse_concepts(text: str) -> list[tuple[str, float]]:
    """``concepts_json``'s text back to (word, probability) pairs."""
    return [(str(c["word"]), float(c["probability"])) for c in json.loads(text)]


def _ok_rows(batch: dict[str, np.ndarray]) -> list[int]:
    """Indices of the rows that were captioned (no error)."""
    return [i for i, error in enumerate(batch["error"]) if not error]


def _in_domain(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


class JsonlOutput:
    """A resumable JSONL file, through the single-machine AppendFile."""

    def __init__(self, path: Path, overwrite: bool) -> None:
        from captioner.bulk.writers import AppendFile

        self._file = AppendFile(path, "jsonl", overwrite)
        self.done = self._file.done
        self.torn = self._file.torn

    def write(self, batch: dict[str, np.ndarray]) -> int:
        from captioner.api import CaptionResult
        from captioner.bulk.inputs import Source

        chunk = []
        for i in _ok_rows(batch):
            in_domain = _in_domain(batch["in_domain"][i])
            result = CaptionResult(
                caption=str(batch["caption"][i]),
                tokens=str(batch["caption"][i]).split(),
                score=float(batch["score"][i]),
                attention=None,
                concepts=parse_concepts(str(batch["concepts"][i])),
                in_domain=in_domain,
                out_of_domain=bool(batch["out_of_domain"][i]) and in_domain is not None,
            )
            chunk.append((Source(str(batch["path"][i])), result))
        if chunk:
            self._file.write(chunk)
        return len(chunk)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()


class _Abort(Exception):
    """Thrown into atomic_path to discard the temporary file."""


class ParquetOutput:
    """One Parquet file, a row group per batch, in place only once every batch is written."""

    done: frozenset[str] = frozenset()  # no resume: a Parquet file is written whole

    def __init__(self, path: Path, overwrite: bool) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from captioner.io import atomic_path

        if path.exists() and not overwrite:
            raise DataError(
                f"{path} exists: pass --overwrite to replace it (Parquet is written whole at "
                "the end; --format jsonl appends and resumes)"
            )
        if path.is_dir():
            raise DataError(f"{path} is a folder: give a file name such as captions.parquet")
        self._pa = pa
        self.schema = pa.schema(
            [
                ("path", pa.string()),
                ("caption", pa.string()),
                ("score", pa.float64()),
                ("concepts", pa.string()),  # JSON: [{"word": "dog", "probability": 0.91}, ...]
                ("in_domain", pa.float64()),  # null: the model has no grounding
                ("out_of_domain", pa.bool_()),
            ]
        )
        self._target = atomic_path(path)
        tmp = self._target.__enter__()
        self._writer = pq.ParquetWriter(tmp, self.schema)
        self._open = True

    def write(self, batch: dict[str, np.ndarray]) -> int:
        pa, rows = self._pa, _ok_rows(batch)
        if not rows:
            return 0
        in_domain = [_in_domain(batch["in_domain"][i]) for i in rows]
        columns = [
            pa.array([str(batch["path"][i]) for i in rows], pa.string()),
            pa.array([str(batch["caption"][i]) for i in rows], pa.string()),
            pa.array([round(float(batch["score"][i]), 4) for i in rows], pa.float64()),
            pa.array([str(batch["concepts"][i]) for i in rows], pa.string()),
            pa.array([None if v is None else round(v, 4) for v in in_domain], pa.float64()),
            pa.array(
                [
                    None if v is None else bool(batch["out_of_domain"][i])
                    for i, v in zip(rows, in_domain, strict=True)
                ],
                pa.bool_(),
            ),
        ]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        return len(rows)

    def finish(self) -> None:
        """Close the file and move it into place."""
        if self._open:
            self._open = False
            self._writer.close()
            self._target.__exit__(None, None, None)

    def close(self) -> None:
        """Without ``finish`` first: discard the temporary file, leaving any old one."""
        if self._open:
            self._open = False
            self._writer.close()
            self._target.__exit__(_Abort, _Abort(), None)


def open_output(path: Path, fmt: str, overwrite: bool = False) -> Output:
    if fmt == "jsonl":
        return JsonlOutput(path, overwrite)
    if fmt == "parquet":
        return ParquetOutput(path, overwrite)
    raise ConfigError(f"unknown output format {fmt!r}")
