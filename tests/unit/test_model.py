"""The Show-Attend-Tell decoder (teacher forcing vs step-by-step, gradients, loss), its config,
the saved-model directory, the ONNX decoder, and the public ``Captioner`` API end to end."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from captioner.api import Captioner, CaptionResult
from captioner.data.vocab import SPECIAL_TOKENS, Vocabulary
from captioner.errors import (
    CaptionerError,
    CheckpointError,
    ConfigError,
    ImageLoadError,
)
from captioner.features.encoders import get_spec
from captioner.model import onnx_decoder
from captioner.model.captioning_model import CaptioningModel
from captioner.model.config import DecoderConfig
from captioner.model.decoder import ShowAttendTellDecoder, masked_caption_loss
from captioner.model.onnx_decoder import (
    OrtStepper,
    export_decoder,
    exported_decoder_dir,
    weights_digest,
)

CELLS = ("gru", "lstm")
V, P, C = 23, 9, 16  # small vocabulary and grid for the unit-level decoder tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_decoder(cell: str = "gru", seed: int = 0, **overrides) -> ShowAttendTellDecoder:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=V,
        feature_dim=C,
        num_pixels=P,
        cell=cell,
        embed_dim=12,
        hidden_dim=20,
        attention_dim=14,
        context_dim=10,
        dropout=0.0,
    )
    kwargs.update(overrides)
    return ShowAttendTellDecoder(DecoderConfig(**kwargs)).eval()


def make_batch(lengths: list[int], vocab_size: int = V, seed: int = 1):
    """captions (B, L): <start> words <end> <pad>..., lengths count <start> through <end>."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths) + 2
    captions = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        captions[b, 0] = 1
        captions[b, 1 : n - 1] = torch.randint(4, vocab_size, (n - 2,), generator=g)
        captions[b, n - 1] = 2
    return captions, torch.tensor(lengths)


LENGTHS = [6, 9, 3, 9, 5, 4, 7, 2]  # ties (9, 9) and a caption that is just <start> <end>


def stepwise(decoder, features, captions, steps):
    """Run step() over the whole batch for `steps` steps: logits (B, T, V), alphas (B, T, P)."""
    memory, state = decoder.start(features)
    logits, alphas = [], []
    for t in range(steps):
        out, state, alpha = decoder.step(captions[:, t], state, memory)
        logits.append(out)
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


def packed_positions(lengths: torch.Tensor) -> list[tuple[int, int]]:
    """(caption, step) of each row of forward()'s logits: step-major, length-sorted (stable)."""
    steps = lengths - 1
    order = torch.argsort(steps, descending=True, stable=True).tolist()
    return [(b, t) for t in range(int(steps.max())) for b in order if t < steps[b]]


# ---- teacher forcing vs step-by-step -------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_forward_matches_step(cell):
    decoder = make_decoder(cell)
    captions, lengths = make_batch(LENGTHS)
    features = torch.randn(len(LENGTHS), P, C, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = decoder(features, captions, lengths)
        T = int(lengths.max()) - 1
        step_logits, step_alphas = stepwise(decoder, features, captions, T)
    positions = packed_positions(lengths)
    assert out.logits.shape == (sum(n - 1 for n in LENGTHS), V)
    assert len(positions) == out.logits.size(0)
    expected = torch.stack([step_logits[b, t] for b, t in positions])
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    targets = torch.tensor([int(captions[b, t + 1]) for b, t in positions])
    assert torch.equal(out.targets, targets)
    assert bool((out.targets != 0).all())  # padding is never a target
    mask = torch.arange(T).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    assert torch.equal(out.mask, mask)
    assert out.alphas.shape == (len(LENGTHS), T, P)
    torch.testing.assert_close(out.alphas[mask], step_alphas[mask], atol=1e-6, rtol=1e-5)
    assert bool((out.alphas[~mask] == 0).all())
    torch.testing.assert_close(out.alphas[mask].sum(-1), torch.ones(int(mask.sum())))


@pytest.mark.parametrize("cell", CELLS)
def test_image_index_equals_repeated_features(cell):
    decoder = make_decoder(cell, seed=3)
    captions, lengths = make_batch([5, 7, 4, 7, 3], seed=4)
    features = torch.randn(2, P, C, generator=torch.Generator().manual_seed(5))
    image_index = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        shared = decoder(features, captions, lengths, image_index=image_index)
        repeated = decoder(features[image_index], captions, lengths)
    torch.testing.assert_close(shared.logits, repeated.logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(shared.targets, repeated.targets)
    assert torch.equal(shared.mask, repeated.mask)
    torch.testing.assert_close(shared.alphas, repeated.alphas, atol=1e-6, rtol=1e-6)


def test_step_output_shapes_and_state():
    for cell, n_state in (("gru", 1), ("lstm", 2)):
        decoder = make_decoder(cell)
        memory, state = decoder.start(torch.randn(3, P, C))
        assert len(memory) == 2 and memory[0].shape == (3, P, 10) and memory[1].shape == (3, P, 14)
        assert len(state) == n_state and all(s.shape == (3, 20) for s in state)
        logits, new_state, alpha = decoder.step(torch.tensor([1, 5, 2]), state, memory)
        assert logits.shape == (3, V) and alpha.shape == (3, P)
        assert len(new_state) == n_state
        torch.testing.assert_close(alpha.sum(1), torch.ones(3))
        assert not torch.equal(new_state[0], state[0])


# ---- gradients and loss --------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_reach_every_parameter(cell):
    decoder = make_decoder(cell).train()
    captions, lengths = make_batch(LENGTHS, seed=6)
    features = torch.randn(len(LENGTHS), P, C, generator=torch.Generator().manual_seed(7))
    loss, ce = masked_caption_loss(decoder(features, captions, lengths), alpha_c=1.0)
    loss.backward()
    assert torch.isfinite(loss) and not ce.requires_grad
    names = {n for n, _ in decoder.named_parameters()}
    assert ("init_c.weight" in names) == (cell == "lstm")
    for name, param in decoder.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets an all-zero gradient"
    emb = decoder.embedding.weight.grad
    assert bool((emb[0] == 0).all())  # the padding row never learns
    # inputs are <start> w1 .. wn: <end>, padding and absent words get no gradient
    used = {int(captions[b, t]) for b, n in enumerate(LENGTHS) for t in range(n - 1)}
    assert 2 not in used
    for token in range(1, V):
        assert bool((emb[token] != 0).any()) == (token in used), token


@pytest.mark.parametrize("cell", CELLS)
def test_loss_ignores_padding(cell):
    decoder = make_decoder(cell)
    captions, lengths = make_batch(LENGTHS, seed=8)
    features = torch.randn(len(LENGTHS), P, C, generator=torch.Generator().manual_seed(9))
    noisy = captions.clone()
    after_end = torch.arange(captions.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)
    noisy[after_end] = torch.randint(
        4, V, (int(after_end.sum()),), generator=torch.Generator().manual_seed(10)
    )
    assert not torch.equal(noisy, captions)
    with torch.no_grad():
        base = masked_caption_loss(decoder(features, captions, lengths))
        padded = masked_caption_loss(decoder(features, noisy, lengths))
        changed = captions.clone()
        changed[0, 2] = 4 if int(changed[0, 2]) != 4 else 5  # a real token: the loss moves
        moved = masked_caption_loss(decoder(features, changed, lengths))
    torch.testing.assert_close(padded[0], base[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(padded[1], base[1], atol=1e-6, rtol=1e-6)
    assert abs(float(moved[1]) - float(base[1])) > 1e-6


def test_masked_caption_loss_terms():
    decoder = make_decoder("gru")
    captions, lengths = make_batch(LENGTHS, seed=11)
    features = torch.randn(len(LENGTHS), P, C, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        out = decoder(features, captions, lengths)
    ce_manual = F.cross_entropy(out.logits, out.targets)
    total0, ce0 = masked_caption_loss(out, alpha_c=0.0)
    torch.testing.assert_close(total0, ce_manual)
    torch.testing.assert_close(ce0, ce_manual)
    penalty = ((1.0 - out.alphas.sum(dim=1)) ** 2).mean()
    assert float(penalty) > 0
    total2, ce2 = masked_caption_loss(out, alpha_c=2.0)
    torch.testing.assert_close(ce2, ce_manual)
    torch.testing.assert_close(total2 - ce2, 2.0 * penalty)
    assert float(total2 - ce2) >= 0
    total_neg, _ = masked_caption_loss(out, alpha_c=-1.0)  # a non-positive weight: no penalty
    torch.testing.assert_close(total_neg, ce_manual)
    smooth, smooth_ce = masked_caption_loss(out, alpha_c=0.0, label_smoothing=0.1)
    torch.testing.assert_close(
        smooth, F.cross_entropy(out.logits, out.targets, label_smoothing=0.1)
    )
    assert abs(float(smooth) - float(ce_manual)) > 1e-4


def test_masked_caption_loss_penalty_zero_for_perfect_coverage():
    from captioner.model.decoder import TeacherForcedOutput

    logits = torch.randn(4, V)
    alphas = torch.full((2, 3, 3), 1.0 / 3)  # every pixel attended exactly once over 3 steps
    out = TeacherForcedOutput(
        logits, torch.tensor([4, 5, 6, 2]), alphas, torch.ones(2, 3, dtype=torch.bool)
    )
    total, ce = masked_caption_loss(out, alpha_c=5.0)
    torch.testing.assert_close(total, ce)


# ---- DecoderConfig -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"cell": "rnn"}, "cell"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"feature_dim": -3}, "feature_dim"),
        ({"num_pixels": 0}, "num_pixels"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"attention_dim": 0}, "attention_dim"),
        ({"context_dim": 0}, "context_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_decoder_config_rejects_bad_values(overrides, match):
    kwargs = {"vocab_size": 10, **overrides}
    with pytest.raises(ConfigError, match=match):
        DecoderConfig(**kwargs)
    with pytest.raises(ConfigError, match=match):
        DecoderConfig.from_json(kwargs)


def test_decoder_config_json_round_trip_and_unknown_keys():
    config = DecoderConfig(vocab_size=50, cell="lstm", embed_dim=8, dropout=0.5)
    data = json.loads(json.dumps(config.to_json()))
    assert data["cell"] == "lstm" and data["vocab_size"] == 50
    assert DecoderConfig.from_json(data) == config
    with pytest.raises(ConfigError, match="unknown decoder config keys: \\['layers'\\]"):
        DecoderConfig.from_json({**data, "layers": 2})
    config.dropout = 2.0
    with pytest.raises(ConfigError):
        config.validate()


# ---- CaptioningModel: save / load ----------------------------------------------------------
SPEC = get_spec("efficientnet-lite0")
WORDS = ["a", "red", "blue", "circle", "square", "above", "below", "left", "of", "the"]


def make_model(cell: str = "gru", seed: int = 0) -> CaptioningModel:
    vocab = Vocabulary([*SPECIAL_TOKENS, *WORDS])
    decoder = make_decoder(
        cell, seed, vocab_size=len(vocab), feature_dim=SPEC.channels, num_pixels=SPEC.num_pixels
    )
    return CaptioningModel(decoder, vocab, SPEC)


def model_outputs(model: CaptioningModel):
    captions, lengths = make_batch([5, 7, 3], vocab_size=len(model.vocab), seed=13)
    features = torch.randn(
        3, SPEC.num_pixels, SPEC.channels, generator=torch.Generator().manual_seed(14)
    )
    with torch.no_grad():
        out = model.decoder(features, captions, lengths)
    return out.logits, out.alphas


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    model = make_model("lstm")
    return model.save_pretrained(
        tmp_path_factory.mktemp("saved") / "model", extra={"note": "unit test"}
    )


def broken_copy(saved_model: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(saved_model, target)
    return target


def test_save_pretrained_round_trip(saved_model):
    original = make_model("lstm")
    assert sorted(p.name for p in saved_model.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "vocab.json",
    ]
    generation = json.loads((saved_model / "generation_config.json").read_text())
    assert generation == {
        "beam_size": 3,
        "max_length": 20,
        "length_penalty": 1.0,
        "suppress_unk": True,
        "no_repeat_ngram_size": 2,  # the bundle's repeat blocking: trained models inherit it
        "prefer_sentences": True,
    }
    config = json.loads((saved_model / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["decoder"] == original.decoder.config.to_json()
    assert config["encoder"] == SPEC.to_json()
    assert config["extra"] == {"note": "unit test"}
    assert json.loads((saved_model / "vocab.json").read_text())["itos"] == original.vocab.itos
    loaded = CaptioningModel.from_pretrained(saved_model)
    assert not loaded.decoder.training
    assert loaded.decoder.config == original.decoder.config
    assert loaded.vocab.itos == original.vocab.itos
    assert loaded.encoder == SPEC
    assert loaded.extra == {"note": "unit test"}
    for key, value in original.decoder.state_dict().items():
        assert torch.equal(loaded.decoder.state_dict()[key], value), key
    for a, b in zip(model_outputs(original), model_outputs(loaded), strict=True):
        assert torch.equal(a, b)


def test_save_without_extra_has_no_extra_key(tmp_path):
    path = make_model().save_pretrained(tmp_path / "m")
    assert "extra" not in json.loads((path / "config.json").read_text())
    assert CaptioningModel.from_pretrained(path).extra == {}


def test_fp16_save_loads_close(tmp_path):
    model = make_model("gru", seed=2)
    path32 = model.save_pretrained(tmp_path / "fp32")
    path16 = model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    with safe_open(str(path16 / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    size16 = (path16 / "model.safetensors").stat().st_size
    assert size16 < 0.6 * (path32 / "model.safetensors").stat().st_size
    loaded = CaptioningModel.from_pretrained(path16)
    assert {p.dtype for p in loaded.decoder.parameters()} == {torch.float32}
    (ref_logits, ref_alphas), (logits, alphas) = model_outputs(model), model_outputs(loaded)
    assert not torch.equal(logits, ref_logits)  # it really was rounded
    scale = float(ref_logits.abs().max())
    assert float((logits - ref_logits).abs().max()) <= 1e-2 * max(1.0, scale)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-3, rtol=1e-2)


def test_constructor_checks_vocab_and_feature_dim():
    vocab = Vocabulary([*SPECIAL_TOKENS, *WORDS])
    with pytest.raises(ConfigError, match="vocab_size"):
        CaptioningModel(make_decoder(vocab_size=len(vocab) + 1, feature_dim=1280), vocab, SPEC)
    with pytest.raises(ConfigError, match="feature_dim"):
        CaptioningModel(make_decoder(vocab_size=len(vocab), feature_dim=64), vocab, SPEC)


@pytest.mark.parametrize("missing", ["config.json", "vocab.json", "model.safetensors"])
def test_from_pretrained_missing_file(saved_model, tmp_path, missing):
    path = broken_copy(saved_model, tmp_path)
    (path / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing} is missing") as info:
        CaptioningModel.from_pretrained(path)
    assert str(path) in str(info.value)


def test_from_pretrained_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a saved captioner model"):
        CaptioningModel.from_pretrained(tmp_path / "nowhere")


def edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_from_pretrained_corrupt_config(saved_model, tmp_path):
    path = broken_copy(saved_model, tmp_path)
    (path / "config.json").write_text('{"format_version": 1, ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CaptioningModel.from_pretrained(path)


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda c: c.update(format_version=2), CheckpointError, "format_version"),
        (lambda c: c["encoder"].update(image_size=300), CheckpointError, "encoder settings"),
        (lambda c: c["encoder"].update(name="resnet"), ConfigError, "unknown encoder"),
        (lambda c: c["decoder"].update(hidden_dim=21), CheckpointError, "has shape"),
        (lambda c: c["decoder"].update(cell="gru"), CheckpointError, "do not match"),
        (lambda c: c["decoder"].update(depth=3), ConfigError, "unknown decoder config keys"),
        (lambda c: c["decoder"].update(dropout=1.5), ConfigError, "dropout"),
        # a grid that is not the encoder's loaded, then failed in ONNX Runtime at the first caption
        (lambda c: c["decoder"].update(num_pixels=50), CheckpointError, "num_pixels 50, "),
        (lambda c: c["decoder"].update(feature_dim=64), CheckpointError, "feature_dim 64, "),
    ],
)
def test_from_pretrained_incompatible_config(saved_model, tmp_path, edit, error, match):
    path = broken_copy(saved_model, tmp_path)
    edit_config(path, edit)
    with pytest.raises(error, match=match):
        CaptioningModel.from_pretrained(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.pop("encoder"),
        lambda c: c["decoder"].pop("vocab_size"),
    ],
)
def test_from_pretrained_incomplete_config(saved_model, tmp_path, edit):
    path = broken_copy(saved_model, tmp_path)
    edit_config(path, edit)
    with pytest.raises((CheckpointError, ConfigError)):
        CaptioningModel.from_pretrained(path)


def test_from_pretrained_bad_weights(saved_model, tmp_path):
    path = broken_copy(saved_model, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable weights"):
        CaptioningModel.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        CaptioningModel.from_pretrained(path)


def test_from_pretrained_missing_and_unexpected_tensors(saved_model, tmp_path):
    path = broken_copy(saved_model, tmp_path)
    state = load_file(str(saved_model / "model.safetensors"))
    state.pop("out_vocab.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="out_vocab.bias") as info:
        CaptioningModel.from_pretrained(path)
    assert "extra.weight" in str(info.value)


def test_from_pretrained_wrong_tensor_shape(saved_model, tmp_path):
    path = broken_copy(saved_model, tmp_path)
    state = load_file(str(saved_model / "model.safetensors"))
    state["out_vocab.bias"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="out_vocab.bias has shape \\(3,\\)"):
        CaptioningModel.from_pretrained(path)


def test_from_pretrained_mismatched_vocab(saved_model, tmp_path):
    path = broken_copy(saved_model, tmp_path)
    Vocabulary([*SPECIAL_TOKENS, *WORDS, "extra"]).save(path / "vocab.json")
    with pytest.raises((CheckpointError, ConfigError), match="vocab"):
        CaptioningModel.from_pretrained(path)
    (path / "vocab.json").write_text("{broken")
    with pytest.raises(CaptionerError):
        CaptioningModel.from_pretrained(path)


# ---- ONNX decoder --------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_ort_stepper_matches_torch(cell, tmp_path):
    decoder = make_decoder(cell, seed=21)
    start_path, step_path = export_decoder(decoder, tmp_path)
    assert start_path.is_file() and step_path.is_file()
    stepper = OrtStepper(tmp_path, cell, threads=1)
    features = torch.randn(3, P, C, generator=torch.Generator().manual_seed(22))  # batch != 2
    with torch.no_grad():
        t_memory, t_state = decoder.start(features)
    o_memory, o_state = stepper.start(features)
    assert len(o_state) == len(t_state) == (1 if cell == "gru" else 2)
    for a, b in zip((*t_memory, *t_state), (*o_memory, *o_state), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    tokens = torch.tensor([1, 1, 1])
    g = torch.Generator().manual_seed(23)
    for _ in range(4):
        with torch.no_grad():
            t_logits, t_state, t_alpha = decoder.step(tokens, t_state, t_memory)
        o_logits, o_state, o_alpha = stepper.step(tokens, o_state, o_memory)
        assert o_logits.shape == (3, V) and o_alpha.shape == (3, P)
        torch.testing.assert_close(o_logits, t_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(o_alpha, t_alpha, atol=1e-4, rtol=1e-4)
        for a, b in zip(t_state, o_state, strict=True):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        tokens = torch.randint(4, V, (3,), generator=g)
    # a different batch size again, on rows selected like beam search does
    idx = torch.tensor([2, 0])
    rows = lambda x: tuple(t.index_select(0, idx) for t in x)  # noqa: E731
    with torch.no_grad():
        t_logits, _, _ = decoder.step(tokens[idx], rows(t_state), rows(t_memory))
    o_logits, _, _ = stepper.step(tokens[idx], rows(o_state), rows(o_memory))
    torch.testing.assert_close(o_logits, t_logits, atol=1e-4, rtol=1e-4)


def test_exported_decoder_dir_is_cached_by_weights(monkeypatch):
    decoder = make_decoder("gru", seed=31)
    first = exported_decoder_dir(decoder)
    assert (first / "decoder_start.onnx").is_file() and (first / "decoder_step.onnx").is_file()
    assert weights_digest(decoder) in first.name

    def boom(*args, **kwargs):
        raise AssertionError("re-exported a decoder that is already exported")

    monkeypatch.setattr(onnx_decoder, "export_decoder", boom)
    assert exported_decoder_dir(decoder) == first
    other = make_decoder("gru", seed=32)
    assert weights_digest(other) != weights_digest(decoder)
    with torch.no_grad():
        decoder.out_vocab.bias[0] += 1.0
    assert weights_digest(decoder) not in first.name  # any weight change: a new export


def training_modules(module: torch.nn.Module) -> list[str]:
    return [name or "<root>" for name, m in module.named_modules() if m.training]


@pytest.mark.parametrize("was_training", [False, True])
def test_export_decoder_keeps_the_decoder_mode_with_dropout(was_training, tmp_path):
    """torch.onnx.export restores the mode of the module it exports onto every submodule: a
    wrapper left in training mode switched the shared decoder's dropout back on."""
    decoder = make_decoder("gru", seed=41, dropout=0.5).train(was_training)
    export_decoder(decoder, tmp_path)
    assert [m.training for m in decoder.modules()] == [was_training] * len(list(decoder.modules()))
    # the graphs are the eval-mode decoder (no dropout): equal to torch in eval mode
    decoder.eval()
    stepper = OrtStepper(tmp_path, "gru", threads=1)
    features = torch.randn(2, P, C, generator=torch.Generator().manual_seed(42))
    tokens = torch.tensor([1, 1])
    with torch.no_grad():
        t_memory, t_state = decoder.start(features)
        t_logits, _, t_alpha = decoder.step(tokens, t_state, t_memory)
    o_memory, o_state = stepper.start(features)
    o_logits, _, o_alpha = stepper.step(tokens, o_state, o_memory)
    torch.testing.assert_close(o_logits, t_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o_alpha, t_alpha, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory) -> Path:
    """A saved model whose decoder has dropout 0.5, like the bundled one."""
    vocab = Vocabulary([*SPECIAL_TOKENS, *WORDS])
    decoder = make_decoder(
        "gru",
        seed=43,
        vocab_size=len(vocab),
        feature_dim=SPEC.channels,
        num_pixels=SPEC.num_pixels,
        dropout=0.5,
    )
    model = CaptioningModel(decoder, vocab, SPEC)
    return model.save_pretrained(tmp_path_factory.mktemp("dropout-model") / "model")


def test_captioner_with_dropout_exports_and_stays_in_eval(dropout_model_dir, tmp_path, monkeypatch):
    """After a fresh decoder export the Captioner's PyTorch decoder still has dropout off."""
    monkeypatch.setattr(onnx_decoder, "cache_root", lambda: tmp_path)  # the decoder only
    calls = []
    real_export = onnx_decoder.export_decoder

    def counting_export(decoder, out_dir):
        calls.append(out_dir)
        return real_export(decoder, out_dir)

    monkeypatch.setattr(onnx_decoder, "export_decoder", counting_export)
    captioner = Captioner.from_pretrained(dropout_model_dir, backend="onnx", threads=1)
    assert captioner.backend == "onnx" and len(calls) == 1
    assert training_modules(captioner.model.decoder) == []
    decoder = captioner.model.decoder
    g = torch.Generator().manual_seed(44)
    features = torch.randn(1, SPEC.num_pixels, SPEC.channels, generator=g)  # (1, P, C)
    tokens = torch.tensor([1])
    with torch.no_grad():
        first = decoder.step(tokens, *decoder.start(features)[::-1])[0]
        second = decoder.step(tokens, *decoder.start(features)[::-1])[0]
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_cli_export_parity_with_dropout(dropout_model_dir, tmp_path):
    """The `captioner export` helpers on a dropout model: torch and ONNX give the same caption."""
    from captioner.cli.inference_commands import check_parity, export_onnx

    model = CaptioningModel.from_pretrained(dropout_model_dir)
    export_onnx(model, tmp_path / "onnx")
    assert training_modules(model.decoder) == []
    parity = check_parity(model, tmp_path / "onnx")
    assert parity["logits"] <= 1e-3 * max(1.0, parity["logits_scale"])
    assert parity["alpha"] <= 1e-3
    assert parity["caption_torch"] == parity["caption_onnx"]


# ---- the public API ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioners(tiny_model_dir):
    onnx = Captioner.from_pretrained(tiny_model_dir, backend="onnx", threads=1)
    torch_ = Captioner.from_pretrained(tiny_model_dir, backend="torch")
    assert onnx.backend == "onnx"
    assert torch_.backend == "torch"
    assert isinstance(onnx.stepper, OrtStepper)
    assert isinstance(torch_.stepper, ShowAttendTellDecoder)
    return onnx, torch_


@pytest.fixture(scope="module")
def image_paths(shapes_prepared) -> list[Path]:
    return [shapes_prepared.images_dir / n for n in sorted(shapes_prepared.captions)[:3]]


@pytest.fixture(scope="module")
def encoded(captioners, image_paths):
    """The 3 images encoded by each backend's encoder."""
    onnx, torch_ = captioners
    return onnx.encode(image_paths), torch_.encode(image_paths)


def check_result(result: CaptionResult, vocab, grid: int, max_length: int, beam: int) -> None:
    assert isinstance(result, CaptionResult)
    assert result.caption == " ".join(result.tokens)
    assert len(result.tokens) <= max_length
    assert all(t in vocab and t not in ("<pad>", "<start>", "<end>") for t in result.tokens)
    assert np.isfinite(result.score) and result.score <= 0
    assert result.attention.dtype == np.float32
    assert result.attention.shape == (len(result.tokens), grid, grid)
    np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert (result.attention >= 0).all()
    assert 1 <= len(result.alternatives) <= beam
    assert result.alternatives[0] == (result.caption, result.score)
    scores = [s for _, s in result.alternatives]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("beam", [3, 1])
def test_onnx_and_torch_backends_agree(captioners, encoded, image_paths, beam):
    onnx, torch_ = captioners
    feats_onnx, feats_torch = encoded
    assert feats_onnx.shape == feats_torch.shape == (3, 49, 1280)
    scale = float(feats_torch.abs().max())
    assert float((feats_onnx - feats_torch).abs().max()) <= 1e-3 * max(1.0, scale)
    a = onnx.caption_features(feats_onnx, beam_size=beam, max_length=12)
    b = torch_.caption_features(feats_torch, beam_size=beam, max_length=12)
    assert len(a) == len(b) == 3
    assert sum(len(r.tokens) for r in a) > 0
    for ra, rb in zip(a, b, strict=True):
        check_result(ra, onnx.vocab, 7, 12, beam)
        check_result(rb, torch_.vocab, 7, 12, beam)
        assert ra.tokens == rb.tokens
        assert ra.score == pytest.approx(rb.score, abs=1e-3)
        np.testing.assert_allclose(ra.attention, rb.attention, atol=1e-3)
        assert [c for c, _ in ra.alternatives] == [c for c, _ in rb.alternatives]
    # the same decoder driven through ORT and through torch, on identical features
    c = torch_.caption_features(feats_onnx, beam_size=beam, max_length=12)
    assert [r.tokens for r in c] == [r.tokens for r in a]


def test_caption_end_to_end_matches_encoded_path(captioners, encoded, image_paths):
    onnx, _ = captioners
    assert onnx.grid_size == 7
    direct = onnx.caption(image_paths, beam_size=3, max_length=12)
    via_features = onnx.caption_features(encoded[0], beam_size=3, max_length=12)
    assert [r.tokens for r in direct] == [r.tokens for r in via_features]
    assert [r.score for r in direct] == pytest.approx([r.score for r in via_features], abs=1e-5)


def test_caption_accepts_every_input_kind(captioners, image_paths):
    onnx, _ = captioners
    path = image_paths[0]
    reference = onnx.caption(path, beam_size=2, max_length=8)
    assert len(reference) == 1
    pixels = np.asarray(Image.open(path).convert("RGB"))
    single_inputs = [str(path), path.read_bytes(), Image.open(path), pixels]
    for source in single_inputs:
        result = onnx.caption(source, beam_size=2, max_length=8)
        assert len(result) == 1, type(source)
        assert result[0].tokens == reference[0].tokens, type(source)
    mixed = onnx.caption(
        [path, pixels, path.read_bytes(), Image.open(image_paths[1])], beam_size=2, max_length=8
    )
    assert len(mixed) == 4
    assert all(r.tokens == reference[0].tokens for r in mixed[:3])
    other = onnx.caption(image_paths[1], beam_size=2, max_length=8)[0]
    assert mixed[3].tokens == other.tokens
    as_tuple = onnx.caption((path, image_paths[1]), beam_size=2, max_length=8)
    assert [r.tokens for r in as_tuple] == [reference[0].tokens, other.tokens]


def test_caption_without_attention(captioners, encoded):
    onnx, _ = captioners
    results = onnx.caption_features(
        encoded[0][:1], beam_size=2, max_length=6, return_attention=False
    )
    assert results[0].attention is None
    assert len(results[0].tokens) <= 6
    assert onnx.caption_features(encoded[0][:0]) == []


def test_caption_bad_image(captioners, tmp_path):
    onnx, _ = captioners
    with pytest.raises(ImageLoadError, match="upload: not an image"):
        onnx.caption(b"definitely not an image")
    with pytest.raises(ImageLoadError, match="file not found"):
        onnx.caption(tmp_path / "missing.png")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    with pytest.raises(ImageLoadError):  # one bad image in a list fails the call
        onnx.caption([buffer.getvalue(), np.zeros((4, 4, 2), dtype=np.uint8)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 21}, "beam_size"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": 101}, "max_length"),
    ],
)
def test_caption_bad_settings(captioners, encoded, kwargs, match):
    onnx, _ = captioners
    with pytest.raises(ConfigError, match=match):
        onnx.caption_features(encoded[0][:1], **kwargs)
    with pytest.raises(ConfigError, match=match):
        onnx.caption(np.zeros((8, 8, 3), dtype=np.uint8), **kwargs)


def test_caption_empty_list(captioners):
    onnx, _ = captioners
    assert onnx.caption([]) == []


def test_bad_backend_and_missing_model(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        Captioner.from_pretrained(tiny_model_dir, backend="cuda")
    with pytest.raises(CheckpointError, match="not found"):
        Captioner.from_pretrained(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Captioner.from_pretrained(tmp_path / "empty")


def test_generation_config_sets_caption_defaults(tiny_model_dir, tmp_path):
    """Decoding defaults chosen on dev travel with the model and are what caption() uses."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(
        json.dumps({"beam_size": 1, "max_length": 2, "length_penalty": 0.0, "suppress_unk": True})
    )
    captioner = Captioner.from_pretrained(model_dir, backend="torch")
    image = np.full((32, 32, 3), 120, dtype=np.uint8)
    default = captioner.caption(image)[0]
    assert len(default.tokens) <= 2 and len(default.alternatives) == 1  # greedy, 2 steps
    explicit = captioner.caption(image, beam_size=3, max_length=5)[0]
    assert len(explicit.alternatives) == 3
    (model_dir / "generation_config.json").write_text(json.dumps({"beams": 2}))
    with pytest.raises(ConfigError, match="beams"):
        Captioner.from_pretrained(model_dir, backend="torch")
