"""Bulk captioning: stream any number of images through ``Captioner.caption`` in chunks.

A background thread walks the inputs, skips the images the sink already has (resume) and
decodes the rest into a bounded queue, so JPEG decoding overlaps the model and at most
``prefetch`` decoded images wait in memory. A second thread encodes the next chunk (one
encoder call, :mod:`captioner.overlap`) while the main thread beam-searches this one and hands
it to the sink (bulk.writers), which makes it durable before the next: JPEG decoding, the
encoder and the decoder all overlap, so both cores stay busy.
Unreadable images are reported and counted, never stopping the run, whatever the decoder
raises (a truncated GIF made Pillow raise IndexError): one bad file must not make a run that
can never finish.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.bulk.inputs import Source, display_key, iter_sources, unique
from captioner.bulk.writers import Sink
from captioner.data.images import load_image
from captioner.errors import CaptionerError, ConfigError, ImageLoadError
from captioner.overlap import Failed, overlapped
from captioner.progress import progress_bar

if TYPE_CHECKING:
    import numpy as np

    from captioner.api import Captioner, CaptionResult


@dataclass
class Plan:
    """What a run will do, from a counting pass over the inputs (no image is decoded)."""

    total: int  # distinct images found
    todo: int  # of which the sink does not have yet
    problems: list[str]  # inputs that found nothing


@dataclass
class BulkStats:
    captioned: int = 0
    skipped: int = 0  # already in the output (resume)
    failed: int = 0  # unreadable images
    out_of_domain: int = 0  # captioned photos a grounded model calls unlike its training photos
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


def plan(inputs: Sequence[str], sink: Sink, files_from: Sequence[Path] = ()) -> Plan:
    """Count the inputs and what is left to do (for the progress bar and a clear error when
    nothing is found), reading names and tar headers only."""
    problems: list[str] = []
    total = todo = 0
    for source in unique(
        iter_sources(inputs, files_from, with_data=False, problem=problems.append)
    ):
        total += 1
        todo += not sink.is_done(source)
    return Plan(total, todo, problems)


@dataclass
class _Decoded:
    source: Source
    image: np.ndarray | None = None
    error: str | None = None


def _decoder(sink: Sink) -> Callable[[Source], _Decoded]:
    """The decode stage: a source the sink already has comes through empty (resume), an
    unreadable one with its error, the rest as RGB arrays."""

    def decode(source: Source) -> _Decoded:
        if source.error is not None:
            return _Decoded(source, error=source.error)
        if sink.is_done(source):
            return _Decoded(source)
        name = display_key(source.key)
        try:
            return _Decoded(source, image=load_image(source.load(), name=name))
        except ImageLoadError as exc:
            return _Decoded(source, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not end the run
            return _Decoded(source, error=f"{name}: cannot decode this image ({exc!r})")

    return decode


def decoded_stream(
    inputs: Sequence[str],
    sink: Sink,
    files_from: Sequence[Path] = (),
    prefetch: int = 64,
) -> Iterator[_Decoded]:
    """Decoded inputs in input order, from a background thread ("bulk-decode") through a queue
    of at most ``prefetch`` items. Already-done images come through with neither image nor
    error; an unexpected error while decoding is raised here."""
    if prefetch < 1:
        raise ConfigError(f"prefetch must be at least 1, got {prefetch}")
    sources = unique(iter_sources(inputs, files_from, with_data=True))
    stream = overlapped(sources, _decoder(sink), depth=prefetch, name="bulk-decode")
    try:
        for _, decoded in stream:
            if isinstance(decoded, Failed):
                raise decoded.error
            yield decoded
    finally:
        stream.close()  # stops the decode thread now, also on an error or Ctrl-C


def _chunks(stream: Iterator[_Decoded], batch_size: int) -> Iterator[list[_Decoded]]:
    """The stream cut after every ``batch_size`` images (errors and skipped images ride along
    in their chunk, so everything stays in input order)."""
    chunk: list[_Decoded] = []
    images = 0
    for item in stream:
        chunk.append(item)
        images += item.image is not None
        if images == batch_size:
            yield chunk
            chunk, images = [], 0
    if chunk:
        yield chunk


def caption_chunk(
    captioner: Captioner, images: list[np.ndarray], **settings: Any
) -> list[CaptionResult | str]:
    """One model call for a chunk; if the chunk fails on an image, caption one by one so only
    that image is lost (its entry is then the error message)."""
    try:
        return list(captioner.caption(images, return_attention=False, **settings))
    except ConfigError:
        raise
    except CaptionerError:
        results: list[CaptionResult | str] = []
        for image in images:
            try:
                results += captioner.caption([image], return_attention=False, **settings)
            except ConfigError:
                raise
            except CaptionerError as exc:
                results.append(str(exc))
        return results


def caption_bulk(
    captioner: Captioner,
    inputs: Sequence[str],
    sink: Sink,
    *,
    files_from: Sequence[Path] = (),
    batch_size: int = 32,
    prefetch: int | None = None,
    total: int | None = None,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    progress: bool = True,
    **settings: Any,
) -> BulkStats:
    """Caption every input the sink lacks, ``batch_size`` images per model call, writing each
    chunk before the next; ``settings`` go to ``Captioner.caption`` (beam_size, ...).
    ``total``: images to do, for the progress bar's ETA (from ``plan``)."""
    if not 1 <= batch_size <= 1024:
        raise ConfigError(f"batch_size must be between 1 and 1024, got {batch_size}")
    stats = BulkStats()
    started = time.perf_counter()
    bar = progress_bar(total=total, unit="img", desc="caption", disable=not progress)

    def problem(message: str) -> None:
        bar.clear()
        report(message)

    def encode(chunk: list[_Decoded]):
        images = [d.image for d in chunk if d.image is not None]
        return captioner.encode_for_caption(images) if images else None

    def captioned(images: list[_Decoded], encoded: Any) -> list[CaptionResult | str]:
        try:
            if isinstance(encoded, Failed):
                raise encoded.error
            grids = encoded["features"]
            rest = {k: v for k, v in encoded.items() if k != "features"}
            return list(
                captioner.caption_features(grids, return_attention=False, **rest, **settings)
            )
        except ConfigError:
            raise
        except CaptionerError:  # an image the model refused: caption_chunk goes one by one
            return caption_chunk(captioner, [d.image for d in images], **settings)

    def finish(chunk: list[_Decoded], encoded: Any) -> None:
        images = []
        for item in chunk:
            if item.error is not None:
                problem(item.error)
                stats.failed += 1
                bar.update(1)
            elif item.image is None:
                stats.skipped += 1
            else:
                images.append(item)
        if not images:
            return
        done = []
        for decoded, result in zip(images, captioned(images, encoded), strict=True):
            if isinstance(result, str):
                problem(result)
                stats.failed += 1
            else:
                done.append((decoded.source, result))
        if done:
            bar.clear()
            sink.write(done)
        stats.captioned += len(done)
        stats.out_of_domain += sum(bool(getattr(r, "out_of_domain", False)) for _, r in done)
        bar.update(len(images))

    stream = decoded_stream(inputs, sink, files_from, prefetch or 2 * batch_size)
    # the next chunk is encoded in a thread while this one is decoded and written (overlap)
    chunks = overlapped(_chunks(stream, batch_size), encode)
    try:
        for chunk, encoded in chunks:
            finish(chunk, encoded)
    finally:
        chunks.close()
        stream.close()  # stops the decode thread now, also on an error or Ctrl-C
        bar.close()
        stats.seconds = time.perf_counter() - started
    return stats
