"""`captioner prepare`: captions + split + vocabulary, written once into a work directory.

Work directory layout (every later stage reads only this):
    dataset.json   where the data came from and the settings used
    captions.json  {image: [caption, ...]} for the images that exist on disk
    splits.json    {"settings": ..., "train": [...], "val": [...], "test": [...]}
    vocab.json     vocabulary built from the training captions only
    shards.json    (WebDataset shards only) where each image's bytes lie in its shard

Any layout ``data/layouts.py`` detects is read: caption files, CSV/TSV/JSONL manifests, tar
shards, folders of images with sidecar captions. Rows left out (missing or corrupt images,
empty captions, malformed rows) are counted in ``PreparedData.bad`` and reported, never fatal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from captioner.data.captions import CaptionSet, read_captions
from captioner.data.image_source import FolderSource, ImageSource
from captioner.data.layouts import IMAGE_DIR_CANDIDATES, detect, find_images_dir, read_layout
from captioner.data.splits import Splits, make_splits
from captioner.data.vocab import Vocabulary
from captioner.data.webdataset_source import ShardSource
from captioner.errors import DataError
from captioner.io import atomic_write_json, read_json

__all__ = ["IMAGE_DIR_CANDIDATES", "PrepareSettings", "PreparedData", "find_images_dir", "prepare"]


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
    format: str = "captions"  # see data/layouts.py
    # rows left out by this prepare run (reason -> count) and the first few of them
    bad: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)
    source: ImageSource | None = field(default=None, repr=False)

    @property
    def image_source(self) -> ImageSource:
        """Where the feature cache reads the images: the folder, or the tar shards in place."""
        if self.source is None:
            if self.format == "webdataset":
                self.source = ShardSource.load(self.work_dir)
            else:
                self.source = FolderSource(self.images_dir)
        return self.source

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
            info.get("format", "captions"),
            info.get("bad", {}),
            info.get("bad_examples", []),
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
    layout = detect(
        data_dir,
        Path(caption_file) if caption_file else None,
        Path(images_dir) if images_dir else None,
    )
    info = {**layout.info(), "settings": asdict(settings)}
    info_path = work_dir / "dataset.json"
    if info_path.is_file() and not force:
        saved = read_json(info_path)
        # a manifest's image folder, when not given, is derived from the manifest: not compared
        compared = {k: v for k, v in info.items() if not (k == "images_dir" and layout.derived)}
        if {k: saved.get(k) for k in compared} == compared and set(saved) - set(info) <= (
            _REPORT_KEYS
        ):
            return PreparedData.load(work_dir)
        changed = sorted(k for k in compared if saved.get(k) != compared[k])
        raise DataError(
            f"{work_dir} was prepared with different {', '.join(changed)} "
            f"(saved: { {k: saved.get(k) for k in changed} }); use another --work-dir, or --force "
            "to redo it (features and models made from the old one must then be rebuilt)"
        )
    caption_set, source = read_layout(layout, read_captions)
    images = layout.images_dir
    info["images_dir"] = str(images)  # a manifest's image root is chosen while reading
    if layout.format == "captions":
        present = {p.name for p in images.iterdir()}
        kept = {
            name: caps for name, caps in caption_set.captions.items() if Path(name).name in present
        }
        missing = len(caption_set.captions) - len(kept)
        if not kept:
            raise DataError(
                f"none of the {len(caption_set.captions)} captioned images is in {images}"
            )
        if missing:
            print(f"note: {missing} captioned images are not in {images}; left out")
            caption_set.bad["missing image"] = caption_set.bad.get("missing image", 0) + missing
    else:
        kept = caption_set.captions
        if not kept:
            raise DataError(
                f"{data_dir}: no usable image with a caption "
                f"({_bad_summary(caption_set.bad) or 'nothing found'})"
            )
    bad, bad_examples = dict(caption_set.bad), list(caption_set.bad_examples)
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
    if isinstance(source, ShardSource):
        source.index_path = source.save(work_dir)
    report = {"bad": bad, "bad_examples": bad_examples} if layout.format != "captions" else {}
    atomic_write_json(info_path, {**info, **report})  # last: its presence means all is there
    return PreparedData(
        work_dir, images, kept, splits, vocab, layout.format, bad, bad_examples, source
    )


_REPORT_KEYS = {"bad", "bad_examples"}  # dataset.json keys that describe a run, not its inputs


def _bad_summary(bad: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(bad.items()))
