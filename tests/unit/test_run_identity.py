"""A run resumes only with what it started with: a vocabulary prepared again under it is refused
(never 'damaged' checkpoints and a silent restart), an extended run says so, and grounding fitted
for other weights never stays beside new ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_training import TINY

from captioner.data.prepare import PrepareSettings, prepare
from captioner.data.synthetic import make_shapes_dataset
from captioner.errors import ConfigError
from captioner.grounding.grounder import GROUNDING_CONFIG, GROUNDING_WEIGHTS
from captioner.training.averaging import average_run, list_epoch_weights
from captioner.training.checkpoint import list_checkpoints, resume_latest, save_checkpoint
from captioner.training.config import TrainConfig
from captioner.training.guards import GROUNDING_FILES
from captioner.training.loop import train

SMALL = dict(TINY)
PREPARED = PrepareSettings(num_words=None, min_count=1, test_size=0.2, val_size=0.2, seed=0)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("identity")
    data = make_shapes_dataset(root / "data", num_images=20, seed=6)
    prepare(data, root / "work", PREPARED)
    return root


def _fake_grounding(model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in GROUNDING_FILES:
        (model_dir / name).write_text("{}")


def test_the_grounding_file_names_are_the_grounders():
    assert set(GROUNDING_FILES) == {GROUNDING_CONFIG, GROUNDING_WEIGHTS}


def test_a_vocabulary_prepared_again_is_refused_without_restart(work, tmp_path):
    work_dir = tmp_path / "work"
    shutil.copytree(work / "work", work_dir)
    cfg = TrainConfig(
        work_dir=str(work_dir), run_dir=str(tmp_path / "run"), epochs=1, max_steps=2, **SMALL
    )
    train(cfg)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    prepare(work / "data", work_dir, PrepareSettings(6, 1, 0.2, 0.2, 0), force=True)

    again = TrainConfig(**{**cfg.to_json(), "max_steps": 3})
    with pytest.raises(ConfigError, match="vocabulary .* changed.*--restart"):
        train(again)
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == ckpts  # nothing moved
    assert not (tmp_path / "run" / "checkpoints" / "damaged").exists()

    train(again, restart=True)  # the new vocabulary, from scratch, when asked for
    assert (tmp_path / "run" / "checkpoints" / "superseded").is_dir()


def test_a_checkpoint_that_does_not_fit_is_refused_not_set_aside(tmp_path):
    root = tmp_path / "checkpoints"
    small = torch.nn.Linear(3, 2)
    save_checkpoint(root, 4, small, torch.optim.AdamW(small.parameters()), {"epoch": 0})
    other = torch.nn.Linear(5, 2)
    with pytest.raises(ConfigError, match="does not fit.*--restart"):
        resume_latest(root, other, torch.optim.AdamW(other.parameters()), log=lambda m: None)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000004"]
    assert not (root / "damaged").exists()


def test_new_best_weights_remove_the_old_grounding_and_extension_is_said(work, tmp_path):
    run = tmp_path / "run"
    _fake_grounding(run / "best")  # fitted for weights this run will replace
    cfg = TrainConfig(
        work_dir=str(work / "work"), run_dir=str(run), epochs=1, keep_epochs=5, **SMALL
    )
    messages: list[str] = []
    train(cfg, log=messages.append)
    assert (run / "best" / "model.safetensors").is_file()
    assert not any((run / "best" / name).exists() for name in GROUNDING_FILES)
    assert any("removed the grounding" in m for m in messages)

    messages.clear()
    train(TrainConfig(**{**cfg.to_json(), "epochs": 2}), log=messages.append)
    assert any("extending the finished run from 1 to 2 epochs" in m for m in messages), messages

    out = tmp_path / "averaged"
    _fake_grounding(out)
    messages.clear()
    average_run(run, out, last=100, log=messages.append)
    assert any("--last 100" in m and "averaging all of them (epochs 1, 2)" in m for m in messages)
    assert not any((out / name).exists() for name in GROUNDING_FILES)


def test_restart_sets_the_old_runs_kept_epochs_aside(work, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(
        work_dir=str(work / "work"), run_dir=str(run), epochs=2, keep_epochs=5, **SMALL
    )
    train(cfg)
    assert sorted(list_epoch_weights(run)) == [1, 2]
    train(TrainConfig(**{**cfg.to_json(), "epochs": 1}), restart=True)
    assert sorted(list_epoch_weights(run)) == [1]  # the new run's alone: average cannot mix
    assert sorted(p.name for p in (run / "epochs" / "superseded").iterdir()) == [
        "epoch_001.safetensors",
        "epoch_002.safetensors",
    ]
