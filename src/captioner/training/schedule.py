"""The learning-rate schedule of `captioner train`: a linear warm-up, then a cosine decay.

Each value is a pure function of the step, so a resumed run continues the same curve. The
warm-up is capped at a fifth of the run: a small dataset (56 batches an epoch) with the
default 200 warm-up steps would otherwise spend most of a short run warming up. The Flickr8k
recipe (1,800 steps) keeps its 200.
"""

from __future__ import annotations

import math

WARMUP_SHARE = 0.2  # warm-up takes at most this share of the run's steps


def cosine_decay(lr: float, min_lr: float, progress: float) -> float:
    """lr at progress 0, min_lr at progress 1 (and beyond), half a cosine in between."""
    progress = min(1.0, progress)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def warmup_steps(requested: int, total_steps: int) -> int:
    """The warm-up a run of ``total_steps`` uses: ``requested``, at most a fifth of the run."""
    if requested <= 0:
        return 0
    return min(requested, max(1, int(total_steps * WARMUP_SHARE)))


def get_lr(step: int, total_steps: int, cfg) -> float:
    """Linear warm-up, then cosine decay from cfg.lr to cfg.min_lr (a pure function of the
    step)."""
    warmup = warmup_steps(cfg.warmup_steps, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cosine_decay(cfg.lr, cfg.min_lr, progress)
