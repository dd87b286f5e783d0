"""Resumable checkpoints without pickle: tensors in safetensors, the rest in JSON.

A checkpoint is a directory ``step_XXXXXXXX`` written under a temporary name and renamed into
place, so a kill at any moment leaves only complete checkpoints. Loading walks back from the
newest one when a checkpoint turns out to be damaged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from captioner.errors import CheckpointError
from captioner.io import atomic_write_json, read_json

PREFIX = "step_"


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
    """Write model + optimizer + RNG + progress (epoch, batch, metrics...) atomically."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = ckpt_root / f".tmp_{PREFIX}{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(
        {**opt_tensors, "__torch_rng__": torch.get_rng_state()}, str(tmp / "optimizer.safetensors")
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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore everything saved by ``save_checkpoint``; return its progress dict."""
    try:
        meta = read_json(path / "state.json")
        weights = load_file(str(path / "model.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
        model.load_state_dict(weights, strict=True)
        rng = opt.pop("__torch_rng__")
        _restore_optimizer(optimizer, opt, meta["optimizer"])
    except (OSError, KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or incompatible: {exc}") from exc
    except Exception as exc:  # safetensors' own errors
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from exc
    torch.set_rng_state(rng)
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return {"step": meta["step"], **meta["progress"]}


def resume_latest(
    ckpt_root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, log=print
) -> dict | None:
    """Load the newest loadable checkpoint; a damaged one is reported and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            progress = load_checkpoint(path, model, optimizer)
        except CheckpointError as exc:
            log(f"warning: {exc}; trying the previous checkpoint")
            continue
        log(f"resumed from {path} (epoch {progress['epoch']}, step {progress['step']})")
        return progress
    return None
