"""`captioner caption`: one photo or a million, on this machine (bulk, resumable) or on a Ray
cluster (--ray). The work is in captioner.bulk and captioner.distributed; this module parses
options and reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from captioner.cli.common import EXIT_USER_ERROR, MODEL_HELP, check_writable, friendly_errors
from captioner.cli.inference_options import (
    BACKEND_HELP,
    DEVICE_HELP,
    GROUNDING_OPTION,
    LENGTH_PENALTY_OPTION,
    NO_REPEAT_HELP,
    PRECISION_HELP,
    check_device,
    echo_error,
)
from captioner.errors import DataError
from captioner.features.quantize import DEFAULT_PRECISION, PRECISIONS
from captioner.settings import BACKENDS, check_choice

FORMATS = ("text", "json", "csv", "jsonl", "txt")
PROGRESS_MIN_IMAGES = 8  # show a progress bar from this many images on

FORMAT_HELP = (
    "text (path<TAB>caption per line, '  [out of domain]' after a caption the model warns "
    "about), json (one array, written at the end), csv or jsonl (one record per image, "
    "appended per chunk and resumed with --output), or txt (a sidecar photo.txt beside each "
    "photo.jpg, photo.jpg.txt when photo.png is there too; resumed)"
)


def _choose_sink(fmt: str, output: Path | None, overwrite: bool):
    """The bulk.writers sink for a format and destination."""
    from captioner.bulk.writers import AppendFile, Collect, Sidecars, Stream

    if fmt == "txt":
        return Sidecars(overwrite)
    if output is not None and fmt in ("jsonl", "csv"):
        return AppendFile(output, fmt, overwrite)
    if fmt == "json" or output is not None:
        return Collect()
    return Stream(sys.stdout, fmt)


@friendly_errors
def caption_cmd(
    inputs: list[str] | None = typer.Argument(
        None,
        metavar="PATH",
        help="image files, folders (searched recursively), glob patterns such as "
        "'photos/**/*.jpg', @list.txt (one path per line) or WebDataset .tar shards",
    ),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    beam_size: int | None = typer.Option(
        None, min=1, max=20, help="beam width (1 = greedy); default: the model's"
    ),
    max_length: int = typer.Option(20, min=1, max=100, help="most words per caption"),
    no_repeat_ngram: int | None = typer.Option(None, min=0, max=10, help=NO_REPEAT_HELP),
    length_penalty: float | None = LENGTH_PENALTY_OPTION,
    grounding: bool = GROUNDING_OPTION,
    fmt: str = typer.Option("text", "--format", "-f", help=FORMAT_HELP),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="write here instead of stdout; jsonl and csv are appended chunk by chunk and a "
        "rerun skips the images already in the file",
    ),
    files_from: Path | None = typer.Option(
        None, "--files-from", help="a file listing image paths, one per line"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="caption everything again instead of resuming"
    ),
    batch_size: int = typer.Option(32, min=1, max=256, help="images per model call"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    precision: str = typer.Option(DEFAULT_PRECISION, help=PRECISION_HELP),
    ray: str | None = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS",
        help="caption on a Ray cluster (HEAD:6379, or 'local' for a fresh one on this machine); "
        "writes --output as jsonl or parquet (docs/RAY.md)",
    ),
    ray_workers: int = typer.Option(2, min=1, max=4096, help="with --ray: captioning actors"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Caption images, any number of them: decoding overlaps the model and memory stays
    bounded. Unreadable files are reported on stderr and skipped (exit code 1)."""
    from captioner.api import Captioner
    from captioner.bulk import caption_bulk, plan
    from captioner.bulk.writers import AppendFile, Collect, text_line
    from captioner.io import atomic_write_text

    if ray is not None:
        if length_penalty is not None or not grounding:
            echo_error("--length-penalty and --no-grounding are not available with --ray yet")
            raise typer.Exit(EXIT_USER_ERROR)
        settings = {"model": model, "beam_size": beam_size, "max_length": max_length}
        settings.update(no_repeat_ngram_size=no_repeat_ngram, backend=backend)
        _caption_on_ray(
            ray,
            ray_workers,
            inputs,
            files_from,
            fmt,
            output,
            overwrite,
            batch_size,
            precision=precision,
            **settings,
        )
        return
    if fmt == "parquet":
        echo_error("--format parquet needs --ray (one machine: jsonl or csv)")
        raise typer.Exit(EXIT_USER_ERROR)
    if fmt not in FORMATS:
        echo_error(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        raise typer.Exit(EXIT_USER_ERROR)
    if fmt == "txt" and output is not None:
        echo_error("--format txt writes a .txt beside each image: leave out --output")
        raise typer.Exit(EXIT_USER_ERROR)
    check_choice("--backend", backend, BACKENDS)
    check_choice("--precision", precision, PRECISIONS)
    target = check_device(device)
    if not inputs and files_from is None:
        echo_error("nothing to caption: give image paths, folders, globs or --files-from")
        raise typer.Exit(EXIT_USER_ERROR)
    if output is not None:  # before any decoding, not after it
        check_writable(output, "--output")
    sink = _choose_sink(fmt, output, overwrite)
    try:
        work = plan(inputs or [], sink, [files_from] if files_from else [])
        for problem in work.problems:
            echo_error(problem)
        if not work.total:
            echo_error("no images found")
            raise typer.Exit(EXIT_USER_ERROR)
        if isinstance(sink, AppendFile) and sink.torn:
            typer.echo(f"{output}: cut off a torn last line (an interrupted run)", err=True)
        stats = None
        if work.todo:
            captioner = Captioner.from_pretrained(
                model, backend=backend, precision=precision, device=target
            )
            stats = caption_bulk(
                captioner,
                inputs or [],
                sink,
                files_from=[files_from] if files_from else [],
                batch_size=batch_size,
                total=work.todo,
                report=echo_error,
                progress=work.todo >= PROGRESS_MIN_IMAGES,
                beam_size=beam_size,
                max_length=max_length,
                no_repeat_ngram_size=no_repeat_ngram,
                length_penalty=length_penalty,
                grounding=grounding,
            )
    finally:
        sink.close()
    captioned = stats.captioned if stats else 0
    if isinstance(sink, Collect):
        rows = sink.records
        if fmt == "json":
            text = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
        else:
            text = "".join(text_line(r) for r in rows)
        if output is None:
            typer.echo(text, nl=False)
        else:
            try:
                atomic_write_text(output, text)
            except OSError as exc:
                raise DataError(f"{output}: cannot write ({exc.strerror or exc})") from exc
    skipped = work.total - work.todo
    if output is not None or fmt == "txt":
        where = "sidecar .txt files" if fmt == "txt" else str(output)
        done = f", {skipped} already there" if skipped else ""
        typer.echo(f"wrote {captioned} captions to {where}{done}", err=True)
    if stats and stats.captioned and stats.seconds >= 1:
        typer.echo(f"{stats.rate:.1f} images/s ({stats.seconds:.0f} s)", err=True)
    if stats and stats.out_of_domain:
        typer.secho(
            f"note: {stats.out_of_domain} of {captioned} photos are unlike the training photos "
            "(out of domain): their captions may well be wrong (--format jsonl shows the "
            "concepts and in-domain score of each)",
            fg=typer.colors.YELLOW,
            err=True,
        )
    failed = len(work.problems) + (stats.failed if stats else 0)
    if failed:
        typer.secho(
            f"{failed} input(s) failed, {captioned} captioned", fg=typer.colors.YELLOW, err=True
        )
        raise typer.Exit(1)


def _caption_on_ray(
    address, workers, inputs, files_from, fmt, output, overwrite, batch_size, **settings
) -> None:
    """caption --ray: the Ray Data runner (captioner.distributed), then the usual summary."""
    from captioner.distributed.ray_data import OUTPUT_FORMATS, caption_dataset

    check_choice("--backend", settings["backend"], BACKENDS)
    check_choice("--precision", settings["precision"], PRECISIONS)
    if fmt not in OUTPUT_FORMATS or output is None:
        echo_error("--ray writes a file: give --format jsonl or parquet and --output")
        raise typer.Exit(EXIT_USER_ERROR)
    if not inputs and files_from is None:
        echo_error("nothing to caption: give image paths, folders, globs or --files-from")
        raise typer.Exit(EXIT_USER_ERROR)
    check_writable(output, "--output")  # before the cluster starts
    stats = caption_dataset(
        inputs or [],
        output,
        address,
        workers,
        fmt,
        report=echo_error,
        files_from=[files_from] if files_from else [],
        overwrite=overwrite,
        batch_size=batch_size,
        **settings,
    )
    done = f", {stats.skipped} already there" if stats.skipped else ""
    typer.echo(f"wrote {stats.captioned} captions to {output}{done}", err=True)
    if stats.captioned and stats.seconds >= 1:
        typer.echo(f"{stats.rate:.1f} images/s ({stats.seconds:.0f} s)", err=True)
    if stats.failed:
        typer.secho(
            f"{stats.failed} input(s) failed, {stats.captioned} captioned",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(1)
