"""What a newcomer training their own model met: progress inside an epoch, a subset to start
with, a warm-up that fits a short run, 'preparing' only when preparing, and settings that cannot
be met (a 1 TB decoder, 999 threads, a vocabulary of no words, a split with no dev images)
refused or capped with one clear line."""

from __future__ import annotations

import json

import pytest
from tiny_training import TINY
from typer.testing import CliRunner

from captioner.cli.main import app
from captioner.data.prepare import PrepareSettings, prepare
from captioner.data.synthetic import make_shapes_dataset
from captioner.errors import ConfigError, DataError
from captioner.model.config import DecoderConfig
from captioner.settings import available_cores, cap_threads
from captioner.training.config import TrainConfig
from captioner.training.epochs import EpochLines
from captioner.training.loop import get_lr, train
from captioner.training.schedule import warmup_steps

# no warm-up given: the warm-up cap is what is tested
SMALL = {**{k: v for k, v in TINY.items() if k != "warmup_steps"}, "hidden_dim": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("newcomer"), num_images=20, seed=8)


def test_warm_up_is_capped_at_a_fifth_of_a_short_run():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=200)
    total = 56 * 6  # 56 batches an epoch, six epochs
    assert warmup_steps(200, total) == 67
    lrs = [get_lr(s, total, cfg) for s in range(total)]
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) == 66
    assert warmup_steps(200, 1800) == 200  # the Flickr8k recipe is unchanged
    assert warmup_steps(0, 10) == 0


def test_preparing_is_said_only_when_it_prepares(data, tmp_path):
    cfg = TrainConfig(
        data_dir=str(data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        epochs=1,
        max_steps=1,
        **SMALL,
    )
    first: list[str] = []
    train(cfg, log=first.append)
    assert sum(m.startswith("preparing") for m in first) == 1
    assert any(m.startswith("warm-up: 1 step (") for m in first)  # 200 capped for one step
    again: list[str] = []
    train(TrainConfig(**{**cfg.to_json(), "max_steps": 2}), log=again.append)
    assert not any(m.startswith("preparing") for m in again), again


def test_progress_lines_inside_an_epoch_when_no_bar_shows():
    lines: list[str] = []
    progress = EpochLines("epoch 1/6", 56, bar_shown=False, log=lines.append)
    for b in range(56):
        progress.batch_done(b, "loss 3.000")
    assert len(lines) == 9 and lines[0] == "epoch 1/6: batch 6/56, loss 3.000"
    quiet: list[str] = []
    beside_a_bar = EpochLines("epoch 1/6", 56, bar_shown=True, log=quiet.append)
    for b in range(56):
        beside_a_bar.batch_done(b, "loss 3.000")
    assert quiet == []


def test_max_images_prepares_a_seeded_subset(data, tmp_path):
    settings = PrepareSettings(None, 1, 0.2, 0.2, 0, max_images=10)
    said: list[str] = []
    prepared = prepare(data, tmp_path / "a", settings, log=said.append)
    assert len(prepared.captions) == 10
    s = prepared.splits
    assert len(s.train) + len(s.val) + len(s.test) == 10
    assert any("using 10 of the 20" in m for m in said)
    again = prepare(data, tmp_path / "b", settings)
    assert sorted(again.captions) == sorted(prepared.captions)  # same seed, same subset
    saved = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert saved["settings"]["max_images"] == 10
    full = prepare(data, tmp_path / "c", PrepareSettings(None, 1, 0.2, 0.2, 0))
    saved = json.loads((tmp_path / "c" / "dataset.json").read_text())
    assert "max_images" not in saved["settings"] and len(full.captions) == 20


def test_max_images_is_a_prepare_flag(data, tmp_path):
    result = CliRunner().invoke(
        app,
        ["prepare", "--data-dir", str(data), "--work-dir", str(tmp_path / "w"),
         "--max-images", "10", "--min-count", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "10 images" in result.output
    help_text = CliRunner().invoke(app, ["prepare", "--help"]).output
    assert "--max-images" in help_text


def test_a_min_count_no_word_reaches_is_refused(data, tmp_path):
    with pytest.raises(DataError, match="lower --min-count"):
        prepare(data, tmp_path / "w", PrepareSettings(None, 100_000, 0.2, 0.2, 0))
    assert not (tmp_path / "w" / "dataset.json").exists()


def test_a_split_with_no_dev_images_is_refused(tmp_path):
    tiny = make_shapes_dataset(tmp_path / "tiny", num_images=4, seed=1)
    with pytest.raises(DataError, match="--val-size 0.1 of 4 images rounds to no dev images"):
        prepare(tiny, tmp_path / "w", PrepareSettings(None, 1, 0.25, 0.1, 0))
    assert not (tmp_path / "w" / "dataset.json").exists()


def test_sizes_that_cannot_be_allocated_are_refused():
    with pytest.raises(ConfigError, match="--hidden-dim must be from 1 to 16384"):
        TrainConfig(hidden_dim=10**9)
    with pytest.raises(ConfigError, match="hidden_dim must be from 1 to 16384"):
        DecoderConfig.from_json({"vocab_size": 100, "hidden_dim": 10**9})
    with pytest.raises(ConfigError, match="parameters, more than the 1,000,000,000 allowed"):
        DecoderConfig(vocab_size=900_000, embed_dim=4096, hidden_dim=4096)
    result = CliRunner().invoke(app, ["train", "--hidden-dim", "1000000000"])
    assert result.exit_code == 2 and "16384" in result.output


def test_more_threads_than_cores_are_capped():
    notes: list[str] = []
    cores = available_cores()
    assert cap_threads(999, log=notes.append) == cores
    assert "999" in notes[0] and str(cores) in notes[0]
    assert cap_threads(1, log=notes.append) == 1 and len(notes) == 1
    assert cap_threads(0, log=notes.append) == 0  # 0 = all cores, as before
