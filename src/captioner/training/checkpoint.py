"""Resumable checkpoints without pickle: tensors in safetensors, the rest in JSON.

A checkpoint is a directory ``step_XXXXXXXX`` written under a temporary name and renamed into
place, so a kill at any moment leaves only complete checkpoints. Loading walks back from the
newest one when a checkpoint turns out to be damaged; damaged ones are moved into ``damaged/``
(kept for inspection, never resumed from, never counted when pruning), so the checkpoints left
in place always belong to the run being continued and their numbers are their writing order.
"""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from captioner.errors import CheckpointError, ConfigError
from captioner.io import atomic_write_json, read_json
from captioner.training.guards import check_finite_weights, non_finite_keys

PREFIX = "step_"
STEP_PATTERN = re.compile(rf"^{PREFIX}\d+$")
TMP_PATTERN = re.compile(rf"^\.tmp_{PREFIX}\d+_(\d+)$")  # .tmp_step_XXXXXXXX_PID
DAMAGED = "damaged"  # checkpoints that failed to load
SUPERSEDED = "superseded"  # checkpoints of a run given up by --restart


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{slot}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, slot = key.split(".", 1)
        state.setdefault(int(pid), {})[slot] = value
    for key, value in meta["scalars"].items():
        pid, slot = key.split(".", 1)
        state.setdefault(int(pid), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict,
    keep_last: int = 3,
) -> Path:
    """Write model + optimizer + RNG + progress (epoch, batch, metrics...) atomically.
    Non-finite weights are refused before anything is written; a failed write (a full disk)
    removes its half-written folder, so the checkpoints in place stay the last good ones."""
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    check_finite_weights(weights, f"checkpoint {step} (model)")
    check_finite_weights(opt_tensors, f"checkpoint {step} (optimizer state)")
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(ckpt_root)
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp_{PREFIX}{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(
            {**opt_tensors, "__torch_rng__": torch.get_rng_state()},
            str(tmp / "optimizer.safetensors"),
        )
        atomic_write_json(
            tmp / "state.json",
            {
                "step": step,
                "progress": progress,
                "optimizer": opt_meta,
                "python_rng": _jsonable_random_state(),
            },
        )
        for name in ("model.safetensors", "optimizer.safetensors"):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(ckpt_root, step, keep_last)
    return final


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def _prune(ckpt_root: Path, step: int, keep_last: int) -> None:
    """Keep the ``keep_last`` newest-written checkpoints, the one just written among them.
    Checkpoints numbered after it cannot be this run's (resuming set the damaged ones aside), so
    they are set aside too rather than allowed to push the new one out."""
    existing = list_checkpoints(ckpt_root)
    later = [p for p in existing if _step_of(p) > step]
    if later:
        set_aside(ckpt_root, later, SUPERSEDED)
    if keep_last <= 0:
        return
    earlier = [p for p in existing if _step_of(p) < step]
    for old in earlier[: max(0, len(earlier) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(ckpt_root: Path, paths: list[Path], folder: str) -> list[Path]:
    """Move checkpoints into ``ckpt_root/folder`` (a name taken there gets a numeric suffix):
    out of the way of resuming and pruning, but not deleted."""
    target_dir = ckpt_root / folder
    target_dir.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in paths:
        target, n = target_dir / path.name, 1
        while target.exists():
            target, n = target_dir / f"{path.name}.{n}", n + 1
        os.replace(path, target)
        moved.append(target)
    return moved


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def remove_stale_tmp(ckpt_root: Path) -> list[Path]:
    """Delete the half-written ``.tmp_step_*_PID`` folders of processes that no longer run
    (a killed run leaves one behind); those of live processes may still be being written."""
    if not ckpt_root.is_dir():
        return []
    removed = []
    for path in ckpt_root.iterdir():
        match = TMP_PATTERN.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _jsonable_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """The ``step_XXXXXXXX`` checkpoints in ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore everything saved by ``save_checkpoint``; return its progress dict. Every file is
    read and checked before anything is restored, so a damaged checkpoint changes nothing
    (except a model or optimizer it only partly fits; ``resume_latest`` undoes that)."""
    try:
        meta = read_json(path / "state.json")
        weights = load_file(str(path / "model.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
        rng = opt.pop("__torch_rng__")
        version, internal, gauss = meta["python_rng"]
        python_rng = (version, tuple(internal), gauss)
        result = {"step": meta["step"], **meta["progress"]}
        _check_fits(path, weights, model)
        if non_finite_keys(weights):
            raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights")
        model.load_state_dict(weights, strict=True)
        _restore_optimizer(optimizer, opt, meta["optimizer"])
    except CheckpointError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or incompatible: {exc}") from exc
    except Exception as exc:  # safetensors' own errors
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from exc
    torch.set_rng_state(rng)
    random.setstate(python_rng)
    return result


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint whose tensors do not fit the model: the run's settings or its
    vocabulary changed. Not damage: it is refused, never set aside or trained over."""


def _check_fits(path: Path, weights: dict, model: torch.nn.Module) -> None:
    expected = model.state_dict()
    wrong = sorted(set(weights) ^ set(expected)) or [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if weights[k].shape != v.shape
    ]
    if wrong:
        raise IncompatibleCheckpointError(
            f"checkpoint {path} does not fit this model ({', '.join(wrong[:3])})"
        )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resume_latest(
    ckpt_root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    log: Callable[[str], None] = print,
    tidy: bool = True,
) -> dict | None:
    """Load the newest loadable checkpoint. A damaged one is reported and moved into
    ``damaged/``; when none loads, say loudly that training starts from scratch. Warnings go to
    stderr with the default ``log`` (print), to ``log`` itself otherwise. ``tidy`` False (the
    other ranks of a DDP run) only reads: moving and deleting is the writing rank's job."""
    warn = _stderr if log is print else log
    if tidy:
        remove_stale_tmp(ckpt_root)
    fresh = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    damaged = []
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            progress = load_checkpoint(path, model, optimizer)
        except IncompatibleCheckpointError as exc:
            raise ConfigError(
                f"{exc}: the model settings or the vocabulary changed since this run was "
                "checkpointed; pass --restart to start over (the old checkpoints are set aside), "
                "or use another --run-dir"
            ) from exc
        except CheckpointError as exc:
            damaged.append(path)
            where = f"moved it to {set_aside(ckpt_root, [path], DAMAGED)[0]}; " if tidy else ""
            warn(f"warning: {exc}; {where}trying the previous checkpoint")
            continue
        log(f"resumed from {path} (epoch {progress['epoch']}, step {progress['step']})")
        return progress
    if damaged:  # a damaged checkpoint may have been partly restored before it failed
        model.load_state_dict(fresh[0])
        optimizer.load_state_dict(fresh[1])
        warn(
            f"warning: none of the {len(damaged)} checkpoints in {ckpt_root} could be loaded"
            + (f" (moved to {ckpt_root / DAMAGED})" if tidy else "")
            + ": training STARTS FROM SCRATCH"
        )
    return None


def start_over(ckpt_root: Path, log: Callable[[str], None] = print) -> None:
    """--restart: set the existing checkpoints aside (into ``superseded/``), so a kill before
    the new run's first checkpoint cannot resume the old run instead."""
    remove_stale_tmp(ckpt_root)
    old = list_checkpoints(ckpt_root)
    if old:
        set_aside(ckpt_root, old, SUPERSEDED)
        log(f"--restart: moved {len(old)} earlier checkpoints to {ckpt_root / SUPERSEDED}")
