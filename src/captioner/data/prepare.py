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

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from captioner.data.captions import CaptionSet, read_captions
from captioner.data.image_source import FolderSource, ImageSource
from captioner.data.layouts import IMAGE_DIR_CANDIDATES, detect, find_images_dir, read_layout
from captioner.data.splits import Splits, make_splits
from captioner.data.vocab import SPECIAL_TOKENS, Vocabulary, tokenize
from captioner.data.webdataset_source import ShardSource
from captioner.errors import DataError
from captioner.io import atomic_write_json, read_json
from captioner.settings import check_folder_option

__all__ = ["IMAGE_DIR_CANDIDATES", "PrepareSettings", "PreparedData", "find_images_dir", "prepare"]


@dataclass(frozen=True)
class PrepareSettings:
    num_words: int | None = 5000
    min_count: int = 5
    test_size: float = 0.1
    val_size: float = 0.1
    seed: int = 0
    use_official_split: bool = True
    max_images: int | None = None  # a seeded subset of this many images (None: all of them)

    def to_json(self) -> dict:
        """As saved in dataset.json; max_images only when set, so work dirs prepared before it
        existed still match."""
        saved = asdict(self)
        if saved["max_images"] is None:
            del saved["max_images"]
        return saved


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
    log: Callable[[str], None] | None = None,
) -> PreparedData:
    """Read, split and build the vocabulary; refuse to mix with a different earlier run. A
    work dir already prepared with the same settings is loaded, silently; ``log`` hears when
    preparing actually starts."""
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    check_folder_option(work_dir, "--work-dir")
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    layout = detect(
        data_dir,
        Path(caption_file) if caption_file else None,
        Path(images_dir) if images_dir else None,
    )
    info = {**layout.info(), "settings": settings.to_json()}
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
    if log is not None:
        log(f"preparing {data_dir} into {work_dir}")
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
    kept = _subset(kept, settings, log)
    listed = {name: [i for i in ids if i in kept] for name, ids in caption_set.splits.items()}
    caption_set = CaptionSet(kept, listed, caption_set.source)
    splits = make_splits(
        caption_set,
        data_dir,
        test_size=settings.test_size,
        val_size=settings.val_size,
        seed=settings.seed,
        use_official=settings.use_official_split,
    )
    check_usable(splits, settings)
    train_captions = [c for name in splits.train for c in kept[name]]
    vocab = Vocabulary.build(train_captions, settings.num_words, settings.min_count)
    if len(vocab) == len(SPECIAL_TOKENS):
        raise DataError(
            f"no word of the training captions is seen {settings.min_count} times or more "
            f"(the most frequent, {most_frequent(train_captions)}): lower --min-count"
        )
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


def _subset(
    kept: dict[str, list[str]], settings: PrepareSettings, log: Callable[[str], None] | None
) -> dict[str, list[str]]:
    """--max-images: a seeded sample of the captioned images (the same seed, the same subset),
    in their file order; the split is then made within it."""
    limit = settings.max_images
    if not limit or len(kept) <= limit:
        return kept
    order = sorted(kept)
    random.Random(settings.seed).shuffle(order)
    chosen = set(order[:limit])
    if log is not None:
        log(f"using {limit:,} of the {len(kept):,} captioned images (--max-images)")
    return {name: caps for name, caps in kept.items() if name in chosen}


def check_usable(splits: Splits, settings: PrepareSettings) -> None:
    """Refuse a split that training cannot use: no training images, or a random split whose
    share rounds to zero images for dev (which validation needs) or test."""
    total = len(splits.train) + len(splits.val) + len(splits.test)
    if not splits.train:
        raise DataError(f"the split leaves no training images (of {total}): add images")
    if splits.settings.method != "random":
        return
    for split, name, share, flag in (
        ("val", "dev", settings.val_size, "--val-size"),
        ("test", "test", settings.test_size, "--test-size"),
    ):
        if share > 0 and not splits[split]:
            raise DataError(
                f"{flag} {share} of {total} images rounds to no {name} images: use at least "
                f"{int(0.5 / share) + 1} images or a larger {flag}"
            )


def most_frequent(captions: list[str]) -> str:
    """'"a", seen 12 times': the best a --min-count could keep."""
    counts = Counter(w for c in captions for w in tokenize(c))
    if not counts:
        return "none: the captions have no words"
    word, count = counts.most_common(1)[0]
    return f'"{word}", seen {count} times'
