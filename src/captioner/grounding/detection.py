"""The detector's say over person and animal words: a gate on every photo, in domain and out.

The decoder learnt from Flickr8k, where 77% of photos show a person and a quarter a dog, so it
names one in empty streets, tents and parked motorbikes, and nothing it learnt from those photos
can tell them apart (see docs/GROUNDING.md). The Open Images detector can: a caption may name a
person (dog, cat) only as far as the detector sees one. For each gated class the penalty on its
words (:mod:`captioner.features.detector_words`) is

    strength * min(0, log((p + eps) / (threshold + eps)))      nats, capped at ``max_penalty``

where ``p`` is the detector's presence probability and ``threshold`` the probability below which
only a few of the dev photos whose every reference names the class fall (a quantile chosen on
dev, so the gate rarely hits a photo that really shows one). Above the threshold nothing changes;
below it the word costs more the less the detector sees. The penalty is added to the decoder's
logits like the concepts' word bias, so a word the decoder is very sure of can still win.

The detector runs only where its answer can change the caption: on photos whose caption names a
gated word (then they are decoded again with the gate) and on out-of-domain photos (where its
classes join the concepts); the rest keep the caption decoded without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from captioner.features.detector import DetectorOutput
from captioner.features.detector_words import GROUP_WORDS, LABEL_WORDS, display_name

GATED_LABELS = ("Person", "Dog", "Cat")
GROUP = "group"  # the pseudo-label of GROUP_WORDS: doubted only when every gated class is
EPSILON = 0.01
MIN_POSITIVES = 20  # dev photos showing a class needed before its threshold is trusted


@dataclass
class DetectionGate:
    thresholds: dict[str, float]  # gated label -> presence probability below which it is doubted
    strength: float  # nats per unit of log ratio below the threshold (0: no gate)
    max_penalty: float = 10.0  # cap of the penalty, in nats

    def __post_init__(self) -> None:
        unknown = set(self.thresholds) - set(LABEL_WORDS)
        if unknown:
            raise ValueError(f"unknown detector labels in the gate: {sorted(unknown)}")
        if self.strength < 0 or self.max_penalty < 0:
            raise ValueError("gate strength and max_penalty must be >= 0")
        if any(not 0 <= t < 1 for t in self.thresholds.values()):
            raise ValueError("gate thresholds must be in [0, 1)")

    @property
    def active(self) -> bool:
        return self.strength > 0 and bool(self.thresholds)

    def gated_ids(self, itos: list[str]) -> dict[str, np.ndarray]:
        """label -> (k,) vocabulary ids of the words it gates (``GROUP``: the group nouns)."""
        words = {label: LABEL_WORDS[label] for label in self.thresholds}
        if words:
            words[GROUP] = GROUP_WORDS
        return {
            label: np.array([i for i, w in enumerate(itos) if w in group], np.int64)
            for label, group in words.items()
        }

    def names_gated_word(self, token_ids: list[int], gated: dict[str, np.ndarray]) -> bool:
        """Whether a decoded caption names a word the gate could penalise."""
        ids = set(token_ids)
        return any(ids.intersection(v.tolist()) for v in gated.values())

    def bias(
        self, detections: DetectorOutput, gated: dict[str, np.ndarray], vocab_size: int
    ) -> np.ndarray:
        """(B, V) float32 penalties (<= 0) for the photos the detections describe."""
        bias = np.zeros((len(detections.probabilities), vocab_size), dtype=np.float32)
        least = None  # (B,) the mildest penalty over the gated classes: what a group noun gets
        for label, threshold in self.thresholds.items():
            p = detections.of(label).astype(np.float64)  # (B,)
            ratio = np.log((p + EPSILON) / (threshold + EPSILON))
            penalty = np.maximum(self.strength * np.minimum(ratio, 0.0), -self.max_penalty)
            bias[:, gated[label]] = penalty[:, None]
            least = penalty if least is None else np.maximum(least, penalty)
        if least is not None and GROUP in gated:
            bias[:, gated[GROUP]] = least[:, None]
        return bias


def detector_concepts(detections: DetectorOutput, min_prob: float) -> list[list[tuple[str, float]]]:
    """Per photo, the detector's classes seen with at least ``min_prob``, as concept words
    ("person", 0.74), best first: what ImageNet's head cannot list."""
    out = []
    for row in detections.probabilities:
        seen = [
            (display_name(label), round(float(p), 3))
            for label, p in zip(detections.labels, row, strict=True)
            if p >= min_prob and LABEL_WORDS.get(label)
        ]
        out.append(sorted(seen, key=lambda c: -c[1]))
    return out


def dev_thresholds(
    probabilities: dict[str, np.ndarray], shows: dict[str, np.ndarray], quantile: float
) -> dict[str, float]:
    """label -> the ``quantile`` of the detector's probability over the dev photos that show the
    class (every reference names it): the gate then doubts that share of such photos at most."""
    out = {}
    for label, p in probabilities.items():
        positive = np.asarray(p)[np.asarray(shows[label], dtype=bool)]
        if len(positive) < MIN_POSITIVES:
            continue  # too few dev photos show it to calibrate against (Flickr8k's cats): no gate
        out[label] = round(float(np.quantile(positive, quantile)), 4)
    return out
