"""Sentence-level BLEU as an extra per-caption reward for self-critical training.

A CIDEr-D reward raises CIDEr-D, BLEU-4 and METEOR but leaves BLEU-1 (unigram precision) where it
was; mixing in a BLEU term (``captioner scst --bleu-weight``) trades some consensus for precision.
Per caption: the geometric mean of the clipped n-gram precisions up to ``order`` (orders above 1
add one to numerator and denominator, Lin and Och 2004, so a short caption is not zeroed), times
the brevity penalty against the closest reference length, as corpus BLEU does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

from captioner.training.cider_reward import ngram_counts


class SentenceBleu:
    """BLEU-``order`` of a caption against the references of ``corpus[image]``."""

    def __init__(self, corpus: Sequence[Sequence[Sequence[Hashable]]], order: int = 1):
        if not 1 <= order <= 4:
            raise ValueError(f"BLEU order must be 1 to 4, not {order}")
        self.order = order
        self.max_counts: list[Counter] = []  # per image: each n-gram's most frequent use in a ref
        self.lengths: list[list[int]] = []
        for refs in corpus:
            most: Counter = Counter()
            for ref in refs:
                most |= ngram_counts(ref, order)
            self.max_counts.append(most)
            self.lengths.append([len(ref) for ref in refs])

    def score(self, candidate: Sequence[Hashable], image: int) -> float:
        length = len(candidate)
        if length == 0:
            return 0.0
        counts = ngram_counts(candidate, self.order)
        most = self.max_counts[image]
        log_precision = 0.0
        for n in range(1, self.order + 1):
            total = max(0, length - n + 1)
            matched = sum(min(c, most[g]) for g, c in counts.items() if len(g) == n)
            if n > 1:
                matched, total = matched + 1, total + 1
            if matched == 0:
                return 0.0
            log_precision += math.log(matched / total) / self.order
        closest = min(self.lengths[image], key=lambda r: (abs(r - length), r))
        brevity = 1.0 if length >= closest else math.exp(1.0 - closest / length)
        return brevity * math.exp(log_precision)

    def scores(
        self, candidates: Sequence[Sequence[Hashable]], images: Sequence[int]
    ) -> list[float]:
        return [self.score(c, i) for c, i in zip(candidates, images, strict=True)]
