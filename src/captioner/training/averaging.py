"""Checkpoint averaging: the mean of the last few epochs' weights often decodes better than any
single epoch (it smooths out the noise of the final steps). Training keeps each epoch's decoder
weights in ``<run>/epochs/``; ``average_run`` turns a chosen set of them into a saved model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from captioner.errors import CheckpointError, ConfigError
from captioner.io import atomic_path, read_json
from captioner.model.captioning_model import CaptioningModel
from captioner.training.guards import (
    check_finite_weights,
    drop_stale_grounding,
    non_finite_keys,
)

EPOCHS_DIR = "epochs"
_EPOCH_FILE = re.compile(r"^epoch_(\d{3,})\.safetensors$")


def epoch_file(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / EPOCHS_DIR / f"epoch_{epoch:03d}.safetensors"


def save_epoch_weights(run_dir: Path, epoch: int, model: torch.nn.Module, keep: int) -> None:
    """Store this epoch's weights (atomically) and drop all but the newest ``keep``."""
    if keep <= 0:
        return
    target = epoch_file(run_dir, epoch)
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    check_finite_weights(state, f"the weights of epoch {epoch}")
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={"epoch": str(epoch)})
    saved = list_epoch_weights(run_dir)
    for old in sorted(saved)[:-keep]:
        saved[old].unlink(missing_ok=True)


def set_aside_epoch_weights(run_dir: Path, log=print) -> None:
    """--restart: move the kept epochs of the run given up into ``epochs/superseded/``, so
    `captioner average` never mixes them with the new run's (nor fails on their shapes)."""
    saved = list_epoch_weights(run_dir)
    if not saved:
        return
    target = Path(run_dir) / EPOCHS_DIR / "superseded"
    target.mkdir(exist_ok=True)
    for path in saved.values():
        os.replace(path, target / path.name)
    log(f"--restart: moved {len(saved)} kept epoch weights to {target}")


def list_epoch_weights(run_dir: Path) -> dict[int, Path]:
    folder = Path(run_dir) / EPOCHS_DIR
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _EPOCH_FILE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean in float64 (then float32), with strict key and shape checks."""
    if not paths:
        raise ConfigError("nothing to average: no epoch weights given")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable weights ({exc})") from exc
        bad = non_finite_keys(state)
        if bad:
            raise CheckpointError(
                f"{path}: {', '.join(bad[:3])} hold NaN or infinite values (a diverged epoch); "
                "leave it out with --epoch"
            )
        if total and set(state) != set(total):
            raise CheckpointError(f"{path}: its tensors differ from {paths[0]}'s")
        for key, value in state.items():
            if key in total and total[key].shape != value.shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}")
            total[key] = total.get(key, 0) + value.double()
    return {k: (v / len(paths)).float() for k, v in total.items()}


def average_run(
    run_dir: str | Path,
    out_dir: str | Path,
    last: int = 3,
    epochs: list[int] | None = None,
    log=print,
) -> Path:
    """Average the ``last`` newest kept epochs (or exactly ``epochs``) of a run into a model.

    The run's ``best/`` model supplies vocabulary, encoder and decoder config, so the result is
    a complete model directory that ``Captioner.from_pretrained`` loads.
    """
    run_dir = Path(run_dir)
    saved = list_epoch_weights(run_dir)
    if not saved:
        raise CheckpointError(
            f"{run_dir / EPOCHS_DIR}: no epoch weights (train with --keep-epochs N > 0)"
        )
    if epochs:
        missing = sorted(set(epochs) - set(saved))
        if missing:
            raise ConfigError(f"epochs {missing} are not kept in {run_dir / EPOCHS_DIR}")
        chosen = sorted(set(epochs))
    else:
        if last <= 0:
            raise ConfigError("--last must be positive")
        chosen = sorted(saved)[-last:]
        if last > len(saved):
            log(
                f"note: --last {last} asks for more epochs than the {len(saved)} kept in "
                f"{run_dir / EPOCHS_DIR}: averaging all of them (epochs {_span(chosen)})"
            )
    template = CaptioningModel.from_pretrained(run_dir / "best")
    averaged = average_state_dicts([saved[e] for e in chosen])
    try:
        template.decoder.load_state_dict(averaged, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"epoch weights do not fit {run_dir / 'best'}: {exc}") from exc
    extra = {k: v for k, v in template.extra.items() if k != "dev"}  # dev was best/'s own
    # best/ keeps the settings of the process that saved it; a later resume may have changed a
    # resumable one (--epochs), and the run's settings file has the final values
    for name in ("train_config", "scst_config"):
        settings = run_dir / f"{name}.json"
        if name in extra and settings.is_file():
            extra[name] = read_json(settings)
    check_finite_weights(averaged, f"the average of epochs {_span(chosen)}")
    drop_stale_grounding(Path(out_dir), log)
    return template.save_pretrained(
        out_dir, extra={**extra, "averaged_epochs": chosen, "run": str(run_dir)}
    )


def _span(epochs: list[int]) -> str:
    """1-8 for a contiguous run of epochs, else 1, 3, 4."""
    if len(epochs) > 2 and epochs == list(range(epochs[0], epochs[-1] + 1)):
        return f"{epochs[0]}-{epochs[-1]}"
    return ", ".join(map(str, epochs))


def ensemble_models(
    models: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    log=print,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save saved models trained apart (other seeds) as one ensemble model directory: weights
    cannot be averaged across runs (each run finds its own solution), but their next-word
    distributions can (:mod:`captioner.model.ensemble`). The first model supplies the
    vocabulary, encoder and decoding settings; every model must share them. Grounding is not
    carried over: its strength was chosen for one decoder (refit it with ``captioner ground``).
    """
    if len(models) < 2:
        raise ConfigError("an ensemble needs at least two models")
    loaded = [CaptioningModel.from_pretrained(path) for path in models]
    first = loaded[0]
    decoders = []
    for path, model in zip(models, loaded, strict=True):
        if model.vocab.itos != first.vocab.itos:
            raise ConfigError(
                f"{path}: its vocabulary differs from {models[0]}'s (ensemble members must be "
                "trained on the same prepared data)"
            )
        if model.encoder.to_json() != first.encoder.to_json():
            raise ConfigError(f"{path}: its encoder differs from {models[0]}'s")
        decoders.extend(model.decoders)
    ensemble = CaptioningModel(
        decoders[0], first.vocab, first.encoder, first.generation, members=decoders[1:]
    )
    drop_stale_grounding(Path(out_dir), log)
    return ensemble.save_pretrained(
        out_dir, dtype=dtype, extra={"ensemble_of": [str(path) for path in models]}
    )
