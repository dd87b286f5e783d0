"""A full disk during `train` or `features` is one line and exit 2, never a traceback, and what
was written before stays complete (no half-written checkpoint or shard left behind)."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

import captioner.features.cache as cache_module
import captioner.training.checkpoint as checkpoint_module
from captioner.cli.main import app
from captioner.data.prepare import PrepareSettings, prepare
from captioner.data.synthetic import make_shapes_dataset

SMALL = [
    "--embed-dim", "16", "--hidden-dim", "16", "--attention-dim", "16", "--context-dim", "16",
    "--batch-size", "20", "--threads", "1", "--val-images", "4", "--epochs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-full")
    data = make_shapes_dataset(root / "data", num_images=12, seed=2)
    prepare(data, root / "work", PrepareSettings(None, 1, 0.2, 0.2, 0))
    return root / "work"


@pytest.fixture
def work(prepared, tmp_path):
    """A private copy of the prepared work dir, without features."""
    shutil.copytree(prepared, tmp_path / "work")
    return tmp_path / "work"


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))


def _output(result) -> str:
    return result.output + (getattr(result, "stderr", "") or "")


def test_train_with_a_full_disk_is_one_line(work, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module, "save_file", _full)
    args = ["train", "--work-dir", str(work), "--run-dir", str(run), "--max-steps", "1", *SMALL]
    result = CliRunner().invoke(app, args)
    out = _output(result)
    assert result.exit_code == 2, out
    assert "ran out of disk space" in out and "Traceback" not in out
    assert not list((run / "checkpoints").iterdir())  # no half-written .tmp_step_ folder


def test_features_with_a_full_disk_is_one_line(work, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(cache_module, "save_file", full)
    result = CliRunner().invoke(app, ["features", "--work-dir", str(work), "--device", "cpu"])
    out = _output(result)
    assert result.exit_code == 2, out
    assert "ran out of disk space" in out and "Traceback" not in out
    view0 = next(work.glob("features/*/view0"))
    assert not [p.name for p in view0.iterdir() if p.name != "manifest.json"]  # no temp file
    manifest = view0 / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["complete"] is False


def test_other_errors_still_surface(work, monkeypatch):
    monkeypatch.setattr(cache_module, "save_file", lambda *a, **k: 1 / 0)
    result = CliRunner().invoke(app, ["features", "--work-dir", str(work), "--device", "cpu"])
    assert isinstance(result.exception, ZeroDivisionError)  # not disguised as a full disk
