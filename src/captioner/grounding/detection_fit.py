"""Calibrate the detector's gate on a model's dev split (what `captioner ground` runs).

The thresholds depend on the detector and the captions' words, not on the caption model, so any
model gets them the same way: run the detector over the dev photos and take, per gated class,
the probability below which ``quantile`` of the dev photos whose every reference names the
class fall (:func:`captioner.grounding.detection.dev_thresholds`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from captioner.data.images import load_image
from captioner.data.prepare import PreparedData
from captioner.data.vocab import tokenize
from captioner.features.detector import ObjectDetector
from captioner.features.detector_words import LABEL_WORDS
from captioner.grounding.detection import GATED_LABELS, dev_thresholds

DEFAULT_QUANTILE = 0.10  # the bundle's dev choice (docs/GROUNDING.md)
BATCH = 32


def every_reference_names(references: list[str], words: frozenset[str]) -> bool:
    return bool(references) and all(words.intersection(tokenize(r)) for r in references)


def fit_gate_thresholds(
    prepared: PreparedData,
    quantile: float = DEFAULT_QUANTILE,
    detector: ObjectDetector | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, float], dict]:
    """(label -> threshold, a report for grounding.json) from the dev split's photos."""
    detector = detector or ObjectDetector.from_pretrained()
    names = list(prepared.splits["val"])
    source = prepared.image_source
    rows = []
    for start in tqdm(range(0, len(names), BATCH), desc="detector on dev", leave=False):
        chunk = names[start : start + BATCH]
        rows.append(detector([load_image(source.locate(n)) for n in chunk]).probabilities)
    probs = np.concatenate(rows) if rows else np.zeros((0, len(detector.labels)), np.float32)
    columns = {label: probs[:, detector.labels.index(label)] for label in GATED_LABELS}
    shows = {
        label: np.array(
            [every_reference_names(prepared.captions.get(n, []), LABEL_WORDS[label]) for n in names]
        )
        for label in GATED_LABELS
    }
    thresholds = dev_thresholds(columns, shows, quantile)
    report = {
        "quantile": quantile,
        "dev_images": len(names),
        "dev_photos_showing": {label: int(shows[label].sum()) for label in GATED_LABELS},
        "thresholds": thresholds,
    }
    log(f"detector gate: thresholds {thresholds} (dev quantile {quantile})")
    return thresholds, report
