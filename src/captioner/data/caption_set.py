"""CaptionSet: what every caption reader returns (captions by image, the file's own split,
the rows left out).

It lives on its own so that the readers (``captions.py`` for Flickr8k/Karpathy/COCO files,
``manifests.py`` for CSV/TSV/JSONL manifests and sidecar folders) share it without importing
each other in a circle: ``captions`` imports ``manifests``, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPLIT_NAMES = ("train", "val", "test")
MAX_BAD_EXAMPLES = 10  # bad rows named in the report; the rest are only counted


@dataclass
class CaptionSet:
    """Captions of a dataset, grouped by image, in file order."""

    captions: dict[str, list[str]]
    # split name -> image names, when the caption file itself defines a split (Karpathy JSON)
    splits: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    # rows left out, by reason ("empty caption": 3, "missing image": 1...); a large dataset
    # always has some, and they are counted and reported instead of stopping the run
    bad: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def note_bad(self, reason: str, where: str) -> None:
        """Count one left-out row; keep the first few places for the report."""
        self.bad[reason] = self.bad.get(reason, 0) + 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append(f"{where}: {reason}")
