"""predict and evaluate (and caption, export from their own modules): the inference side of
the CLI.

Each command only parses options, calls ``captioner.api`` (or the evaluation / export helpers)
and formats the result; a CaptionerError becomes one red line and exit code 2.
"""

from __future__ import annotations

import random
from pathlib import Path

import typer

from captioner.cli.caption_command import caption_cmd
from captioner.cli.common import MODEL_HELP, check_writable, friendly_errors
from captioner.cli.export_command import check_parity, export_cmd, export_onnx
from captioner.cli.inference_options import (
    BACKEND_HELP,
    DEVICE_HELP,
    EVALUATE_PRECISION_HELP,
    GROUNDING_OPTION,
    LENGTH_PENALTY_OPTION,
    NO_REPEAT_HELP,
    PRECISION_HELP,
    WORK_DIR_HELP,
    check_device,
    grounding_lines,
)
from captioner.errors import ConfigError
from captioner.features.quantize import DEFAULT_PRECISION, PRECISIONS
from captioner.settings import BACKENDS, check_choice


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
    length_penalty: float | None = LENGTH_PENALTY_OPTION,
    out: Path = typer.Option(
        Path("predict.png"), "--out", "-o", help="attention figure to write (a .png file)"
    ),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    precision: str = typer.Option(DEFAULT_PRECISION, help=PRECISION_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    grounding: bool = GROUNDING_OPTION,
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
    check_writable(out, "--out")
    if out.suffix.lower() != ".png":  # the figure is PNG: x.pdf would hold PNG bytes
        raise ConfigError(f"--out {out}: the figure is written as PNG, so give a .png file name")
    path, references = _predict_image(image, work_dir, split, seed)
    rgb = load_image(path)
    captioner = Captioner.from_pretrained(
        model, backend=backend, precision=precision, device=target
    )
    result = captioner.caption(
        rgb,
        beam_size=beam_size,
        max_length=max_length,
        no_repeat_ngram_size=no_repeat_ngram,
        length_penalty=length_penalty,
        grounding=grounding,
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
    length_penalty: float | None = LENGTH_PENALTY_OPTION,
    batch_size: int = typer.Option(50, min=1, max=1024, help="images per decoding batch"),
    out_dir: Path | None = typer.Option(
        None,
        "--out-dir",
        help="where the report and results go; default runs/eval/<model> "
        "(<run>-best for a trained run's best/)",
    ),
    no_java: bool = typer.Option(
        False, "--no-java", help="Python tokenizer, no METEOR (fast, no Java needed)"
    ),
    limit: int = typer.Option(0, min=0, help="only the first N images of the split (0 = all)"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    precision: str = typer.Option(
        DEFAULT_PRECISION,
        help=EVALUATE_PRECISION_HELP,
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    grounding: bool = GROUNDING_OPTION,
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
        grounding=grounding,
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
