"""How much a photo looks like the training photos: an honest in-domain score.

The decoder only knows the photos it was trained on; on anything else its caption is a guess
dressed as a sentence. The encoder's pooled feature (the mean of its grid) places every photo
in one 1280-d space, so we fit a Gaussian to the training photos there (Mahalanobis distance in
the top principal directions plus the residual outside them, the usual "PCA + reconstruction
error" novelty score) and calibrate it on held-out photos: the score of a photo is the share
of held-out (dev) photos that are at least as far from the training set, an empirical p-value.
A dev photo scores uniformly in [0, 1]; a photo unlike all of them scores near 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_COMPONENTS = 64
# below this share of dev photos being as unusual, a photo is called out of domain: 1 in 100
# in-domain photos is flagged by mistake, by construction of the calibration
DEFAULT_THRESHOLD = 0.01


def pooled(grid: np.ndarray) -> np.ndarray:
    """Encoder grids (B, P, C) -> unit-length pooled features (B, C) float32."""
    return unit_rows(np.asarray(grid, dtype=np.float32).mean(axis=1))  # (B, C)


def unit_rows(mean: np.ndarray) -> np.ndarray:
    """Mean-pooled features (B, C) -> the same scaled to unit length (what the scorer reads)."""
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-8)


@dataclass
class DomainScorer:
    mean: np.ndarray  # (C,) training mean of the pooled features
    components: np.ndarray  # (K, C) principal directions, orthonormal rows
    variances: np.ndarray  # (K,) variance along each direction
    residual_variance: float  # mean squared residual per remaining dimension
    calibration: np.ndarray  # (M,) sorted distances of the held-out photos
    threshold: float = DEFAULT_THRESHOLD

    @classmethod
    def fit(
        cls,
        train: np.ndarray,
        heldout: np.ndarray,
        components: int = DEFAULT_COMPONENTS,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> DomainScorer:
        """train (N, C), heldout (M, C) pooled features (see :func:`pooled`)."""
        train = np.asarray(train, dtype=np.float64)
        if train.ndim != 2 or len(train) <= components:
            raise ValueError(f"need more than {components} training rows, got {train.shape}")
        mean = train.mean(axis=0)
        centred = train - mean  # (N, C)
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        k = min(components, vt.shape[0])
        variances = singular[:k] ** 2 / (len(train) - 1)  # (K,)
        rest = singular[k:] ** 2 / (len(train) - 1)
        residual_variance = float(rest.sum() / max(1, train.shape[1] - k))
        scorer = cls(
            mean.astype(np.float32),
            vt[:k].astype(np.float32),
            variances.astype(np.float32),
            max(residual_variance, 1e-12),
            np.zeros(0, np.float32),
            threshold,
        )
        scorer.calibration = np.sort(scorer.distance(heldout)).astype(np.float32)
        return scorer

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(B, C) pooled features -> (B,) squared Mahalanobis-plus-residual distance per dim."""
        x = np.asarray(features, dtype=np.float32) - self.mean  # (B, C)
        proj = np.einsum("bc,kc->bk", x, self.components)  # (B, K); no BLAS threads to spin
        inside = (proj**2 / self.variances).sum(axis=1)  # (B,)
        residual = (x**2).sum(axis=1) - (proj**2).sum(axis=1)  # (B,) energy outside the K dirs
        outside = np.maximum(residual, 0.0) / self.residual_variance
        return (inside + outside) / x.shape[1]

    def score(self, features: np.ndarray) -> np.ndarray:
        """(B, C) pooled features -> (B,) in-domain score in [0, 1]: the share of held-out
        photos at least as far from the training photos."""
        d = self.distance(features)  # (B,)
        m = len(self.calibration)
        if m == 0:
            raise ValueError("the domain scorer has no calibration distances")
        at_least_as_far = m - np.searchsorted(self.calibration, d, side="left")  # (B,)
        return (at_least_as_far / m).astype(np.float32)

    def in_domain(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.threshold

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "domain.mean": self.mean,
            "domain.components": self.components,
            "domain.variances": self.variances,
            "domain.calibration": self.calibration,
        }

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, np.ndarray], residual_variance: float, threshold: float
    ) -> DomainScorer:
        return cls(
            tensors["domain.mean"].astype(np.float32),
            tensors["domain.components"].astype(np.float32),
            tensors["domain.variances"].astype(np.float32),
            float(residual_variance),
            tensors["domain.calibration"].astype(np.float32),
            float(threshold),
        )
