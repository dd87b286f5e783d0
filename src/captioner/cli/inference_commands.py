"""caption, predict and evaluate (and export, from export_command): the inference side of the
CLI.

Each command only parses options, calls ``captioner.api`` (or the evaluation / export helpers)
and formats the result; a CaptionerError becomes one red line and exit code 2.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import random
import sys
from pathlib import Path

import typer

from captioner.cli.common import EXIT_USER_ERROR, MODEL_HELP, friendly_errors
from captioner.cli.export_command import check_parity, export_cmd, export_onnx
from captioner.settings import BACKENDS, check_choice

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
FORMATS = ("text", "json", "csv")
PROGRESS_MIN_IMAGES = 8  # show a progress bar from this many images on

WORK_DIR_HELP = "prepared work dir (from `captioner prepare`)"
BACKEND_HELP = "auto (ONNX Runtime, else PyTorch), onnx or torch"
NO_REPEAT_HELP = "never repeat an n-gram of this size in a caption (0 = off); default: the model's"


def _err(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted) and glob patterns -> (image paths, problems).

    A file named explicitly is kept whatever its extension (a non-image is reported when it is
    read); in folders and globs only the image extensions count. Duplicates are dropped.
    """
    paths: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                problems.append(f"{item}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(item):
            found = sorted(
                Path(p)
                for p in glob.glob(item, recursive=True)
                if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                problems.append(f"{item}: no images match this pattern")
            paths += found
        else:
            problems.append(f"{item}: no such file or folder")
    return list(dict.fromkeys(paths)), problems


def format_rows(rows: list[dict], fmt: str, header: bool = True) -> str:
    """rows of {"path", "caption", "score"} -> text (path<TAB>caption), JSON or CSV."""
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=["path", "caption", "score"], lineterminator="\n"
        )
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    return "".join(f"{row['path']}\t{row['caption']}\n" for row in rows)


@friendly_errors
def caption_cmd(
    inputs: list[str] = typer.Argument(
        ...,
        metavar="PATH",
        help="image files, folders of images, or glob patterns such as 'photos/*.jpg'",
    ),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    beam_size: int | None = typer.Option(
        None, min=1, max=20, help="beam width (1 = greedy); default: the model's"
    ),
    max_length: int = typer.Option(20, min=1, max=100, help="most words per caption"),
    no_repeat_ngram: int | None = typer.Option(None, min=0, max=10, help=NO_REPEAT_HELP),
    fmt: str = typer.Option(
        "text", "--format", "-f", help="text (path<TAB>caption per line), json or csv"
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="write here (atomically) instead of stdout"
    ),
    batch_size: int = typer.Option(16, min=1, max=256, help="images per model call"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
) -> None:
    """Caption images. Unreadable files are reported on stderr and skipped (exit code 1)."""
    from captioner.api import Captioner
    from captioner.data.images import load_image
    from captioner.errors import ImageLoadError
    from captioner.io import atomic_write_text
    from captioner.progress import progress_bar

    if fmt not in FORMATS:
        _err(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        raise typer.Exit(EXIT_USER_ERROR)
    check_choice("--backend", backend, BACKENDS)
    paths, problems = expand_inputs(inputs)
    for problem in problems:
        _err(problem)
    if not paths:
        _err("no images found")
        raise typer.Exit(EXIT_USER_ERROR)
    captioner = Captioner.from_pretrained(model, backend=backend)

    stream = output is None and fmt != "json"  # text and CSV go out batch by batch
    rows: list[dict] = []
    failed = len(problems)
    bar = progress_bar(
        total=len(paths),
        unit="img",
        file=sys.stderr,
        desc="caption",
        disable=len(paths) < PROGRESS_MIN_IMAGES,
    )
    for start in range(0, len(paths), batch_size):
        batch, arrays = [], []
        for path in paths[start : start + batch_size]:
            try:  # one by one: a bad file must not sink its batch
                arrays.append(load_image(path))
                batch.append(path)
            except ImageLoadError as exc:
                bar.clear()
                _err(str(exc))
                failed += 1
        new_rows = []
        if arrays:
            results = captioner.caption(
                arrays,
                beam_size=beam_size,
                max_length=max_length,
                no_repeat_ngram_size=no_repeat_ngram,
                return_attention=False,
            )
            new_rows = [
                {"path": str(p), "caption": r.caption, "score": round(r.score, 4)}
                for p, r in zip(batch, results, strict=True)
            ]
        if stream and new_rows:
            bar.clear()
            typer.echo(format_rows(new_rows, fmt, header=not rows), nl=False)
        rows += new_rows
        bar.update(len(paths[start : start + batch_size]))
    bar.close()
    if output is not None:
        atomic_write_text(output, format_rows(rows, fmt))
        typer.echo(f"wrote {len(rows)} captions to {output}", err=True)
    elif not stream:
        typer.echo(format_rows(rows, fmt), nl=False)
    if failed:
        typer.secho(
            f"{failed} input(s) failed, {len(rows)} captioned", fg=typer.colors.YELLOW, err=True
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
) -> None:
    """Caption one image, print it with the human references, draw the per-word attention.

    --image FILE needs no prepared dataset (references are shown when the file is one of the
    dataset's images); a bare image name, or no --image at all, looks in --work-dir."""
    from captioner.api import Captioner
    from captioner.data.images import load_image
    from captioner.viz.attention import render_attention_figure

    check_choice("--backend", backend, BACKENDS)
    path, references = _predict_image(image, work_dir, split, seed)
    rgb = load_image(path)
    captioner = Captioner.from_pretrained(model, backend=backend)
    result = captioner.caption(
        rgb, beam_size=beam_size, max_length=max_length, no_repeat_ngram_size=no_repeat_ngram
    )[0]
    typer.echo(f"image:      {path}")
    typer.echo(f"caption:    {result.caption}   (score {result.score:.3f})")
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
) -> None:
    """Decode a whole split, print BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (0-100), save a report."""
    from captioner.evaluation.evaluate import evaluate
    from captioner.evaluation.metrics import format_scores

    check_choice("--backend", backend, BACKENDS)

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
    )
    typer.echo(
        f"{report['split']}: {report['n_images']} images, beam {report['beam_size']}, "
        f"features {report['features']}, {report['time_s']:.1f} s"
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
