"""`captioner train`: every TrainConfig field is a flag, generated from the dataclass."""

from __future__ import annotations

import inspect

import typer

from captioner.cli.common import friendly_errors, options_from_dataclass, with_signature
from captioner.cli.disk_errors import disk_full_is_one_line
from captioner.training.config import ScstConfig, TrainConfig


@disk_full_is_one_line("train")
def _train(**kwargs) -> None:
    """Train a Show-Attend-Tell decoder on cached features; rerun the same command to resume."""
    from captioner.training.loop import train

    restart = kwargs.pop("restart")
    best = train(TrainConfig(**kwargs), restart=restart)
    typer.echo(f"best model: {best}")


@disk_full_is_one_line("scst")
def _scst(**kwargs) -> None:
    """Fine-tune a trained model with self-critical sequence training (reward: CIDEr-D, plus
    sentence BLEU with --bleu-weight); rerun the same command to resume."""
    from captioner.training.scst import train_scst

    restart = kwargs.pop("restart")
    best = train_scst(ScstConfig(**kwargs), restart=restart)
    typer.echo(f"best model: {best}")


_RESTART = inspect.Parameter(
    "restart",
    inspect.Parameter.KEYWORD_ONLY,
    annotation=bool,
    default=typer.Option(False, "--restart", help="ignore existing checkpoints and start over"),
)
train_cmd = friendly_errors(
    with_signature(_train, [*options_from_dataclass(TrainConfig), _RESTART])
)
train_cmd.__doc__ = _train.__doc__
scst_cmd = friendly_errors(with_signature(_scst, [*options_from_dataclass(ScstConfig), _RESTART]))
scst_cmd.__doc__ = _scst.__doc__


@friendly_errors
@disk_full_is_one_line("average")
def average_cmd(
    run_dir: str = typer.Argument(..., help="a training run directory (with epochs/ and best/)"),
    out: str = typer.Option(..., "--out", help="where to save the averaged model"),
    last: int = typer.Option(3, "--last", min=1, help="average the newest N kept epochs"),
    epochs: list[int] = typer.Option(
        None, "--epoch", min=1, help="average exactly these epochs instead (repeat the flag)"
    ),
) -> None:
    """Average the weights of a run's last epochs into one model (checkpoint averaging)."""
    from captioner.training.averaging import average_run

    path = average_run(
        run_dir, out, last=last, epochs=epochs or None, log=lambda m: typer.echo(m, err=True)
    )
    typer.echo(f"averaged model: {path}")


@friendly_errors
@disk_full_is_one_line("ensemble")
def ensemble_cmd(
    models: list[str] = typer.Argument(..., help="two or more saved model directories"),
    out: str = typer.Option(..., "--out", help="where to save the ensemble model"),
    half: bool = typer.Option(
        False, "--half", help="store the weights in fp16 (half the size; the bundle's are)"
    ),
) -> None:
    """Join models trained with other seeds into one ensemble model: beam search uses the mean
    of their next-word distributions (each caption costs one decoder step per member)."""
    import torch

    from captioner.training.averaging import ensemble_models

    dtype = torch.float16 if half else torch.float32
    path = ensemble_models(models, out, log=lambda m: typer.echo(m, err=True), dtype=dtype)
    typer.echo(f"ensemble model: {path} (refit its grounding: captioner ground {path})")
