"""After decoding: the detector looks where its answer can change the caption.

Two things can change (see :mod:`captioner.grounding.detection` and
:mod:`captioner.grounding.short_description`):

- a caption that names a person, a dog or a cat the detector doubts is decoded again with the
  gate's penalty added to the word bias;
- an out-of-domain photo gets the detector's classes among its concepts and, when the grounding
  asks for it, a short description instead of its sentence; so does a caption that opens
  without a subject noun, in domain too.

Every other photo keeps the caption it was decoded with, and the detector never runs on it, so
a photo whose caption names no gated word costs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from captioner.features.concepts import _singulars, load_object_words
from captioner.features.detector import DetectorOutput, ObjectDetector
from captioner.grounding.detection import detector_concepts
from captioner.grounding.grounder import Grounder, ImageGrounding
from captioner.grounding.short_description import leading_noun, short_description


class SecondLook:
    def __init__(self, grounder: Grounder, itos: list[str], threads: int | None = None):
        self.grounder = grounder
        self.itos = itos
        self.everyday = {w for w in itos if w.isalpha()}  # the model's own words
        self.config = grounder.config
        self.gate = grounder.config.detection_gate()
        self.gated = self.gate.gated_ids(itos)
        self.threads = threads
        self._detector: ObjectDetector | None = None
        self._object_words: set[str] | None = None
        self._class_counts: dict[str, int] | None = None
        self._hedge_words: set[str] | None = None

    @property
    def wanted(self) -> bool:
        """Whether this grounding uses the detector or the short descriptions at all."""
        return self.gate.active or self.config.short_out_of_domain

    @property
    def detector(self) -> ObjectDetector:
        if self._detector is None:  # loaded on first use: most captions never need it
            self._detector = ObjectDetector.from_pretrained(threads=self.threads)
        return self._detector

    def detect(self, thumbnails: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 thumbnails -> (B, L) presence probabilities."""
        return self.detector(list(thumbnails)).probabilities

    def thumbnails(self, arrays: Sequence[np.ndarray]) -> np.ndarray | None:
        """RGB arrays -> (B, S, S, 3) uint8 at the detector's input size (small enough to keep
        beside the grids until decoding says whether the detector is needed)."""
        if not self.wanted:
            return None
        return self.detector.thumbnails(list(arrays))

    def __call__(
        self,
        decoded: list,
        described: list[ImageGrounding],
        concept_logits: np.ndarray,
        detector_images: np.ndarray,
        word_bias: torch.Tensor,
        features: torch.Tensor,
        decode: Callable[[torch.Tensor, torch.Tensor], list],
        detections: np.ndarray | Callable[[], np.ndarray] | None = None,
    ) -> tuple[list, list[list[str] | None]]:
        """(decoded, per photo a short description or None); ``described`` gains the
        detector's concepts where it ran. ``detections`` (B, L): the detector's answer for
        every photo when it was computed beside decoding (or a callable waiting for it);
        otherwise the detector runs here, on the photos that need it only."""
        short: list[list[str] | None] = [None] * len(decoded)
        if not self.wanted:
            return decoded, short
        outside = [g.out_of_domain for g in described]
        said_short = self.short_anyway(described)
        gated = [
            self.gate.active and self.gate.names_gated_word(d.token_ids, self.gated)
            for d in decoded
        ]
        # a caption that opens without a subject ("a blue is is in the blue") is no sentence,
        # in domain or out: it gets the short description too
        salad = [
            self.config.short_out_of_domain and not self.reads_as_a_caption(d) for d in decoded
        ]
        looked = [i for i in range(len(decoded)) if outside[i] or gated[i] or salad[i]]
        if not looked:
            return decoded, short
        if detections is None:
            probs = self.detect(detector_images[looked])  # (n, L)
        else:
            probs = (detections() if callable(detections) else detections)[looked]  # (n, L)
        detections = DetectorOutput(self.detector.labels, probs)
        decoded = list(decoded)
        if self.gate.active:
            penalty = self.gate.bias(detections, self.gated, word_bias.size(1))  # (n, V)
            redo = [
                k
                for k, i in enumerate(looked)
                if gated[i] and (penalty[k, decoded[i].token_ids] < 0).any()
            ]
            if redo:
                rows = [looked[k] for k in redo]
                extra = torch.from_numpy(penalty[redo]).to(word_bias.device)  # (r, V)
                for i, d in zip(rows, decode(features[rows], word_bias[rows] + extra), strict=True):
                    if self.reads_as_a_caption(d) or not self.reads_as_a_caption(decoded[i]):
                        decoded[i] = d
                    # else: with its person / dog words barred, the decoder found no other
                    # subject ("a smiling and a camera are ..."): the caption it had stays
        seen = detector_concepts(detections, self.config.detector_min_prob)
        support = self.grounder.support(concept_logits[looked], self.itos)
        for k, i in enumerate(looked):
            described[i].concepts = merged_concepts(described[i].concepts, seen[k])
            if said_short[i] or (salad[i] and not self.reads_as_a_caption(decoded[i])):
                tokens = [self.itos[t] for t in decoded[i].token_ids]
                short[i] = short_description(
                    tokens,
                    described[i].concepts,
                    self.object_words,
                    lambda w, s=support[k]: s.get(w, 0.0),
                    self.everyday,
                    [
                        (w, p, self.class_counts[w])
                        for w, p in support[k].items()
                        if w in self.hedge_words
                    ],
                )
        return decoded, short

    def short_anyway(self, described: list[ImageGrounding]) -> list[bool]:
        """Per photo, whether its caption becomes a short description whatever the decoder
        says: out of domain, when the grounding asks for short descriptions there."""
        return [self.config.short_out_of_domain and g.out_of_domain for g in described]

    def reads_as_a_caption(self, decoded) -> bool:
        """Whether a decoded caption opens with a noun phrase that has a noun."""
        tokens = [self.itos[t] for t in decoded.token_ids]
        return leading_noun(tokens, self.object_words) is not None

    @property
    def class_counts(self) -> dict[str, int]:
        """word -> how many ImageNet classes it names (fewer: more specific)."""
        if self._class_counts is None:
            counts = self.grounder.lexicon.sum(axis=0)  # (W,)
            names = [self.itos[i] for i in self.grounder.word_ids]
            self._class_counts = {w: int(c) for w, c in zip(names, counts, strict=True)}
        return self._class_counts

    @property
    def hedge_words(self) -> set[str]:
        """The object words a hedged short description may use (singular, as the concepts)."""
        if self._hedge_words is None:
            words = self.object_words
            self._hedge_words = {
                w
                for w in self.class_counts
                if w in words and not any(s != w and s in words for s in _singulars(w))
            }
        return self._hedge_words

    @property
    def object_words(self) -> set[str]:
        if self._object_words is None:
            # WordNet's object nouns, plus every word that names an ImageNet class ("bear" is
            # more often a verb in WordNet's counts, but a caption's "a bear" is the animal)
            named = {w for w, n in self.class_counts.items() if n > 0}
            self._object_words = load_object_words() | named
        return self._object_words


def merged_concepts(
    imagenet: list[tuple[str, float]], detected: list[tuple[str, float]]
) -> list[tuple[str, float]]:
    """Both sources' concept words, each once at its higher probability, best first."""
    best: dict[str, float] = {}
    for word, p in [*imagenet, *detected]:
        best[word] = max(p, best.get(word, 0.0))
    return sorted(best.items(), key=lambda c: -c[1])
