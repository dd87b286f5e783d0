"""What captioning one image returns: the caption and everything said about it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CaptionResult:
    caption: str  # "a dog runs through the snow"
    tokens: list[str]  # the words, without <start>/<end>
    score: float  # length-normalised log-probability of the best beam
    attention: np.ndarray | None  # (len(tokens), grid, grid) float32, each map sums to 1
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # all beams, best first
    # what the encoder's ImageNet head sees, as everyday words: [("cat", 0.95), ...]
    concepts: list[tuple[str, float]] = field(default_factory=list)
    # share of held-out training photos at least as unusual (None: the model has no grounding)
    in_domain: float | None = None
    out_of_domain: bool = False  # in_domain below the model's threshold: may well be wrong
    # the caption is a short description ("a cat"): out of domain, the evidence supports no
    # full sentence (the decoder's sentence is then the first of ``alternatives``)
    short: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON types, in the field names every output uses."""
        return {
            "caption": self.caption,
            "tokens": list(self.tokens),
            "score": self.score if math.isfinite(self.score) else None,
            "short": self.short,
            "concepts": [{"word": w, "probability": round(float(p), 4)} for w, p in self.concepts],
            "in_domain": self.in_domain,
            "out_of_domain": self.out_of_domain,
            "alternatives": [{"caption": c, "score": s} for c, s in self.alternatives],
        }
