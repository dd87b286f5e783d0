"""prepare, vocab-sample, features and preview: the data side of the CLI."""

from __future__ import annotations

import random
from pathlib import Path

import typer

from captioner.cli.common import friendly_errors
from captioner.cli.disk_errors import disk_full_is_one_line
from captioner.settings import BACKENDS, cap_threads, check_choice

AUGMENT_STRENGTHS = ("light", "medium", "strong")

DATA_DIR_HELP = (
    "dataset folder, detected in this order: a caption file (captions.txt, Flickr8k.token.txt, "
    "dataset_*.json, captions_*.json) and an images folder; a CSV/TSV/JSONL manifest of "
    "(image, caption); WebDataset tar shards (KEY.jpg + KEY.txt, read in place); or images "
    "with a sidecar NAME.txt of captions"
)
SHOWN_BAD = 5  # left-out rows named in prepare's summary


def _note(message: str) -> None:
    typer.echo(message, err=True)


@friendly_errors
@disk_full_is_one_line("prepare")
def prepare_cmd(
    data_dir: Path = typer.Option(..., "--data-dir", help=DATA_DIR_HELP),
    work_dir: Path = typer.Option(
        Path("work/flickr8k"), "--work-dir", help="where prepared files go"
    ),
    num_words: int = typer.Option(
        5000, min=0, help="keep at most this many words (top-k; 0 = no limit)"
    ),
    min_count: int = typer.Option(
        5, min=1, help="drop words seen fewer times in training captions"
    ),
    test_size: float = typer.Option(
        0.1, min=0.0, max=1.0, help="test share for a random split (no official lists)"
    ),
    val_size: float = typer.Option(0.1, min=0.0, max=1.0, help="dev share for a random split"),
    seed: int = typer.Option(0, min=0, help="seed of the random split"),
    official_split: bool = typer.Option(
        True, help="use the dataset's own split lists when present"
    ),
    force: bool = typer.Option(False, help="redo a work dir prepared with other settings"),
    caption_file: Path | None = typer.Option(
        None, "--caption-file", help="this caption file or manifest instead of the detected one"
    ),
    images_dir: Path | None = typer.Option(
        None, "--images-dir", help="the images folder (default: found in --data-dir)"
    ),
    max_images: int = typer.Option(
        0,
        "--max-images",
        min=0,
        help="use a seeded subset of this many captioned images (0 = all): a quick first run "
        "on a large dataset",
    ),
) -> None:
    """Read captions, split by image (saved), build the vocabulary (saved)."""
    from captioner.data.prepare import PrepareSettings, prepare

    settings = PrepareSettings(
        num_words or None,
        min_count,
        test_size,
        val_size,
        seed,
        official_split,
        max_images=max_images or None,
    )
    data = prepare(
        data_dir,
        work_dir,
        settings,
        caption_file=caption_file,
        images_dir=images_dir,
        force=force,
        log=typer.echo,
    )
    s = data.splits
    typer.echo(
        f"{data.format}: {len(data.captions):,} images, "
        f"{sum(map(len, data.captions.values())):,} captions"
    )
    bad = sum(data.bad.values())
    if bad:
        reasons = ", ".join(f"{n:,} {reason}" for reason, n in sorted(data.bad.items()))
        typer.echo(f"left out {bad:,} bad rows: {reasons}")
        for example in data.bad_examples[:SHOWN_BAD]:
            typer.echo(f"  {example}")
    elif data.format != "captions":
        typer.echo("left out 0 bad rows")
    typer.echo(
        f"split ({s.settings.method}): train {len(s.train):,} / val {len(s.val):,} / "
        f"test {len(s.test):,} images"
    )
    typer.echo(f"vocabulary: {len(data.vocab):,} tokens -> {work_dir / 'vocab.json'}")


@friendly_errors
def vocab_sample_cmd(
    work_dir: Path = typer.Option(Path("work/flickr8k"), "--work-dir", help="prepared work dir"),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="prepare from here first if needed"
    ),
    seed: int = typer.Option(0, min=0, help="which two captions to show"),
) -> None:
    """Build (or load) the vocabulary, save it, load it back, tokenize two captions."""
    from captioner.data.prepare import PreparedData, prepare
    from captioner.data.vocab import Vocabulary, tokenize

    data = prepare(data_dir, work_dir) if data_dir else PreparedData.load(work_dir)
    vocab = Vocabulary.load(work_dir / "vocab.json")  # the saved one, round-tripped
    typer.echo(
        f"vocabulary {work_dir / 'vocab.json'}: {len(vocab)} tokens; first 12: {vocab.itos[:12]}"
    )
    rng = random.Random(seed)
    for name in rng.sample(data.splits.train, 2):
        caption = rng.choice(data.captions[name])
        ids = vocab.encode(caption)
        typer.echo(
            f"\n{name}\n  caption: {caption}\n  words:   {tokenize(caption)}\n"
            f"  ids:     {ids}\n  tokens:  {[vocab.itos[i] for i in ids]}\n"
            f"  decoded: {vocab.decode(ids)}"
        )


@friendly_errors
@disk_full_is_one_line("features")
def features_cmd(
    work_dir: Path = typer.Option(Path("work/flickr8k"), "--work-dir", help="prepared work dir"),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="prepare from here first if needed"
    ),
    encoder: str = typer.Option(
        "efficientnet-lite0", help="efficientnet-lite0, -lite1, -lite2 or -lite2-224"
    ),
    backend: str = typer.Option("auto", help="auto (ONNX Runtime, else PyTorch), onnx or torch"),
    augment: int = typer.Option(
        0, "--augment", min=0, max=100, help="K augmented views per training image"
    ),
    augment_strength: str = typer.Option("medium", help="light, medium or strong"),
    seed: int = typer.Option(0, min=0, help="augmentation seed"),
    batch_size: int = typer.Option(16, min=1, max=1024, help="images per encoder call"),
    threads: int = typer.Option(0, min=0, max=1024, help="CPU threads for the encoder (0 = all)"),
    device: str = typer.Option("auto", help="auto (a CUDA GPU if visible), cpu or cuda"),
) -> None:
    """Extract and cache encoder features (resumable; stale caches are rebuilt)."""
    from captioner.data.prepare import PreparedData, prepare
    from captioner.devices import resolve_device
    from captioner.features.pipeline import ensure_features

    check_choice("--backend", backend, BACKENDS)
    target = resolve_device(device)  # before preparing anything: a missing GPU changes nothing
    check_choice("--augment-strength", augment_strength, AUGMENT_STRENGTHS)

    data = prepare(data_dir, work_dir) if data_dir else PreparedData.load(work_dir)
    dirs = ensure_features(
        data,
        encoder,
        backend=backend,
        augment_views=augment,
        augment_strength=augment_strength,
        augment_seed=seed,
        batch_size=batch_size,
        threads=cap_threads(threads, log=_note) or None,
        device=target,
        verify=True,  # hash every shard: a damaged one is extracted again
    )
    for view, path in dirs.items():
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        typer.echo(f"view {view}: {path} ({size / 2**20:,.0f} MiB)")


preview_app = typer.Typer(help="Render comparison pictures of preprocessing.", no_args_is_help=True)


@preview_app.command("normalize")
@friendly_errors
def preview_normalize(
    image: Path = typer.Argument(..., help="any photo"),
    out: Path = typer.Option(Path("normalize_preview.png"), "--out", "-o", help="PNG to write"),
    encoder: str = typer.Option(
        "efficientnet-lite0", help="whose preprocessing the last panel shows"
    ),
) -> None:
    """Five panels: original, min-max, mean-std, per-channel, encoder preprocessing."""
    from captioner.data.images import load_image
    from captioner.viz.previews import render_normalize_preview

    path = render_normalize_preview(load_image(image), out, encoder=encoder)
    typer.echo(f"wrote {path}")


@preview_app.command("augment")
@friendly_errors
def preview_augment(
    image: Path = typer.Argument(..., help="any photo"),
    out: Path = typer.Option(Path("augment_preview.png"), "--out", "-o", help="PNG to write"),
    n: int = typer.Option(8, "-n", min=1, max=64, help="augmented views to show"),
    seed: int = typer.Option(0, min=0, help="seed of the first view"),
    strength: str = typer.Option("medium", help="light, medium or strong"),
) -> None:
    """A grid of the original and N augmented views."""
    check_choice("--strength", strength, AUGMENT_STRENGTHS)
    from captioner.data.images import load_image
    from captioner.viz.previews import render_augment_preview

    path = render_augment_preview(load_image(image), out, n=n, seed=seed, strength=strength)
    typer.echo(f"wrote {path}")
