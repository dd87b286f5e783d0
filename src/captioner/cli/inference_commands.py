"""caption, predict and evaluate (and export, from export_command): the inference side of the
CLI.

Each command only parses options, calls ``captioner.api`` (or the evaluation / export helpers)
and formats the result; a CaptionerError becomes one red line and exit code 2.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import typer

from captioner.cli.common import EXIT_USER_ERROR, MODEL_HELP, friendly_errors
from captioner.cli.export_command import check_parity, export_cmd, export_onnx
from captioner.features.quantize import DEFAULT_PRECISION, PRECISIONS
from captioner.settings import BACKENDS, check_choice

FORMATS = ("text", "json", "csv", "jsonl", "txt")
PROGRESS_MIN_IMAGES = 8  # show a progress bar from this many images on

WORK_DIR_HELP = "prepared work dir (from `captioner prepare`)"
BACKEND_HELP = "auto (ONNX Runtime, else PyTorch), onnx or torch"
NO_REPEAT_HELP = "never repeat an n-gram of this size in a caption (0 = off); default: the model's"
DEVICE_HELP = "auto (a CUDA GPU if visible), cpu or cuda (PyTorch on the GPU; ONNX is CPU only)"
PRECISION_HELP = (
    "encoder: fp32, int8 (made by `captioner export --precision int8`) or auto (fp32 for now: "
    "int8 costs the bundled model 0.31 BLEU-4, over the 0.3 bar)"
)


def check_device(device: str) -> str:
    """--device checked before anything is read or written: a missing GPU is one clear line
    (ConfigError, exit code 2). Returns the name for ``Captioner``."""
    from captioner.devices import resolve_device

    resolve_device(device)
    return device


def _err(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


FORMAT_HELP = (
    "text (path<TAB>caption per line), json (one array, written at the end), csv or jsonl "
    "(one record per image, appended per chunk and resumed with --output), or txt (a sidecar "
    "photo.txt beside each photo.jpg, resumed)"
)


def grounding_lines(result) -> list[str]:
    """What a grounded model adds to a caption, for people: the concepts and a plain warning."""
    if result.in_domain is None:
        return []
    seen = ", ".join(f"{w} {p:.2f}" for w, p in result.concepts) or "(nothing above 0.05)"
    lines = [f"concepts:   {seen}", f"in-domain:  {result.in_domain:.3f}"]
    if result.out_of_domain:
        lines.append(
            "warning:    this photo is unlike the training photos (out of domain): "
            "the caption may well be wrong"
        )
    return lines


def _legacy(record: dict) -> dict:
    """A bulk record in the text / JSON layout (the image key is called ``path``)."""
    return {"path": record["image"], **{k: v for k, v in record.items() if k != "image"}}


def _choose_sink(fmt: str, output: Path | None, overwrite: bool):
    """The bulk_writers sink for a format and destination."""
    from captioner.bulk_writers import AppendFile, Collect, Sidecars, Stream

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
    from captioner.bulk_writers import AppendFile, Collect
    from captioner.io import atomic_write_text

    if ray is not None:
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
        _err("--format parquet needs --ray (one machine: jsonl or csv)")
        raise typer.Exit(EXIT_USER_ERROR)
    if fmt not in FORMATS:
        _err(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        raise typer.Exit(EXIT_USER_ERROR)
    if fmt == "txt" and output is not None:
        _err("--format txt writes a .txt beside each image: leave out --output")
        raise typer.Exit(EXIT_USER_ERROR)
    check_choice("--backend", backend, BACKENDS)
    check_choice("--precision", precision, PRECISIONS)
    target = check_device(device)
    if not inputs and files_from is None:
        _err("nothing to caption: give image paths, folders, globs or --files-from")
        raise typer.Exit(EXIT_USER_ERROR)
    sink = _choose_sink(fmt, output, overwrite)
    try:
        work = plan(inputs or [], sink, [files_from] if files_from else [])
        for problem in work.problems:
            _err(problem)
        if not work.total:
            _err("no images found")
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
                report=_err,
                progress=work.todo >= PROGRESS_MIN_IMAGES,
                beam_size=beam_size,
                max_length=max_length,
                no_repeat_ngram_size=no_repeat_ngram,
            )
    finally:
        sink.close()
    captioned = stats.captioned if stats else 0
    if isinstance(sink, Collect):
        rows = [_legacy(r) for r in sink.records]
        if fmt == "json":
            text = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
        else:
            text = "".join(f"{r['path']}\t{r['caption']}\n" for r in rows)
        if output is None:
            typer.echo(text, nl=False)
        else:
            atomic_write_text(output, text)
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
        _err("--ray writes a file: give --format jsonl or parquet and --output")
        raise typer.Exit(EXIT_USER_ERROR)
    if not inputs and files_from is None:
        _err("nothing to caption: give image paths, folders, globs or --files-from")
        raise typer.Exit(EXIT_USER_ERROR)
    stats = caption_dataset(
        inputs or [],
        output,
        address,
        workers,
        fmt,
        report=_err,
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


@friendly_errors
def predict_cmd(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    work_dir: Path = typer.Option(Path("work/flickr8k"), "--work-dir", help=WORK_DIR_HELP),
    split: str = typer.Option("test", help="split to draw the random image from"),
    image: str | None = typer.Option(
        None,
        "--image",
        help="an image name from the dataset, or a path to any image file; default: a random "
        "image of --split",
    ),
    seed: int = typer.Option(0, min=0, help="which random image (without --image)"),
    beam_size: int | None = typer.Option(
        None, min=1, max=20, help="beam width (1 = greedy); default: the model's"
    ),
    max_length: int = typer.Option(20, min=1, max=100, help="most words per caption"),
    no_repeat_ngram: int | None = typer.Option(None, min=0, max=10, help=NO_REPEAT_HELP),
    out: Path = typer.Option(
        Path("predict.png"), "--out", "-o", help="attention figure (PNG) to write"
    ),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    precision: str = typer.Option(DEFAULT_PRECISION, help=PRECISION_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Caption one image, print it with the human references, draw the per-word attention.

    --image FILE needs no prepared dataset (references are shown when the file is one of the
    dataset's images); a bare image name, or no --image at all, looks in --work-dir."""
    from captioner.api import Captioner
    from captioner.data.images import load_image
    from captioner.viz.attention import render_attention_figure

    check_choice("--backend", backend, BACKENDS)
    check_choice("--precision", precision, PRECISIONS)
    target = check_device(device)
    path, references = _predict_image(image, work_dir, split, seed)
    rgb = load_image(path)
    captioner = Captioner.from_pretrained(
        model, backend=backend, precision=precision, device=target
    )
    result = captioner.caption(
        rgb, beam_size=beam_size, max_length=max_length, no_repeat_ngram_size=no_repeat_ngram
    )[0]
    typer.echo(f"image:      {path}")
    typer.echo(f"caption:    {result.caption}   (score {result.score:.3f})")
    for line in grounding_lines(result):
        typer.echo(line)
    if references:
        typer.echo("references:")
        for ref in references:
            typer.echo(f"  - {ref}")
    else:
        typer.echo("references: (none: the image is not part of the dataset)")
    written = render_attention_figure(rgb, result, out, references, grid_size=captioner.grid_size)
    typer.echo(f"wrote {written}")


def _predict_image(
    image: str | None, work_dir: Path, split: str, seed: int
) -> tuple[Path, list[str] | None]:
    """The image predict captions and its human references (None outside the dataset)."""
    from captioner.data.prepare import PreparedData
    from captioner.errors import DataError, ImageLoadError

    prepared_here = (work_dir / "dataset.json").is_file()
    if image is None:  # a random image of the split: needs the prepared dataset
        prepared = PreparedData.load(work_dir)
        names = prepared.splits[split]
        if not names:
            raise DataError(f"the {split} split of {work_dir} has no images")
        name = random.Random(seed).choice(names)
        return prepared.images_dir / name, prepared.captions[name]
    path = Path(image)
    if path.is_dir():
        raise ImageLoadError(
            f"{image} is a folder: predict takes one image file "
            "(`captioner caption FOLDER` captions every image in a folder)"
        )
    if path.is_file():
        if not prepared_here:
            return path, None
        prepared = PreparedData.load(work_dir)
        inside = path.resolve() == (prepared.images_dir / path.name).resolve()
        return path, prepared.captions.get(path.name) if inside else None
    if prepared_here:
        prepared = PreparedData.load(work_dir)
        if image in prepared.captions:  # an image name of the dataset
            return prepared.images_dir / image, prepared.captions[image]
        raise ImageLoadError(f"{image}: file not found (and not an image name of {work_dir})")
    raise ImageLoadError(f"{image}: file not found")


@friendly_errors
def evaluate_cmd(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    work_dir: Path = typer.Option(Path("work/flickr8k"), "--work-dir", help=WORK_DIR_HELP),
    split: str = typer.Option("test", help="train, val or test"),
    beam_size: int | None = typer.Option(
        None, min=1, max=20, help="beam width (1 = greedy); default: the model's"
    ),
    max_length: int = typer.Option(20, min=1, max=100, help="most words per caption"),
    no_repeat_ngram: int | None = typer.Option(None, min=0, max=10, help=NO_REPEAT_HELP),
    length_penalty: float | None = typer.Option(
        None,
        min=0.0,
        max=10.0,
        help="beam score = log-prob / length ** this (0 = none); default: the model's",
    ),
    batch_size: int = typer.Option(50, min=1, max=1024, help="images per decoding batch"),
    out_dir: Path | None = typer.Option(
        None, "--out-dir", help="where the report and results go; default runs/eval/<model>"
    ),
    no_java: bool = typer.Option(
        False, "--no-java", help="Python tokenizer, no METEOR (fast, no Java needed)"
    ),
    limit: int = typer.Option(0, min=0, help="only the first N images of the split (0 = all)"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    precision: str = typer.Option(
        DEFAULT_PRECISION,
        help="encoder: fp32 (feature cache when complete), int8 (encodes every image; "
        "calibrated on the work dir's training split if there is no int8 encoder yet) or auto "
        "(fp32 for now: int8 is over the quality bar for the bundled model)",
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Decode a whole split, print BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (0-100), save a report."""
    from captioner.evaluation.evaluate import evaluate
    from captioner.evaluation.metrics import format_scores

    check_choice("--backend", backend, BACKENDS)
    check_choice("--precision", precision, PRECISIONS)
    target = check_device(device)

    report = evaluate(
        model,
        work_dir,
        split,
        beam_size=beam_size,
        max_length=max_length,
        length_penalty=length_penalty,
        batch_size=batch_size,
        no_repeat_ngram_size=no_repeat_ngram,
        use_java=False if no_java else None,
        limit=limit,
        out_dir=out_dir,
        backend=backend,
        precision=precision,
        device=target,
    )
    typer.echo(
        f"{report['split']}: {report['n_images']} images, beam {report['beam_size']}, "
        f"{report['precision']} features {report['features']}, {report['time_s']:.1f} s"
    )
    typer.echo(format_scores(report["scores"]))
    typer.echo(f"wrote {report['report_file']}\nwrote {report['results_file']}")


__all__ = ["check_parity", "export_onnx", "register"]  # export helpers: re-exported


def register(app: typer.Typer) -> None:
    """Add caption, predict, evaluate and export to the main Typer app."""
    app.command("caption")(caption_cmd)
    app.command("predict")(predict_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("export")(export_cmd)
