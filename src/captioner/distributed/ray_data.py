"""Ray Data adapter: caption a dataset of images on every CPU of a Ray cluster.

``CaptionBatch`` is a callable class for ``Dataset.map_batches``: Ray builds one per actor, so
the model loads once per actor, then each call captions one batch::

    ds = ray.data.read_images("/shared/photos", include_paths=True, mode="RGB")
    ds.map_batches(CaptionBatch, concurrency=4, num_cpus=1, batch_size=32)

``caption_dataset`` is what ``captioner caption --ray ADDRESS`` runs: it lists the inputs on
the driver (the bulk_inputs rules, minus tar shards), reads the files' bytes with
``read_binary_files`` (JPEG bytes are ~10x smaller than pixels in the object store, and an
unreadable file becomes one error row instead of failing the job), and streams the caption
rows back to the driver, which writes one JSONL (appended, resumable) or Parquet file.

``ray`` is imported inside functions only: without it, this module still imports and the
runner says how to install it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.distributed.ray_output import concepts_json
from captioner.errors import CaptionerError, ConfigError, ImageLoadError
from captioner.features.quantize import DEFAULT_PRECISION

INSTALL_HINT = "pip install 'captioner[ray]'"
OUTPUT_FORMATS = ("jsonl", "parquet")
LOCAL = "local"  # --ray local: start a fresh single-machine cluster for this run
COLUMNS = ("path", "caption", "score", "concepts", "in_domain", "out_of_domain", "error")


def import_ray():
    """The ``ray`` module, or a clear error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is the part we need
    except ImportError as exc:
        raise ConfigError(f"Ray is not installed: {INSTALL_HINT}") from exc
    return ray


class CaptionBatch:
    """One per Ray actor: loads the model once, then captions a batch per call.

    Takes Ray's ``image`` column (decoded arrays, from ``read_images``) or ``bytes`` column
    (from ``read_binary_files``), plus ``path``. An image that cannot be decoded or captioned
    gets an ``error`` message and empty fields instead of failing the whole batch."""

    def __init__(
        self,
        model: str | None = None,
        beam_size: int | None = None,
        backend: str = "auto",
        precision: str = DEFAULT_PRECISION,
        threads: int | None = None,
        max_length: int | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> None:
        from captioner.api import Captioner

        self.captioner = Captioner.from_pretrained(
            model, backend=backend, threads=threads, precision=precision
        )
        self.settings = {
            "beam_size": beam_size,
            "max_length": max_length,
            "no_repeat_ngram_size": no_repeat_ngram_size,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"path": (B,), "image" or "bytes": (B,)}`` -> one row per image, ``COLUMNS``."""
        from captioner.bulk import caption_chunk

        if "image" in batch:
            column = batch["image"]  # (B, H, W, 3) uint8, or (B,) object when sizes differ
        elif "bytes" in batch:
            column = batch["bytes"]  # (B,) encoded files
        else:
            raise ConfigError(f"CaptionBatch needs an 'image' or 'bytes' column, got {list(batch)}")
        n = len(column)
        paths = [str(p) for p in batch["path"]] if "path" in batch else [str(i) for i in range(n)]
        rows = {k: [] for k in COLUMNS}
        decoded: list[np.ndarray] = []
        slots: list[int] = []  # row index of each decoded image
        errors: dict[int, str] = {}
        for i, (path, item) in enumerate(zip(paths, column, strict=True)):
            try:
                source = bytes(item) if isinstance(item, (bytes, np.bytes_)) else np.asarray(item)
                decoded.append(_load(source, path))
                slots.append(i)
            except ImageLoadError as exc:
                errors[i] = str(exc)
        results = caption_chunk(self.captioner, decoded, **self.settings) if decoded else []
        by_row = dict(zip(slots, results, strict=True))
        for i, path in enumerate(paths):
            result = by_row.get(i, errors.get(i))
            _add_row(rows, path, result)
        return as_columns(rows)


def as_columns(rows: dict[str, list]) -> dict[str, np.ndarray]:
    """``_add_row``'s lists as the typed numpy columns Ray carries (``COLUMNS``)."""
    return {
        "path": np.array(rows["path"], dtype=object),
        "caption": np.array(rows["caption"], dtype=object),
        "score": np.array(rows["score"], dtype=np.float64),
        "concepts": np.array(rows["concepts"], dtype=object),
        "in_domain": np.array(rows["in_domain"], dtype=np.float64),  # NaN: no grounding
        "out_of_domain": np.array(rows["out_of_domain"], dtype=bool),
        "error": np.array(rows["error"], dtype=object),  # "" when captioned
    }


def _load(source: Any, name: str) -> np.ndarray:
    from captioner.data.images import load_image

    return load_image(source, name=name)


def _add_row(rows: dict[str, list], path: str, result: Any) -> None:
    """Append one image's row: a CaptionResult, or an error message (str)."""
    rows["path"].append(path)
    if isinstance(result, str) or result is None:
        values = ("", float("nan"), "[]", float("nan"), False, result or "not captioned")
    else:
        in_domain = float("nan") if result.in_domain is None else float(result.in_domain)
        values = (
            result.caption,
            float(result.score),
            concepts_json(result.concepts),
            in_domain,
            bool(result.out_of_domain),
            "",
        )
    for key, value in zip(COLUMNS[1:], values, strict=True):
        rows[key].append(value)


# ------------------------------------------------------------------------------------------
# the runner behind `captioner caption --ray`
# ------------------------------------------------------------------------------------------


@dataclass
class RayStats:
    captioned: int = 0
    skipped: int = 0  # already in the JSONL output (resume)
    failed: int = 0  # unreadable images
    out_of_domain: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


def is_uri(item: str) -> bool:
    """s3://, gs://, hdfs://...: read by Ray itself on the workers, not listed here."""
    return "://" in item and not item.startswith("file://")


def list_inputs(
    inputs: Sequence[str],
    files_from: Sequence[Path] = (),
    problem: Callable[[str], None] = lambda message: None,
) -> tuple[list[str], list[str]]:
    """(local image files as absolute paths, URIs): Ray workers run in their own folders, so a
    relative path would mean nothing there. Tar shards are refused (read_webdataset reads
    them; see docs/RAY.md)."""
    from captioner.bulk.inputs import iter_sources, unique

    uris = [item for item in inputs if is_uri(item)]
    local = [item.removeprefix("file://") for item in inputs if not is_uri(item)]
    files: list[str] = []
    for source in unique(iter_sources(local, files_from, with_data=False, problem=problem)):
        if source.path is None:
            raise ConfigError(
                f"{source.key}: --ray reads image files, not tar shards (unpack them, or read "
                "them with ray.data.read_webdataset and CaptionBatch)"
            )
        files.append(os.path.abspath(source.path))
    if files and uris:
        raise ConfigError("--ray reads local paths or URIs (s3://...) in one run, not both")
    return files, uris


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` or start a local one (``None`` or "local"); True when
    this call started Ray (so the caller shuts it down). An already running Ray is reused."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    if address in (None, LOCAL):
        # loopback only: no dashboard, and the node is 127.0.0.1 instead of the address Ray
        # would find by opening a socket towards a public IP
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            configure_logging=False,
        )
    else:
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    return True


def caption_rows(
    files: Sequence[str],
    uris: Sequence[str],
    *,
    concurrency: int = 2,
    cpus_per_worker: float = 1,
    batch_size: int = 32,
    progress: bool = True,
    **captioner_kwargs: Any,
) -> Iterator[dict[str, np.ndarray]]:
    """Caption on the connected cluster; batches of ``COLUMNS`` rows, streamed to the driver."""
    ray = import_ray()
    from captioner.bulk.inputs import IMAGE_SUFFIXES

    ray.data.DataContext.get_current().enable_progress_bars = progress
    # reading bytes is I/O (decoding happens in the actors): a read task that asked for a CPU
    # would wait forever on a cluster whose every CPU is held by a captioning actor
    read = {"include_paths": True, "num_cpus": 0}
    if uris:
        extensions = [s.lstrip(".") for s in IMAGE_SUFFIXES]
        ds = ray.data.read_binary_files(list(uris), file_extensions=extensions, **read)
    else:
        # enough blocks for every actor to have work (Ray makes one block of a short list),
        # about four model calls each
        blocks = max(4 * concurrency, -(-len(files) // (4 * batch_size)))
        ds = ray.data.read_binary_files(
            list(files), override_num_blocks=min(len(files), blocks), **read
        )
    threads = max(1, int(cpus_per_worker))
    ds = ds.map_batches(
        CaptionBatch,
        fn_constructor_kwargs={"threads": threads, **captioner_kwargs},
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_worker,
        batch_size=batch_size,
        batch_format="numpy",
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def caption_dataset(
    inputs: Sequence[str] | str,
    output: str | os.PathLike,
    address: str | None = None,
    concurrency: int = 2,
    fmt: str = "jsonl",
    *,
    files_from: Sequence[Path] = (),
    overwrite: bool = False,
    batch_size: int = 32,
    cpus_per_worker: float = 1,
    progress: bool = True,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    model: str | None = None,
    beam_size: int | None = None,
    max_length: int | None = None,
    no_repeat_ngram_size: int | None = None,
    backend: str = "auto",
    precision: str = DEFAULT_PRECISION,
) -> RayStats:
    """Caption ``inputs`` (paths, folders, globs, @lists or URIs) on a Ray cluster with
    ``concurrency`` actors into ``output`` (``fmt`` jsonl or parquet, see ray_output).
    Unreadable images are passed to ``report`` and counted, never stopping the run."""
    import time

    from captioner.distributed.ray_output import open_output

    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(OUTPUT_FORMATS)} with --ray")
    if concurrency < 1 or cpus_per_worker <= 0 or not 1 <= batch_size <= 1024:
        raise ConfigError("concurrency, cpus per worker and batch size must be positive")
    import_ray()  # a missing Ray is reported before any work
    if address in (None, LOCAL):
        from captioner.api import resolve_model_path

        resolve_model_path(model)  # here the actors share this machine: fail before starting
    items = [inputs] if isinstance(inputs, str) else list(inputs)
    files, uris = list_inputs(items, files_from, problem=report)
    if not files and not uris:
        raise ImageLoadError("no images found")
    stats = RayStats()
    writer = open_output(Path(output), fmt, overwrite)
    try:
        if writer.done:
            before = len(files)
            files = [f for f in files if f not in writer.done]
            stats.skipped = before - len(files)
        if not files and not uris:
            return stats
        started = time.perf_counter()
        kwargs = {"model": model, "beam_size": beam_size, "max_length": max_length}
        kwargs.update(no_repeat_ngram_size=no_repeat_ngram_size, backend=backend)
        started_ray = connect(address, num_cpus=None)
        try:
            rows = caption_rows(
                files,
                uris,
                concurrency=concurrency,
                cpus_per_worker=cpus_per_worker,
                batch_size=batch_size,
                progress=progress,
                precision=precision,
                **kwargs,
            )
            for batch in _unwrap_errors(rows):
                failed = [str(e) for e in batch["error"] if e]
                for message in failed:
                    report(message)
                stats.failed += len(failed)
                written = writer.write(batch)
                stats.captioned += written
                stats.out_of_domain += int(np.sum(batch["out_of_domain"]))
            writer.finish()
        finally:
            stats.seconds = time.perf_counter() - started
            if started_ray:
                import_ray().shutdown()
    finally:
        writer.close()
    return stats


def _unwrap_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """Ray wraps what an actor raised; our own errors come out as themselves (one line)."""
    ray = import_ray()
    try:
        yield from batches
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        while cause is not None and not isinstance(cause, CaptionerError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, CaptionerError):
            raise type(cause)(str(cause)) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptionerError(f"the Ray job failed: {first}") from None
