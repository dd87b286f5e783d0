"""Choose a grounded model's in-domain strength on the dev split.

The rule is the one the bundled model's decoding settings were chosen by: the highest dev sum
BLEU-1 + BLEU-4 + METEOR + CIDEr-D (the four metrics the project has targets for), ties to the
weaker bias. The out-of-domain strength is not chosen here: dev photos are in domain.
"""

from __future__ import annotations

import os

from captioner.api import Captioner
from captioner.evaluation.evaluate import evaluate

CRITERION = ("BLEU-1", "BLEU-4", "METEOR", "CIDEr-D")


def tune_strength(
    captioner: Captioner,
    work_dir: str | os.PathLike,
    strengths: list[float],
    *,
    split: str = "val",
    beam_size: int | None = None,
    out_dir: str | os.PathLike = "runs/eval/grounding",
    log=print,
) -> tuple[float, list[dict]]:
    """Evaluate ``split`` at every strength; return the chosen one and every trial's scores."""
    if captioner.grounder is None:
        raise ValueError("the captioner has no grounding to tune")
    config = captioner.grounder.config
    original = config.strength
    trials = []
    try:
        for strength in sorted(set(strengths)):
            config.strength = strength
            report = evaluate(
                captioner,
                work_dir,
                split=split,
                beam_size=beam_size,
                out_dir=os.path.join(out_dir, f"strength{strength:g}"),
                progress=False,
            )
            scores = report["scores"]
            trial = {"strength": strength, **{k: round(scores[k], 4) for k in CRITERION}}
            trial["sum"] = round(sum(scores[k] for k in CRITERION), 4)
            trials.append(trial)
            log(
                f"grounding strength {strength:g}: "
                + ", ".join(f"{k} {trial[k]:.2f}" for k in (*CRITERION, "sum"))
            )
    finally:
        config.strength = original
    best = max(trials, key=lambda t: (t["sum"], -t["strength"]))
    return best["strength"], trials
