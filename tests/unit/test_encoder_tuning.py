"""Fine-tuning the encoder's last blocks with the decoder: the split reproduces the whole
network, the grounding keeps seeing the frozen one, and a tuned model trains, saves, loads,
averages and goes through self-critical training like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_training import TINY

from captioner.data.synthetic import make_shapes_dataset
from captioner.errors import ConfigError
from captioner.features.encoders import (
    build_encoder,
    concept_head,
    encoder_top,
    get_spec,
    split_trunk_name,
    trunk_name,
)
from captioner.model.config import DecoderConfig
from captioner.model.decoder import ShowAttendTellDecoder
from captioner.training.schedule import param_groups, set_lr


def _small_top_config(vocab_size: int, blocks: int) -> DecoderConfig:
    """A tiny decoder that runs lite0's last ``blocks`` blocks on a trunk's 192-channel grid."""
    return DecoderConfig(
        vocab_size=vocab_size,
        feature_dim=192,
        encoder_top="efficientnet-lite0",
        encoder_top_blocks=blocks,
        embed_dim=8,
        hidden_dim=8,
        attention_dim=8,
        context_dim=8,
    )


def test_trunk_then_pretrained_top_is_the_whole_encoder():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    whole = build_encoder("efficientnet-lite0")
    trunk = build_encoder("efficientnet-lite0-trunk4")
    top = encoder_top("efficientnet-lite0", 4)
    with torch.inference_mode():
        grid, trunk_grid = whole(images), trunk(images)  # (2, 49, 1280), (2, 49, 192)
        assert trunk_grid.shape == (2, 49, 192)
        torch.testing.assert_close(top(trunk_grid), grid, atol=1e-4, rtol=1e-4)
        # the grounding reads the frozen network's concepts from either grid
        logits = whole.concept_logits(grid)
        torch.testing.assert_close(trunk.concept_logits(trunk_grid), logits, atol=1e-4, rtol=0)
        head = concept_head("efficientnet-lite0-trunk4")
        torch.testing.assert_close(head(trunk_grid), logits, atol=1e-4, rtol=0)
        # ... and its domain scorer and word model the frozen network's pooled grid
        torch.testing.assert_close(head.pooled(trunk_grid), grid.mean(dim=1), atol=1e-4, rtol=0)


def test_trunk_names_and_the_splits_an_encoder_allows():
    assert trunk_name("efficientnet-lite0", 0) == "efficientnet-lite0"
    assert split_trunk_name("efficientnet-lite0-trunk3") == ("efficientnet-lite0", 3)
    assert split_trunk_name("efficientnet-lite2-224") == ("efficientnet-lite2-224", 0)
    assert get_spec("efficientnet-lite0-trunk4").channels == 192
    assert get_spec("efficientnet-lite0-trunk1").channels == 192
    assert get_spec("efficientnet-lite2-224-trunk2").channels == 208
    assert get_spec("efficientnet-lite0-trunk4").num_pixels == 49  # the grid stays 7x7
    with pytest.raises(ConfigError, match="at most its last 4 blocks"):
        get_spec("efficientnet-lite0-trunk5")  # block 11 halves the grid
    for name in ("resnet-trunk2", "efficientnet-lite0-trunk0"):
        with pytest.raises(ConfigError, match="unknown encoder"):
            get_spec(name)


def test_tuned_top_learns_but_keeps_imagenet_batch_statistics():
    torch.manual_seed(0)
    config = _small_top_config(vocab_size=12, blocks=1)
    decoder = ShowAttendTellDecoder(config, pretrained_top=True).train()
    assert not decoder.encoder_top.training  # batch norm and drop-connect stay in eval mode
    stats = {k: v.clone() for k, v in decoder.encoder_top.state_dict().items() if "running" in k}
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    out = decoder(torch.randn(2, 49, 192), captions, torch.tensor([4, 3]))
    torch.nn.functional.cross_entropy(out.logits, out.targets).backward()
    grads = [p.grad for p in decoder.encoder_top.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for key, value in decoder.encoder_top.state_dict().items():
        if key in stats:
            torch.testing.assert_close(value, stats[key], rtol=0, atol=0, msg=key)
    groups = param_groups(decoder, 0.1)
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert sum(len(g["params"]) for g in groups) == len(list(decoder.parameters()))
    optimizer = torch.optim.Adam(groups, lr=1.0)
    set_lr(optimizer, 2e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-3, 2e-4])


def test_config_needs_the_encoder_with_its_block_count():
    with pytest.raises(ConfigError, match="go together"):
        DecoderConfig(vocab_size=12, feature_dim=192, encoder_top_blocks=2)


@pytest.mark.slow
def test_tuned_model_trains_saves_loads_averages_and_self_criticises(tmp_path):
    from captioner.api import Captioner
    from captioner.data.prepare import PreparedData
    from captioner.model.captioning_model import CaptioningModel
    from captioner.training.averaging import average_run
    from captioner.training.config import ScstConfig, TrainConfig
    from captioner.training.loop import train
    from captioner.training.scst import train_scst

    data = make_shapes_dataset(tmp_path / "data", num_images=30, seed=7)
    cfg = TrainConfig(
        data_dir=str(data),
        work_dir=str(tmp_path / "w"),
        run_dir=str(tmp_path / "r"),
        epochs=2,
        keep_epochs=2,
        tune_encoder_blocks=1,
        encoder_lr=1e-3,
        **TINY,
    )
    best = train(cfg)
    assert (tmp_path / "w" / "features" / "efficientnet-lite0-trunk1-224").is_dir()
    model = CaptioningModel.from_pretrained(best)
    assert model.encoder.name == "efficientnet-lite0-trunk1"
    tuned = model.decoder.encoder_top.state_dict()
    pretrained = encoder_top("efficientnet-lite0", 1).state_dict()
    moved = [k for k in tuned if tuned[k].is_floating_point() and "running" not in k]
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in moved), "the top never learned"
    for key in tuned:
        if "running" in key:
            torch.testing.assert_close(tuned[key], pretrained[key], rtol=0, atol=0, msg=key)

    averaged = average_run(tmp_path / "r", tmp_path / "avg", last=2)
    prepared = PreparedData.load(cfg.work_dir)
    photos = [prepared.images_dir / n for n in prepared.splits.test[:3]]
    onnx = Captioner.from_pretrained(averaged).caption(photos, beam_size=2)
    plain = Captioner.from_pretrained(averaged, backend="torch").caption(photos, beam_size=2)
    assert [r.caption for r in onnx] == [r.caption for r in plain]
    # what the grounding reads is the frozen network's: the same concepts as the whole encoder
    from captioner.data.images import load_image
    from captioner.features.encoders import preprocess
    from captioner.features.onnx import FeatureExtractor
    from captioner.grounding.domain import pooled

    captioner = Captioner.from_pretrained(averaged)
    trunk_grid, logits = captioner.encode_with_concepts(photos)
    batch = preprocess([load_image(p) for p in photos], get_spec("efficientnet-lite0"))
    whole_grid, whole = FeatureExtractor("efficientnet-lite0").with_concepts(batch)
    np.testing.assert_allclose(logits, whole, atol=1e-3)
    from_cache = captioner._grounding_features(trunk_grid)  # the frozen top run in torch
    np.testing.assert_allclose(from_cache, pooled(whole_grid), atol=1e-4)
    # what a grounded model's encode_for_caption passes on: the encoder graph's own output
    _, _, from_graph = captioner._encode_arrays([load_image(p) for p in photos], concepts=True)
    np.testing.assert_allclose(from_graph, pooled(whole_grid), atol=1e-4)
    for backend in ("onnx", "torch"):
        extractor = FeatureExtractor(captioner.spec.name, backend)
        _, _, mean = extractor.with_grounding(batch)
        np.testing.assert_allclose(mean, whole_grid.mean(axis=1), atol=1e-4)

    scst = ScstConfig(
        init_model=str(averaged),
        work_dir=cfg.work_dir,
        run_dir=str(tmp_path / "s"),
        images_per_batch=4,
        samples_per_image=3,
        max_length=8,
        lr=1e-3,
        encoder_lr=1e-3,
        threads=1,
        val_images=4,
        epochs=1,
    )
    after = CaptioningModel.from_pretrained(train_scst(scst))
    before = CaptioningModel.from_pretrained(averaged).decoder.encoder_top.state_dict()
    changed = after.decoder.encoder_top.state_dict()
    assert any(not torch.equal(changed[k], before[k]) for k in moved)


def test_a_model_refuses_a_top_that_does_not_fit_its_trunk():
    from captioner.data.vocab import Vocabulary
    from captioner.model.captioning_model import CaptioningModel

    vocab = Vocabulary.build(["a red square"], num_words=None)
    config = _small_top_config(vocab_size=len(vocab), blocks=2)
    decoder = ShowAttendTellDecoder(config)
    with pytest.raises(ConfigError, match="last 2 blocks of efficientnet-lite0.*trunk4"):
        CaptioningModel(decoder, vocab, get_spec("efficientnet-lite0-trunk4"))
    CaptioningModel(decoder, vocab, get_spec("efficientnet-lite0-trunk2"))  # fits


def test_caption_hands_the_encoded_grounding_features_on(tiny_model_dir, monkeypatch):
    """caption() must pass on what encode_for_caption gives (a trunk's pooled features), or the
    grounding would run the frozen top again in torch for every photo."""
    from captioner.api import Captioner

    captioner = Captioner.from_pretrained(tiny_model_dir)
    pooled = np.ones((1, 1280), np.float32)
    encoded = {"features": torch.zeros(1, 49, 1280), "concept_logits": None}
    monkeypatch.setattr(
        captioner, "encode_for_caption", lambda images: {**encoded, "grounding_features": pooled}
    )
    seen: dict = {}
    monkeypatch.setattr(captioner, "caption_features", lambda *a, **k: seen.update(k) or ["r"])
    captioner.caption([np.zeros((8, 8, 3), np.uint8)])
    assert seen["grounding_features"] is pooled
