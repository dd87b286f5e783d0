"""CIDEr-D as a per-caption reward for self-critical training.

pycocoevalcap's scorer recomputes document frequencies from whatever set it is given, so scoring
a 20-image batch with it would weigh n-grams by that batch alone. Here the frequencies come once
from the whole training corpus and every reference's tf-idf vector is built once, so a reward is
a few dictionary lookups. The arithmetic is pycocoevalcap's CIDEr-D exactly (clipped tf-idf
cosine per n-gram order, Gaussian length penalty with sigma 6, times 10; "length" is counted
in bigrams as there); a unit test checks it against pycocoevalcap on the same corpus.
Captions are sequences of token ids (words work too: anything hashable).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

Ngram = tuple[Hashable, ...]
_Vector = tuple[list[dict[Ngram, float]], list[float], int]  # per order: tf-idf, norm; length


def ngram_counts(tokens: Sequence[Hashable], n: int = 4) -> Counter:
    return Counter(
        tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1)
    )


class CiderD:
    """CIDEr-D with document frequencies fixed by ``corpus`` (one list of references per image).

    ``score(candidate, image)`` compares a caption with the references of ``corpus[image]``.
    """

    def __init__(
        self, corpus: Sequence[Sequence[Sequence[Hashable]]], n: int = 4, sigma: float = 6.0
    ):
        if not corpus:
            raise ValueError("CIDEr-D needs at least one image with references")
        self.n = n
        self.sigma = sigma
        counts = [[ngram_counts(ref, n) for ref in refs] for refs in corpus]
        document_frequency: Counter = Counter()
        for refs in counts:
            document_frequency.update({g for ref in refs for g in ref})
        self.log_num_docs = math.log(float(len(corpus)))
        # idf(g) = log(N) - log(max(1, df)); unseen n-grams get log(N)
        self.idf = {
            g: self.log_num_docs - math.log(max(1.0, df)) for g, df in document_frequency.items()
        }
        self.references = [[self._vector(ref) for ref in refs] for refs in counts]

    def __len__(self) -> int:
        return len(self.references)

    def _vector(self, counts: Counter) -> _Vector:
        vec: list[dict[Ngram, float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * self.idf.get(gram, self.log_num_docs)
            vec[order][gram] = weight
            norm[order] += weight * weight
            if order == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, candidate: Sequence[Hashable], image: int) -> float:
        vec, norm, length = self._vector(ngram_counts(candidate, self.n))
        refs = self.references[image]
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for order in range(self.n):
                ref_order = ref_vec[order]
                dot = 0.0
                for gram, weight in vec[order].items():
                    ref_weight = ref_order.get(gram, 0.0)
                    dot += min(weight, ref_weight) * ref_weight
                if norm[order] != 0 and ref_norm[order] != 0:
                    dot /= norm[order] * ref_norm[order]
                total += dot * penalty
        return 10.0 * total / self.n / len(refs)

    def scores(
        self, candidates: Sequence[Sequence[Hashable]], images: Sequence[int]
    ) -> list[float]:
        return [self.score(c, i) for c, i in zip(candidates, images, strict=True)]
