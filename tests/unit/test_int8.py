"""int8 encoder: static quantisation calibrated on a few synthetic photos, its closeness to fp32,
the cache naming, the --precision plumbing and the errors for bad precision or calibration data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from captioner.cli.main import app
from captioner.errors import ConfigError, DataError
from captioner.features import quantize
from captioner.features.onnx import FeatureExtractor, export_encoder, ort_session
from captioner.features.quantize import (
    calibration_from_dir,
    calibration_from_prepared,
    check_precision,
    default_int8_encoder,
    quantize_encoder,
)

ENCODER = "efficientnet-lite0"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _cache_with_fp32_export(cache: Path) -> Path:
    fp32 = export_encoder(ENCODER)
    (cache / "onnx").mkdir(parents=True)
    shutil.copy(fp32, cache / "onnx" / fp32.name)
    return cache


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """This module's own cache: the int8 defaults made here must not turn the other test
    modules' precision="auto" Captioners into int8 ones."""
    cache = _cache_with_fp32_export(tmp_path_factory.mktemp("int8-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTIONER_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def calibration_dir(shapes_prepared, tmp_path_factory) -> Path:
    """12 training images of the shapes dataset, in a folder of their own."""
    folder = tmp_path_factory.mktemp("calibration")
    for name in shapes_prepared.splits.train[:12]:
        shutil.copy(shapes_prepared.images_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def int8_file(calibration_dir) -> Path:
    """The int8 encoder calibrated on ``calibration_dir``, made the default."""
    return quantize_encoder(ENCODER, calibration_from_dir(calibration_dir))


@pytest.fixture()
def fresh_cache(monkeypatch, tmp_path) -> Path:
    """A cache with the fp32 encoder export in it but no int8 encoder."""
    cache = _cache_with_fp32_export(tmp_path / "cache")
    monkeypatch.setenv("CAPTIONER_CACHE", str(cache))
    return cache


def test_int8_features_are_close_to_fp32_on_unseen_images(int8_file, shapes_prepared):
    held_out = [shapes_prepared.images_dir / n for n in shapes_prepared.splits.test[:8]]
    check = quantize.agreement(ENCODER, int8_file, held_out)
    # 96 px shapes blown up to 224 and 12 calibration photos: ~0.94 and 0.33 (300 Flickr8k
    # photos: 0.985 and 0.17); an uncalibrated or broken graph is nowhere near either
    assert check["correlation"] > 0.9, check
    assert check["relative_error"] < 0.45, check

    fp32, int8 = FeatureExtractor(ENCODER), FeatureExtractor(ENCODER, precision="int8")
    assert int8.encoder_file == int8_file and int8.backend == "onnx"
    assert int8_file.stat().st_size < fp32.encoder_file.stat().st_size / 2  # int8 weights


def test_int8_file_is_named_by_its_calibration_set_and_cached(
    int8_file, calibration_dir, shapes_prepared, tmp_path
):
    calibration = calibration_from_dir(calibration_dir)
    assert calibration.digest[:12] in int8_file.name
    assert int8_file.parent == export_encoder(ENCODER).parent  # beside the fp32 export
    sidecar = json.loads(int8_file.with_suffix(".json").read_text())
    assert sidecar["images"] == sorted(p.name for p in calibration_dir.iterdir())
    assert sidecar["calibration_digest"] == calibration.digest
    assert sidecar["calibration_source"] == str(calibration_dir)

    before = int8_file.stat().st_mtime_ns
    assert quantize_encoder(ENCODER, calibration) == int8_file  # cached: not quantised again
    assert int8_file.stat().st_mtime_ns == before

    # the same photos with one changed byte are another calibration set, another file
    other = tmp_path / "other"
    shutil.copytree(calibration_dir, other)
    first = sorted(other.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    changed = calibration_from_dir(other)
    assert changed.digest != calibration.digest

    # a list picks some of the folder's images, spread evenly when more than the limit
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{n}\n" for n in shapes_prepared.splits.train[:6]))
    picked = calibration_from_dir(calibration_dir, limit=3, names_file=listing)
    assert picked.names == sorted(shapes_prepared.splits.train[:6])[::2]


def test_unknown_precision_is_a_clear_error(tiny_model_dir, shapes_prepared, tmp_path):
    from captioner.api import Captioner
    from captioner.cli.serve import serve

    with pytest.raises(ConfigError, match="auto, fp32, int8"):
        check_precision("int4")
    with pytest.raises(ConfigError, match="precision"):
        FeatureExtractor(ENCODER, precision="fp16")
    with pytest.raises(ConfigError, match="precision"):
        Captioner.from_pretrained(tiny_model_dir, precision="bf16")
    with pytest.raises(ConfigError, match="precision"):
        serve(tiny_model_dir, port=0, precision="int4")
    image = shapes_prepared.images_dir / shapes_prepared.splits.test[0]
    for args in (
        ("caption", image, "--model", tiny_model_dir),
        ("predict", "--image", image, "--model", tiny_model_dir, "-o", tmp_path / "p.png"),
        ("evaluate", "--model", tiny_model_dir, "--work-dir", shapes_prepared.work_dir),
        ("export", "--model", tiny_model_dir, "-o", tmp_path / "onnx"),
        ("serve", "--model", tiny_model_dir, "--port", "0"),
    ):
        result = run(*args, "--precision", "int4")
        assert result.exit_code == 2, (args, result.output)
        assert "precision" in result.output and "int4" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "onnx").exists()


def test_int8_without_an_int8_encoder_says_how_to_make_one(fresh_cache, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="captioner export --precision int8"):
        FeatureExtractor(ENCODER, precision="int8")
    result = run("export", "-m", tiny_model_dir, "-o", tmp_path / "onnx", "--precision", "int8")
    assert result.exit_code == 2, result.output
    assert "needs --calibration-dir" in result.output
    assert not (tmp_path / "onnx").exists()


def test_int8_needs_onnx_runtime(int8_file):
    with pytest.raises(ConfigError, match="ONNX Runtime"):
        FeatureExtractor(ENCODER, backend="torch", precision="int8")


def test_missing_or_empty_calibration_data_is_a_clear_error(
    fresh_cache, tiny_model_dir, calibration_dir, tmp_path
):
    with pytest.raises(DataError, match="not found"):
        calibration_from_dir(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no calibration images"):
        calibration_from_dir(empty)
    listing = tmp_path / "list.txt"
    listing.write_text("missing.png\n")
    with pytest.raises(DataError, match="not in"):
        calibration_from_dir(calibration_dir, names_file=listing)

    out = tmp_path / "onnx"
    for extra in (
        ("--calibration-dir", empty),
        ("--calibration-dir", tmp_path / "nowhere"),
        ("--calibration-list", listing),  # a list without its folder
    ):
        result = run("export", "-m", tiny_model_dir, "-o", out, "--precision", "int8", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert "Traceback" not in result.output
    result = run("export", "-m", tiny_model_dir, "-o", out, "--calibration-dir", calibration_dir)
    assert result.exit_code == 2 and "--precision int8" in result.output  # fp32 takes no photos
    assert not out.exists()
    assert default_int8_encoder(ENCODER) is None  # nothing half-made became the default


def test_export_int8_writes_the_int8_encoder_and_checks_it(
    int8_file, tiny_model_dir, calibration_dir, tmp_path
):
    out = tmp_path / "onnx"
    args = ("export", "-m", tiny_model_dir, "-o", out, "--precision", "int8")
    result = run(*args, "--calibration-dir", calibration_dir)
    assert result.exit_code == 0, result.output
    assert "correlation" in result.output and "parity ok" in result.output
    assert (out / "encoder.onnx").read_bytes() == int8_file.read_bytes()
    assert default_int8_encoder(ENCODER) == int8_file

    again = run(*args)  # the default int8 encoder, no photos needed any more
    assert again.exit_code == 0, again.output


def test_caption_passes_the_precision_through(
    int8_file, tiny_model_dir, shapes_prepared, monkeypatch
):
    from captioner.api import Captioner

    captioner = Captioner.from_pretrained(tiny_model_dir, precision="int8")
    assert captioner.precision == "int8" and captioner.extractor.encoder_file == int8_file
    image = shapes_prepared.images_dir / shapes_prepared.splits.test[0]
    assert captioner.caption(image)[0].caption

    seen = []
    real = Captioner.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("precision"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Captioner, "from_pretrained", classmethod(spy))
    result = run("caption", image, "--model", tiny_model_dir, "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert seen == ["int8"]


def test_evaluate_int8_encodes_the_images_even_with_a_complete_cache(
    fresh_cache, tiny_model_dir, shapes_prepared, tmp_path
):
    from captioner.data.prepare import PreparedData
    from captioner.evaluation.evaluate import evaluate
    from captioner.features.pipeline import ensure_features

    work = tmp_path / "work"
    work.mkdir()
    for name in ("dataset.json", "captions.json", "splits.json", "vocab.json"):
        shutil.copy(shapes_prepared.work_dir / name, work / name)
    ensure_features(PreparedData.load(work), ENCODER, progress=False)
    options = dict(beam_size=1, use_java=False, limit=4, out_dir=tmp_path / "eval", progress=False)

    fp32 = evaluate(tiny_model_dir, work, "val", **options)
    assert fp32["features"] == "cache" and fp32["precision"] == "fp32"

    # no int8 encoder yet: calibrated on the work dir's training split (never val or test)
    int8 = evaluate(tiny_model_dir, work, "val", precision="int8", **options)
    assert int8["features"] == "encoded" and int8["precision"] == "int8"
    made = default_int8_encoder(ENCODER)
    assert made is not None and int8["encoder_file"] == made.name
    sidecar = json.loads(made.with_suffix(".json").read_text())
    assert set(sidecar["images"]) == set(shapes_prepared.splits.train)
    assert Path(int8["report_file"]).name == "report_val_beam1_int8.json"
    assert (tmp_path / "eval" / "report_val_beam1.json").is_file()  # fp32 report kept
    assert calibration_from_prepared(work).digest[:12] in made.name


def test_export_refuses_an_int8_encoder_far_from_fp32(
    fresh_cache, tiny_model_dir, calibration_dir, tmp_path, monkeypatch
):
    def far(*args, **kwargs):
        return {"correlation": 0.5, "relative_error": 0.9, "top1_agreement": 0.1}

    monkeypatch.setattr(quantize, "agreement", far)
    out = tmp_path / "onnx"
    result = run(
        "export", "-m", tiny_model_dir, "-o", out, "--precision", "int8",
        "--calibration-dir", calibration_dir,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "far from fp32" in result.output
    assert default_int8_encoder(ENCODER) is None and not out.exists()


def test_auto_precision_is_int8_once_there_is_an_int8_encoder(
    fresh_cache, tiny_model_dir, calibration_dir, monkeypatch
):
    from captioner.api import Captioner

    monkeypatch.setattr(quantize, "INT8_ENCODER_BY_DEFAULT", True)
    assert Captioner.from_pretrained(tiny_model_dir).precision == "fp32"  # none yet
    made = quantize_encoder(ENCODER, calibration_from_dir(calibration_dir))
    captioner = Captioner.from_pretrained(tiny_model_dir)  # precision="auto", the default
    assert captioner.precision == "int8" and captioner.extractor.encoder_file == made
    assert Captioner.from_pretrained(tiny_model_dir, precision="fp32").precision == "fp32"
    assert FeatureExtractor(ENCODER, backend="torch", precision="auto").precision == "fp32"
    assert FeatureExtractor(ENCODER).precision == "fp32"  # the feature cache's: always fp32
    monkeypatch.setattr(quantize, "INT8_ENCODER_BY_DEFAULT", False)  # the shipped rule
    assert Captioner.from_pretrained(tiny_model_dir).precision == "fp32"


# --- int8 decoder graphs (dynamic quantisation of decoder_start/step/search.onnx) ---


def _tiny_decoder(tiny_model_dir):
    from captioner.model.captioning_model import CaptioningModel

    return CaptioningModel.from_pretrained(tiny_model_dir).decoder.eval()


def _steppers(decoder):
    from captioner.model.onnx_decoder import OrtStepper, exported_decoder_dir

    cell = decoder.config.cell
    fp32 = OrtStepper(exported_decoder_dir(decoder), cell, threads=1)
    int8 = OrtStepper(exported_decoder_dir(decoder, "int8"), cell, threads=1)
    return fp32, int8


def _features(seed: int, n: int = 4):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 49, 1280, generator=generator) * 3  # (n, P, C) ReLU6-like grids


def test_int8_decoder_graphs_are_quantised_copies_beside_the_fp32_ones(tiny_model_dir):
    import onnx

    from captioner.model.onnx_decoder import GRAPH_NAMES, exported_decoder_dir

    decoder = _tiny_decoder(tiny_model_dir)
    fp32_dir = exported_decoder_dir(decoder)
    assert exported_decoder_dir(decoder, "fp32") == fp32_dir and "int8" not in fp32_dir.name
    before = {n: (fp32_dir / n).read_bytes() for n in GRAPH_NAMES}
    int8_dir = exported_decoder_dir(decoder, "int8")
    assert int8_dir.parent == fp32_dir.parent and int8_dir.name.startswith(fp32_dir.name + "-int8")
    for name in GRAPH_NAMES:
        assert (fp32_dir / name).read_bytes() == before[name]  # fp32 graphs untouched
        ops = {node.op_type for node in onnx.load(str(int8_dir / name)).graph.node}
        assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops, (name, ops)
    mtimes = [(int8_dir / n).stat().st_mtime_ns for n in GRAPH_NAMES]
    assert exported_decoder_dir(decoder, "int8") == int8_dir  # cached: not quantised again
    assert [(int8_dir / n).stat().st_mtime_ns for n in GRAPH_NAMES] == mtimes
    with pytest.raises(ConfigError, match="fp32 or int8"):
        exported_decoder_dir(decoder, "int4")


def test_int8_decoder_logits_are_close_to_fp32(tiny_model_dir):
    import numpy as np
    import torch

    fp32, int8 = _steppers(_tiny_decoder(tiny_model_dir))
    features = _features(0)
    (memory32, state32), (memory8, state8) = fp32.start(features), int8.start(features)
    tokens = torch.tensor([1, 4, 5, 6])
    logits32, _, alpha32 = fp32.step(tokens, state32, memory32)
    logits8, _, alpha8 = int8.step(tokens, state8, memory8)
    a, b = logits32.numpy().ravel(), logits8.numpy().ravel()
    # int8 weights, per-call int8 activations: measured 0.5% relative error, correlation
    # 0.99999; a broken or unquantised-but-wrong graph is far off either
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03
    assert np.corrcoef(a, b)[0, 1] > 0.999
    assert (logits32.argmax(1) == logits8.argmax(1)).float().mean() >= 0.75
    assert np.abs(alpha32.numpy() - alpha8.numpy()).max() < 0.01  # attention maps sum to 1

    # the fused search step agrees too: the same best candidates, close scores
    n, w, k = 2, 2, 3
    V = fp32.vocab_size
    feed = dict(
        tokens=np.array([1, 4, 5, 6], dtype=np.int64),
        bias=np.zeros((n * w, V), dtype=np.float32),
        cum=np.zeros((n, w), dtype=np.float32),
        k=k,
    )
    rows = lambda s: tuple(np.repeat(x.numpy()[:n], w, axis=0) for x in s)  # noqa: E731
    mem = lambda m: tuple(x.numpy()[:n] for x in m)  # noqa: E731
    v32, i32, _, _ = fp32.search_step(state=rows(state32), memory=mem(memory32), **feed)
    v8, i8, _, _ = int8.search_step(state=rows(state8), memory=mem(memory8), **feed)
    assert np.abs(v32 - v8).max() < 0.02 and (i32[:, 0] == i8[:, 0]).all()


def test_int8_decoder_captions_mostly_equal_fp32(tiny_model_dir):
    from captioner.api import Captioner

    fp32 = Captioner.from_pretrained(tiny_model_dir, precision="fp32")
    int8 = Captioner.from_pretrained(tiny_model_dir, precision="fp32")
    int8.stepper = _steppers(int8.model.decoder)[1]  # the same fp32 grids: only the decoder
    features = _features(1, n=8)
    a = [r.caption for r in fp32.caption_features(features, beam_size=3, max_length=8)]
    b = [r.caption for r in int8.caption_features(features, beam_size=3, max_length=8)]
    # measured 8/8; an untrained decoder's near-uniform logits let rounding change a word
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 6, (a, b)


def test_decoder_precision_follows_the_encoder(int8_file, tiny_model_dir, monkeypatch):
    from captioner.api import Captioner
    from captioner.features.quantize import decoder_precision

    assert decoder_precision("int8", "int8") == "int8"
    assert decoder_precision("auto", "fp32") == decoder_precision("fp32", "fp32") == "fp32"
    assert decoder_precision("auto", "int8") == "fp32"  # not INT8_DECODER_BY_DEFAULT
    monkeypatch.setattr(quantize, "INT8_DECODER_BY_DEFAULT", True)
    assert decoder_precision("auto", "int8") == "int8"
    monkeypatch.undo()

    def made(precision, backend="auto"):
        captioner = Captioner.from_pretrained(tiny_model_dir, backend, precision=precision)
        return captioner.precision, captioner.decoder_precision, captioner.stepper

    enc, dec, stepper = made("int8")
    assert (enc, dec) == ("int8", "int8") and "-int8-dq" in stepper.onnx_dir.name
    assert stepper.fused  # the int8 search graph is there: the fused path
    monkeypatch.setattr(quantize, "INT8_ENCODER_BY_DEFAULT", True)
    enc, dec, stepper = made("auto")  # int8_file is the default: int8 encoder, fp32 decoder
    assert (enc, dec) == ("int8", "fp32") and "int8" not in stepper.onnx_dir.name
    monkeypatch.setattr(quantize, "INT8_DECODER_BY_DEFAULT", True)
    assert made("auto")[:2] == ("int8", "int8")
    assert made("fp32")[:2] == ("fp32", "fp32")  # fp32 stays fp32 whatever the default
    monkeypatch.undo()
    enc, dec, stepper = made("fp32")  # fp32 unchanged: the fp32 export's own directory
    assert (enc, dec) == ("fp32", "fp32") and "int8" not in stepper.onnx_dir.name
    assert made("auto", backend="torch")[:2] == ("fp32", "fp32")


def test_a_trunk_encoder_quantises_with_its_pooled_output(calibration_dir, shapes_prepared):
    """The encoder of a fine-tuned-top model (a trunk) has a third output, ``pooled``; int8
    keeps it and the agreement check reads the first two by name."""
    trunk = "efficientnet-lite0-trunk4"
    made = quantize_encoder(trunk, calibration_from_dir(calibration_dir), make_default=False)
    held_out = [shapes_prepared.images_dir / n for n in shapes_prepared.splits.test[:8]]
    check = quantize.agreement(trunk, made, held_out)
    assert check["correlation"] > 0.9, check
    outputs = [o.name for o in ort_session(made).get_outputs()]
    assert outputs == ["features", "concepts", "pooled"]
