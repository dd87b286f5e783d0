"""`captioner prepare`: captions + split + vocabulary, written once into a work directory.

Work directory layout (every later stage reads only this):
    dataset.json   where the data came from and the settings used
    captions.json  {image: [caption, ...]} for the images that exist on disk
    splits.json    {"settings": ..., "train": [...], "val": [...], "test": [...]}
    vocab.json     vocabulary built from the training captions only
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.data.captions import CaptionSet, find_caption_file, read_captions
from captioner.data.splits import Splits, make_splits
from captioner.data.vocab import Vocabulary
from captioner.errors import DataError
from captioner.io import atomic_write_json, read_json

IMAGE_DIR_CANDIDATES = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", ".")


@dataclass(frozen=True)
class PrepareSettings:
    num_words: int | None = 5000
    min_count: int = 5
    test_size: float = 0.1
    val_size: float = 0.1
    seed: int = 0
    use_official_split: bool = True


@dataclass
class PreparedData:
    """Everything `prepare` wrote, loaded back."""

    work_dir: Path
    images_dir: Path
    captions: dict[str, list[str]]
    splits: Splits
    vocab: Vocabulary

    @classmethod
    def load(cls, work_dir: str | Path) -> PreparedData:
        work_dir = Path(work_dir)
        if not (work_dir / "dataset.json").is_file():
            raise DataError(
                f"{work_dir} is not a prepared work directory (run `captioner prepare`)"
            )
        info = read_json(work_dir / "dataset.json")
        return cls(
            work_dir,
            Path(info["images_dir"]),
            read_json(work_dir / "captions.json"),
            Splits.from_json(read_json(work_dir / "splits.json")),
            Vocabulary.load(work_dir / "vocab.json"),
        )


def find_images_dir(data_dir: Path) -> Path:
    for candidate in IMAGE_DIR_CANDIDATES:
        folder = data_dir / candidate
        if folder.is_dir() and any(
            p.suffix.lower() in (".jpg", ".jpeg", ".png") for p in folder.iterdir()
        ):
            return folder.resolve()
    raise DataError(
        f"{data_dir}: no image folder found (looked for {', '.join(IMAGE_DIR_CANDIDATES)})"
    )


def prepare(
    data_dir: str | Path,
    work_dir: str | Path,
    settings: PrepareSettings = PrepareSettings(),
    *,
    caption_file: str | Path | None = None,
    images_dir: str | Path | None = None,
    force: bool = False,
) -> PreparedData:
    """Read, split and build the vocabulary; refuse to mix with a different earlier run."""
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    caption_path = Path(caption_file) if caption_file else find_caption_file(data_dir)
    images = Path(images_dir).resolve() if images_dir else find_images_dir(data_dir)
    info = {
        "data_dir": str(data_dir.resolve()),
        "caption_file": str(caption_path.resolve()),
        "images_dir": str(images),
        "settings": asdict(settings),
    }
    info_path = work_dir / "dataset.json"
    if info_path.is_file() and not force:
        saved = read_json(info_path)
        if saved == info:
            return PreparedData.load(work_dir)
        changed = sorted(k for k in info if saved.get(k) != info[k])
        raise DataError(
            f"{work_dir} was prepared with different {', '.join(changed)} "
            f"(saved: { {k: saved.get(k) for k in changed} }); use another --work-dir, or --force "
            "to redo it (features and models made from the old one must then be rebuilt)"
        )
    caption_set = read_captions(caption_path)
    present = {p.name for p in images.iterdir()}
    kept = {name: caps for name, caps in caption_set.captions.items() if Path(name).name in present}
    if not kept:
        raise DataError(f"none of the {len(caption_set.captions)} captioned images is in {images}")
    missing = len(caption_set.captions) - len(kept)
    if missing:
        print(f"note: {missing} captioned images are not in {images}; left out")
    caption_set = CaptionSet(kept, caption_set.splits, caption_set.source)
    splits = make_splits(
        caption_set,
        data_dir,
        test_size=settings.test_size,
        val_size=settings.val_size,
        seed=settings.seed,
        use_official=settings.use_official_split,
    )
    train_captions = (c for name in splits.train for c in kept[name])
    vocab = Vocabulary.build(train_captions, settings.num_words, settings.min_count)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work_dir / "captions.json", kept)
    atomic_write_json(work_dir / "splits.json", splits.to_json())
    vocab.save(work_dir / "vocab.json")
    atomic_write_json(info_path, info)  # last: its presence means the rest is complete
    return PreparedData(work_dir, images, kept, splits, vocab)
