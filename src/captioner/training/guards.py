"""Guards that keep a run from turning bad numbers into saved models.

A NaN in one cached grid makes the loss NaN, the optimizer then writes NaN into every weight,
and each later save (checkpoints, epochs/, best/) would keep that: the run must stop at the
first non-finite loss, and nothing non-finite may ever be written, whatever produced it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from captioner.errors import CaptionerError


class NonFiniteError(CaptionerError):
    """A loss, a reward or weights about to be saved are NaN or infinite."""


def non_finite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [
        key
        for key, value in tensors.items()
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


def check_finite_weights(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse to save ``what`` when any of its tensors is not finite."""
    bad = non_finite_keys(tensors)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(
            f"not saving {what}: {shown} hold NaN or infinite values (the run diverged); "
            "the files already saved are left as they were"
        )


def check_finite_loss(
    value: float,
    what: str,
    *,
    step: int,
    epoch: int,
    batch: int,
    feats: torch.Tensor,
    image_names: Sequence[str],
) -> None:
    """Stop the run at a NaN/inf ``what`` (loss or reward), saying where and, when the cause is
    in the cached features, which images carry it. Called before anything of the step is
    saved, so the last checkpoint is still good: the run resumes from it once fixed."""
    if math.isfinite(value):
        return
    per_image = ~torch.isfinite(feats.reshape(feats.size(0), -1)).all(dim=1)  # (I,)
    bad = [image_names[int(i)] for i in per_image.nonzero().flatten().tolist()]
    if bad:
        cause = (
            f"the cached features of {len(bad)} image(s) are not finite ({', '.join(bad[:5])}); "
            "run `captioner features` to verify and rebuild the damaged cache shards"
        )
    else:
        cause = "the features are finite, so the model diverged: try a lower --lr or --grad-clip"
    raise NonFiniteError(
        f"{what} is {value} at step {step + 1} (epoch {epoch + 1}, batch {batch + 1}): {cause}. "
        "Stopped without saving this step; rerun the same command to resume from the last "
        "checkpoint"
    )


# the files of a model directory's grounding (grounding/grounder.py GROUNDING_CONFIG and
# GROUNDING_WEIGHTS; a unit test keeps the two lists the same): fitted and tuned for one set
# of decoder weights, so they go whenever a run writes other weights into that directory
GROUNDING_FILES = ("grounding.json", "grounding.safetensors")


def drop_stale_grounding(model_dir: Path, log=print) -> bool:
    """Remove the grounding of ``model_dir`` before its weights are replaced (the config first:
    without it the weights file is never read), saying so; True when there was one."""
    present = [model_dir / name for name in GROUNDING_FILES if (model_dir / name).exists()]
    for path in present:
        path.unlink()
    if present:
        log(
            f"note: removed the grounding of {model_dir} (it was fitted for the weights being "
            "replaced); fit it again with `captioner ground` once training is done"
        )
    return bool(present)
