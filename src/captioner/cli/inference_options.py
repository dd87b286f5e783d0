"""Options and output helpers shared by the inference commands (caption, predict, evaluate)."""

from __future__ import annotations

import typer

WORK_DIR_HELP = "prepared work dir (from `captioner prepare`)"
BACKEND_HELP = "auto (ONNX Runtime, else PyTorch), onnx or torch"
NO_REPEAT_HELP = "never repeat an n-gram of this size in a caption (0 = off); default: the model's"
DEVICE_HELP = "auto (a CUDA GPU if visible), cpu or cuda (PyTorch on the GPU; ONNX is CPU only)"
# one text for every command with --precision (caption, predict, evaluate, serve); the
# measurements behind it are in docs/BENCHMARKS.md ("int8 on the Flickr8k test split")
PRECISION_HELP = (
    "encoder (and decoder graphs): fp32, int8 (opt-in and faster; made by `captioner export "
    "--precision int8`) or auto (fp32 for now: on the bundled model int8 stays inside the "
    "quality bar on the Flickr8k test split but not on dev; docs/BENCHMARKS.md)"
)
EVALUATE_PRECISION_HELP = (
    "fp32 reads the feature cache when complete; int8 encodes every image (calibrated on the "
    "work dir's training split if there is no int8 encoder yet). " + PRECISION_HELP
)


# declared once, used by caption, predict and evaluate, so the three spell them alike
LENGTH_PENALTY_OPTION = typer.Option(
    None,
    "--length-penalty",
    min=0.0,
    max=10.0,
    help="beam score = log-prob / length ** this (0 = none); default: the model's",
)
GROUNDING_OPTION = typer.Option(
    True,
    "--grounding/--no-grounding",
    help="decode a grounded model with its concept bias (--no-grounding: without, to compare)",
)


def check_device(device: str) -> str:
    """--device checked before anything is read or written: a missing GPU is one clear line
    (ConfigError, exit code 2). Returns the name for ``Captioner``."""
    from captioner.devices import resolve_device

    resolve_device(device)
    return device


def echo_error(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def grounding_lines(result) -> list[str]:
    """What a grounded model adds to a caption, for people: the concepts and a plain warning."""
    if result.in_domain is None:
        return []
    seen = ", ".join(f"{w} {p:.2f}" for w, p in result.concepts) or "(nothing above 0.05)"
    verdict = "out of domain" if result.out_of_domain else "in domain: like the training photos"
    lines = [f"concepts:   {seen}", f"in-domain:  {result.in_domain:.3f} ({verdict})"]
    if result.out_of_domain:
        lines.append(
            "warning:    this photo is unlike the training photos (out of domain): "
            "the caption may well be wrong"
        )
    if getattr(result, "short", False):
        lines.append(
            "note:       a short description: the evidence supports no full sentence "
            f"(the decoder said: {result.alternatives[0][0] if result.alternatives else '-'})"
        )
    return lines
