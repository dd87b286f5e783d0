"""Ensembles: the step's mixture, decoding with copies of one decoder, the saved directory and
`captioner ensemble`, and a Captioner over an ensemble on both backends."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_model import make_decoder as small_decoder
from typer.testing import CliRunner

from captioner.api import Captioner
from captioner.cli.main import app
from captioner.data.vocab import SPECIAL_TOKENS, Vocabulary
from captioner.decoding import beam_search, greedy_decode
from captioner.errors import CheckpointError, ConfigError
from captioner.features.encoders import get_spec
from captioner.model.captioning_model import CaptioningModel
from captioner.model.ensemble import EnsembleStepper, ensemble_of
from captioner.model.onnx_ensemble import OrtEnsembleStepper, load_steppers
from captioner.training.averaging import ensemble_models

SPEC = get_spec("efficientnet-lite0")
WORDS = ["a", "red", "blue", "circle", "square", "above", "below", "left", "of", "the"]
VOCAB = Vocabulary([*SPECIAL_TOKENS, *WORDS])


def make_decoder(seed: int, cell: str = "gru", vocab_size: int = len(VOCAB)):
    """A small decoder with peaked next-word distributions (an untrained one is near uniform,
    where float rounding decides between almost equal words)."""
    decoder = small_decoder(
        cell, seed, vocab_size=vocab_size, feature_dim=SPEC.channels, num_pixels=SPEC.num_pixels
    )
    with torch.no_grad():
        decoder.out_vocab.weight.mul_(8.0)
    return decoder


def features(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, SPEC.num_pixels, SPEC.channels, generator=g)  # (B, P, C)


def test_step_is_the_log_of_the_mean_probability():
    a, b = make_decoder(0), make_decoder(1, cell="lstm")
    stepper = EnsembleStepper([a, b], weights=[3.0, 1.0])
    grid = features()
    tokens = torch.full((4,), VOCAB.start_id)
    memory, state = stepper.start(grid)
    assert len(memory) == 4 and len(state) == 3  # (feats, keys) twice; GRU h, LSTM h and c
    mixed, new_state, alpha = stepper.step(tokens, state, memory)
    (ma, sa), (mb, sb) = a.start(grid), b.start(grid)
    la, na, aa = a.step(tokens, sa, ma)
    lb, nb, ab = b.step(tokens, sb, mb)
    expected = torch.log(0.75 * la.softmax(1) + 0.25 * lb.softmax(1))  # (B, V)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha, 0.75 * aa + 0.25 * ab)
    for got, want in zip(new_state, (*na, *nb), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_copies_of_one_decoder_decode_as_it_does(search):
    decoder = make_decoder(2)
    grid = features(6)
    ids = dict(start_id=VOCAB.start_id, end_id=VOCAB.end_id, no_repeat_ngram_size=2)
    if search == "greedy":
        single = greedy_decode(decoder, grid, **ids)
        joined = greedy_decode(EnsembleStepper([decoder, decoder]), grid, **ids)
    else:
        single = beam_search(decoder, grid, beam_size=3, **ids)
        joined = beam_search(EnsembleStepper([decoder, decoder]), grid, beam_size=3, **ids)
    assert [r.token_ids for r in joined] == [r.token_ids for r in single]
    np.testing.assert_allclose([r.score for r in joined], [r.score for r in single], atol=1e-5)
    assert any(r.token_ids for r in single)  # the test decodes something


def test_members_change_the_captions():
    grid = features(8)
    ids = dict(start_id=VOCAB.start_id, end_id=VOCAB.end_id)
    decoders = [make_decoder(s) for s in (3, 4)]
    alone = [[r.token_ids for r in beam_search(d, grid, **ids)] for d in decoders]
    joined = [r.token_ids for r in beam_search(EnsembleStepper(decoders), grid, **ids)]
    assert alone[0] != alone[1]
    assert joined != alone[0] or joined != alone[1]


def test_ensemble_of_one_is_the_stepper_itself():
    decoder = make_decoder(0)
    assert ensemble_of([decoder]) is decoder
    assert isinstance(ensemble_of([decoder, decoder]), EnsembleStepper)
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleStepper([])
    for weights in ([1.0], [1.0, 0.0], [1.0, float("inf")], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="one positive number per member"):
            EnsembleStepper([decoder, decoder], weights=weights)


@pytest.fixture()
def two_models(tmp_path):
    paths = []
    for seed in (5, 6):
        model = CaptioningModel(make_decoder(seed), VOCAB, SPEC)
        paths.append(model.save_pretrained(tmp_path / f"seed{seed}"))
    return paths


def test_ensemble_directory_round_trip(two_models, tmp_path):
    out = ensemble_models(two_models, tmp_path / "ens", log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "member1.safetensors",
        "model.safetensors",
        "vocab.json",
    ]
    loaded = CaptioningModel.from_pretrained(out)
    originals = [CaptioningModel.from_pretrained(p).decoder for p in two_models]
    assert len(loaded.decoders) == 2
    for got, want in zip(loaded.decoders, originals, strict=True):
        for key, value in want.state_dict().items():
            assert torch.equal(got.state_dict()[key], value), key
    # an ensemble of ensembles flattens to their decoders
    again = ensemble_models([out, two_models[0]], tmp_path / "ens3", log=lambda m: None)
    assert len(CaptioningModel.from_pretrained(again).decoders) == 3


def test_ensemble_directory_errors(two_models, tmp_path):
    with pytest.raises(ConfigError, match="at least two models"):
        ensemble_models(two_models[:1], tmp_path / "one")
    other = Vocabulary([*SPECIAL_TOKENS, *WORDS[::-1]])
    odd = CaptioningModel(make_decoder(7), other, SPEC).save_pretrained(tmp_path / "odd")
    with pytest.raises(ConfigError, match="vocabulary differs"):
        ensemble_models([two_models[0], odd], tmp_path / "bad")
    bigger = Vocabulary([*SPECIAL_TOKENS, *WORDS, "dog"])
    wide = CaptioningModel(make_decoder(8, vocab_size=len(bigger)), bigger, SPEC)
    with pytest.raises(ConfigError, match="share the grid, feature size and vocabulary"):
        CaptioningModel(make_decoder(9), VOCAB, SPEC, members=[wide.decoder])
    out = ensemble_models(two_models, tmp_path / "ens", log=lambda m: None)
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / "member1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="member1.safetensors is missing"):
        CaptioningModel.from_pretrained(missing)
    renamed = tmp_path / "renamed"
    shutil.copytree(out, renamed)
    config = json.loads((renamed / "config.json").read_text())
    config["ensemble"][0]["weights"] = "../elsewhere.safetensors"
    (renamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="must name its weights"):
        CaptioningModel.from_pretrained(renamed)
    cut = (out / "member1.safetensors").read_bytes()[:100]
    (out / "member1.safetensors").write_bytes(cut)  # a damaged member: the API says which
    with pytest.raises(CheckpointError, match=r"member1\.safetensors: unreadable weights"):
        Captioner.from_pretrained(out)


def test_cli_ensemble(two_models, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["ensemble", *map(str, two_models), "--out", str(tmp_path / "e"), "--half"]
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "e" / "member1.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert "captioner ground" in result.output
    result = runner.invoke(app, ["ensemble", str(two_models[0]), "--out", str(tmp_path / "f")])
    assert result.exit_code != 0
    assert "at least two models" in result.output and "Traceback" not in result.output
    # export writes one decoder's graphs: an ensemble is refused, not cut to its first member
    result = runner.invoke(
        app, ["export", "--model", str(tmp_path / "e"), "--out-dir", str(tmp_path / "onnx")]
    )
    assert result.exit_code != 0 and "is an ensemble of 2 decoders" in result.output
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_captioner_over_an_ensemble(two_models, tmp_path, backend):
    out = ensemble_models(two_models, tmp_path / "ens", log=lambda m: None)
    grid = features(5)
    ensemble = Captioner(CaptioningModel.from_pretrained(out), backend=backend)
    fused = backend == "onnx"  # one ONNX Runtime call per step for all members
    assert isinstance(ensemble.stepper, OrtEnsembleStepper if fused else EnsembleStepper)
    got = [r.caption for r in ensemble.caption_features(grid, prefer_sentences=False)]
    decoders = [CaptioningModel.from_pretrained(p).decoder for p in two_models]
    want = beam_search(
        EnsembleStepper(decoders),
        grid,
        beam_size=3,
        start_id=VOCAB.start_id,
        end_id=VOCAB.end_id,
        unk_id=VOCAB.unk_id,
        suppress_unk=True,
        no_repeat_ngram_size=2,
    )
    assert got == [VOCAB.decode(r.token_ids) for r in want]


@pytest.mark.parametrize("cells", [("gru", "gru"), ("gru", "lstm", "gru")])
def test_fused_ensemble_search_matches_torch(cells):
    """The one-graph search step gives the torch ensemble's captions and scores, with a word
    bias, n-gram blocking and images finishing at different steps."""
    decoders = [make_decoder(10 + i, cell=cell) for i, cell in enumerate(cells)]
    grid = features(6, seed=3)
    bias = torch.zeros(6, len(VOCAB))
    bias[0, VOCAB.stoi["red"]] = 2.0
    bias[1, VOCAB.stoi["circle"]] = -3.0
    options = dict(
        beam_size=3,
        start_id=VOCAB.start_id,
        end_id=VOCAB.end_id,
        no_repeat_ngram_size=2,
        word_bias=bias,
    )
    fused = load_steppers(decoders, "fp32")
    assert isinstance(fused, OrtEnsembleStepper) and fused.fused
    want = beam_search(EnsembleStepper(decoders), grid, **options)
    got = beam_search(fused, grid, **options)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=1e-4)
    np.testing.assert_allclose(got[0].alphas, want[0].alphas, atol=1e-5)
    greedy = greedy_decode(fused, grid, start_id=VOCAB.start_id, end_id=VOCAB.end_id)
    plain = greedy_decode(
        EnsembleStepper(decoders), grid, start_id=VOCAB.start_id, end_id=VOCAB.end_id
    )
    assert [r.token_ids for r in greedy] == [r.token_ids for r in plain]
    int8 = load_steppers(decoders, "int8")  # the quantised graphs load and decode
    assert len(beam_search(int8, grid, **options)) == 6
