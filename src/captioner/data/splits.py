"""Train/val/test splits by image (never by caption), saved once and reused."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from captioner.data.caption_set import SPLIT_NAMES, CaptionSet
from captioner.errors import DataError

# Flickr8k's official lists; the Karpathy split of Flickr8k is identical to them.
OFFICIAL_LIST_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


@dataclass(frozen=True)
class SplitSettings:
    """What decides a split; a saved split made with other settings is not silently reused."""

    method: str  # "official", "karpathy" or "random"
    test_size: float = 0.1
    val_size: float = 0.1
    seed: int = 0


@dataclass
class Splits:
    settings: SplitSettings
    train: list[str]
    val: list[str]
    test: list[str]

    def __getitem__(self, name: str) -> list[str]:
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def to_json(self) -> dict:
        return {"settings": asdict(self.settings), **{n: self[n] for n in SPLIT_NAMES}}

    @classmethod
    def from_json(cls, data: dict) -> Splits:
        return cls(SplitSettings(**data["settings"]), *(list(data[n]) for n in SPLIT_NAMES))


def read_official_lists(data_dir: Path) -> dict[str, list[str]] | None:
    paths = {name: data_dir / file for name, file in OFFICIAL_LIST_FILES.items()}
    if not all(p.is_file() for p in paths.values()):
        return None
    return {
        name: [line.strip() for line in p.read_text().splitlines() if line.strip()]
        for name, p in paths.items()
    }


def random_split(images: list[str], test_size: float, val_size: float, seed: int):
    if not (0 <= test_size < 1 and 0 <= val_size < 1 and test_size + val_size < 1):
        raise DataError(
            f"need 0 <= test_size, val_size and their sum < 1 (got {test_size}, {val_size})"
        )
    shuffled = sorted(images)
    random.Random(seed).shuffle(shuffled)
    n_test = round(len(shuffled) * test_size)
    n_val = round(len(shuffled) * val_size)
    test, val, train = (
        shuffled[:n_test],
        shuffled[n_test : n_test + n_val],
        shuffled[n_test + n_val :],
    )
    return train, val, test


def make_splits(
    captions: CaptionSet,
    data_dir: Path,
    *,
    test_size: float = 0.1,
    val_size: float = 0.1,
    seed: int = 0,
    use_official: bool = True,
) -> Splits:
    """Official lists when the dataset has them, else the caption file's split, else random."""
    official = read_official_lists(data_dir) if use_official else None
    if official is not None:
        known = set(captions.captions)
        lists = {name: [i for i in official[name] if i in known] for name in SPLIT_NAMES}
        missing = sum(len(official[n]) - len(lists[n]) for n in SPLIT_NAMES)
        if not lists["train"]:
            raise DataError(f"{data_dir}: none of the official training images has captions")
        if missing:
            print(f"note: {missing} images in the official lists have no captions; left out")
        return Splits(SplitSettings("official"), lists["train"], lists["val"], lists["test"])
    if use_official and captions.splits:
        s = captions.splits
        return Splits(
            SplitSettings("karpathy"), s.get("train", []), s.get("val", []), s.get("test", [])
        )
    train, val, test = random_split(list(captions.captions), test_size, val_size, seed)
    return Splits(SplitSettings("random", test_size, val_size, seed), train, val, test)
