"""Shared fixtures: a synthetic shapes dataset (always available) and Flickr8k (when present)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("CAPTIONER_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Exported ONNX files go to a per-session folder, not the user's cache."""
    if "CAPTIONER_CACHE" not in os.environ:
        os.environ["CAPTIONER_CACHE"] = str(tmp_path_factory.mktemp("captioner-cache"))
    yield


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    if not (FLICKR8K / "captions.txt").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR8K} (integration data lives in ../shared)")
    return FLICKR8K


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """60 synthetic images of two coloured shapes, 5 captions each, Flickr-style captions.txt."""
    from captioner.data.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=60, seed=1)


@pytest.fixture(scope="session")
def shapes_prepared(shapes_dir, tmp_path_factory):
    """The shapes dataset prepared (random seeded split) into a work dir."""
    from captioner.data.prepare import PrepareSettings, prepare

    work = tmp_path_factory.mktemp("shapes-work")
    return prepare(
        shapes_dir,
        work,
        PrepareSettings(num_words=None, min_count=1, test_size=0.2, val_size=0.2, seed=0),
    )


@pytest.fixture(scope="session")
def tiny_model_dir(shapes_prepared, tmp_path_factory) -> Path:
    """An untrained small decoder with the shapes vocabulary, saved as a model directory."""
    from captioner.features.encoders import get_spec
    from captioner.model.captioning_model import CaptioningModel
    from captioner.model.config import DecoderConfig
    from captioner.model.decoder import ShowAttendTellDecoder

    torch.manual_seed(0)
    spec = get_spec("efficientnet-lite0")
    config = DecoderConfig(
        vocab_size=len(shapes_prepared.vocab),
        feature_dim=spec.channels,
        num_pixels=spec.num_pixels,
        embed_dim=32,
        hidden_dim=48,
        attention_dim=40,
        context_dim=24,
        dropout=0.0,
    )
    model = CaptioningModel(ShowAttendTellDecoder(config), shapes_prepared.vocab, spec)
    return model.save_pretrained(tmp_path_factory.mktemp("tiny-model") / "model")
