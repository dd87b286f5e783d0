"""`captioner ground`: fit a model's grounding (concepts, in-domain score, word bias)."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from captioner.cli.common import friendly_errors

# the bundled model's gate strength, chosen on Flickr8k dev (docs/GROUNDING.md)
GATE_STRENGTH = 10.0
GATE_QUANTILE = 0.10


def _strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--strengths must be numbers separated by commas: {text!r}"
        ) from None
    if not values or any(not 0 <= v <= 10 for v in values):
        raise typer.BadParameter(f"--strengths must be between 0 and 10, got {text!r}")
    return values


@friendly_errors
def ground_cmd(
    model: str = typer.Argument(..., help="a saved model directory (e.g. runs/x/best)"),
    work_dir: str = typer.Option("work/flickr8k", "--work-dir", help="prepared work dir"),
    out: str = typer.Option(
        None, "--out", help="save model + grounding here (default: into MODEL itself)"
    ),
    strengths: str = typer.Option(
        "0,0.25,0.5,1",
        "--strengths",
        help="in-domain strengths tried on dev (comma-separated); with --no-tune, a single "
        "value is used as given, otherwise the default strength 0.5",
    ),
    ood_strength: float = typer.Option(
        5.0, "--ood-strength", min=0, max=10, help="strength for out-of-domain photos"
    ),
    tune: bool = typer.Option(
        True, "--tune/--no-tune", help="choose the strength on dev (beam search, minutes)"
    ),
    gate_strength: float = typer.Option(
        GATE_STRENGTH,
        "--gate-strength",
        min=0,
        max=20,
        help="how hard the person/animal detector vetoes a person, dog or cat it does not see "
        "(nats per unit log ratio; 0 = no detector gate); the bundle's value was chosen on dev",
    ),
    gate_quantile: float = typer.Option(
        GATE_QUANTILE,
        "--gate-quantile",
        min=0.0,
        max=0.5,
        help="share of the dev photos showing a person (dog, cat) that the gate may doubt: its "
        "thresholds are these quantiles of the detector's probability on them",
    ),
) -> None:
    """Fit grounding on the training split (class-to-word table, domain scorer), choose its
    strength on dev, and save it beside the model: every caption then comes with concepts and
    an in-domain score, and decoding is biased towards what the encoder sees."""
    from captioner.api import Captioner, resolve_model_path
    from captioner.data.prepare import PreparedData
    from captioner.evaluation.grounding_tuning import tune_strength
    from captioner.grounding.fit import fit_grounding
    from captioner.grounding.grounder import GroundingConfig

    tried = _strengths(strengths)
    source = resolve_model_path(model)
    target = Path(out) if out else source
    if out and target.resolve() != source.resolve():
        if target.exists() and any(target.iterdir()):
            raise typer.BadParameter(f"--out {target} exists and is not empty")
        shutil.copytree(source, target, dirs_exist_ok=True)
    from captioner.model.captioning_model import CaptioningModel

    # the model alone: a grounding already there is replaced, never needed (nor trusted)
    captioner = Captioner(CaptioningModel.from_pretrained(target))
    prepared = PreparedData.load(work_dir)
    fixed = tried[0] if len(tried) == 1 else GroundingConfig().strength
    config = GroundingConfig(ood_strength=ood_strength, strength=fixed)
    grounder, report = fit_grounding(
        captioner.vocab, prepared, captioner.spec.name, config, log=typer.echo
    )
    report["detector_gate"] = {}
    if gate_strength > 0:
        from captioner.grounding.detection_fit import fit_gate_thresholds

        thresholds, report["detector_gate"] = fit_gate_thresholds(
            prepared, gate_quantile, log=typer.echo
        )
        grounder.config.person_threshold = thresholds.get("Person", 0.0)
        grounder.config.dog_threshold = thresholds.get("Dog", 0.0)
        grounder.config.cat_threshold = thresholds.get("Cat", 0.0)
        grounder.config.gate_strength = gate_strength
    captioner.grounder = grounder
    trials: list[dict] = []
    if tune:
        chosen, trials = tune_strength(captioner, work_dir, tried, log=typer.echo)
        grounder.config.strength = chosen
    grounder.save_pretrained(target, extra={"fit": report, "dev_trials": trials})
    typer.echo(f"grounding saved in {target} (strength {grounder.config.strength:g})")
