"""Training never saves non-finite weights: a NaN loss stops the run with a clear error that says
where, and every writer (checkpoints, epochs/, best/, averages) refuses NaN weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from tiny_training import TINY

from captioner.data.prepare import PreparedData
from captioner.data.synthetic import make_shapes_dataset
from captioner.data.vocab import SPECIAL_TOKENS, Vocabulary
from captioner.errors import CheckpointError
from captioner.training.averaging import average_state_dicts, save_epoch_weights
from captioner.training.caption_reward import CaptionReward
from captioner.training.checkpoint import list_checkpoints, save_checkpoint
from captioner.training.cider_reward import CiderD
from captioner.training.config import ScstConfig, TrainConfig
from captioner.training.guards import NonFiniteError, check_finite_loss
from captioner.training.loop import train
from captioner.training.scst import scst_step

SMALL = dict(TINY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("guard-data"), num_images=24, seed=4)


def poison_features(work_dir: Path, wanted: list[str]) -> None:
    """Set these images' cached grids to NaN in place (same byte count: sizes still fit)."""
    hit = 0
    for shard in sorted((Path(work_dir) / "features").rglob("view0/shard_*.safetensors")):
        with safe_open(str(shard), framework="numpy") as handle:
            metadata = handle.metadata()
        names = json.loads(metadata["images"])
        tensors = load_numpy(str(shard))
        rows = [names.index(n) for n in wanted if n in names]
        tensors["features"][rows] = np.nan
        save_numpy(tensors, str(shard), metadata=metadata)
        hit += len(rows)
    assert hit == len(wanted)


def _all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def test_a_nan_feature_stops_training_and_saves_nothing_non_finite(data, tmp_path):
    cfg = TrainConfig(
        data_dir=str(data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        epochs=1,
        max_steps=1,
        **SMALL,
    )
    train(cfg)  # one good checkpoint, features cached
    before = list_checkpoints(tmp_path / "r" / "checkpoints")
    train_names = PreparedData.load(tmp_path / "w").splits.train
    poison_features(tmp_path / "w", train_names)

    longer = TrainConfig(**{**cfg.to_json(), "max_steps": 0, "epochs": 2})
    with pytest.raises(NonFiniteError, match=r"loss is nan at step 2 \(epoch 1, batch 2\)") as err:
        train(longer)
    assert "captioner features" in str(err.value)
    assert any(name in str(err.value) for name in train_names)
    after = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert after == before  # nothing of the poisoned steps was written
    assert all(_all_finite(c / "model.safetensors") for c in after)
    assert not (tmp_path / "r" / "best").exists()  # the epoch never finished
    assert not list((tmp_path / "r").glob("epochs/*.safetensors"))


def test_checkpoints_and_epoch_weights_refuse_nan(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="weight"):
        save_checkpoint(tmp_path / "ckpt", 3, model, optimizer, {"epoch": 0})
    assert list_checkpoints(tmp_path / "ckpt") == []
    assert not any((tmp_path / "ckpt").glob(".tmp_*"))
    with pytest.raises(NonFiniteError):
        save_epoch_weights(tmp_path, 1, model, keep=3)
    assert not (tmp_path / "epochs" / "epoch_001.safetensors").exists()


def test_averaging_refuses_a_nan_epoch(tmp_path):
    good, bad = tmp_path / "epoch_001.safetensors", tmp_path / "epoch_002.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(good))
    save_file({"w": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])}, str(bad))
    with pytest.raises(CheckpointError, match="epoch_002.*NaN"):
        average_state_dicts([good, bad])


def test_scst_stops_before_sampling_from_nan_features():
    vocab = Vocabulary([*SPECIAL_TOKENS, "a", "dog", "runs"])
    reward = CaptionReward(CiderD([[vocab.encode("a dog runs", add_special=False)]] * 2))
    from captioner.model.config import DecoderConfig
    from captioner.model.decoder import ShowAttendTellDecoder

    torch.manual_seed(0)
    decoder = ShowAttendTellDecoder(
        DecoderConfig(
            vocab_size=len(vocab),
            feature_dim=8,
            num_pixels=4,
            embed_dim=8,
            hidden_dim=8,
            attention_dim=8,
            context_dim=8,
            dropout=0.0,
        )
    )
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    feats = torch.randn(2, 4, 8)
    feats[1, 2, 3] = float("nan")
    cfg = ScstConfig(init_model="unused", samples_per_image=2, max_length=4)

    def guard(value: float) -> None:
        check_finite_loss(
            value,
            "the self-critical loss",
            step=6,
            epoch=0,
            batch=6,
            feats=feats,
            image_names=["a.jpg", "b.jpg"],
        )

    with pytest.raises(NonFiniteError, match=r"loss is nan at step 7 .*b\.jpg"):
        scst_step(
            decoder,
            optimizer,
            feats,
            torch.tensor([0, 1]),
            reward,
            cfg,
            vocab,
            torch.Generator().manual_seed(0),
            guard=guard,
        )
    for key, value in decoder.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
