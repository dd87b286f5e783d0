"""The learning-rate schedule of `captioner train`: a linear warm-up, then a cosine decay.

Each value is a pure function of the step, so a resumed run continues the same curve. The
warm-up is capped at a fifth of the run: a small dataset (56 batches an epoch) with the
default 200 warm-up steps would otherwise spend most of a short run warming up. The Flickr8k
recipe (1,800 steps) keeps its 200.
"""

from __future__ import annotations

import math

import torch

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


def param_groups(decoder: torch.nn.Module, top_lr_scale: float) -> list[dict]:
    """Optimizer groups: the decoder at the scheduled lr, and a fine-tuned encoder top (if the
    decoder has one) at ``top_lr_scale`` times it, on the same curve (see ``set_lr``)."""
    top = getattr(decoder, "encoder_top", None)
    top_ids = {id(p) for p in top.parameters()} if top is not None else set()
    rest = [p for p in decoder.parameters() if id(p) not in top_ids]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if top is not None:
        groups.append({"params": list(top.parameters()), "lr_scale": top_lr_scale})
    return groups


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
