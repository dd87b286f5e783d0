"""caption / predict / evaluate / export commands and the attention figure, on the tiny model."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from captioner.api import CaptionResult
from captioner.cli.main import app
from captioner.evaluation.metrics import METRIC_NAMES
from captioner.viz.attention import (
    overlay_attention,
    render_attention_figure,
    upsample_attention,
)


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture()
def image_folder(shapes_prepared, tmp_path):
    """Three good shapes images and one corrupt .jpg, in a fresh folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in shapes_prepared.splits.test[:3]:
        shutil.copy(shapes_prepared.images_dir / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


@pytest.fixture()
def private_work_dir(shapes_prepared, tmp_path):
    """A copy of the prepared shapes work dir without any feature cache (other tests may add
    one to the shared fixture)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("dataset.json", "captions.json", "splits.json", "vocab.json"):
        shutil.copy(shapes_prepared.work_dir / name, work / name)
    return work


# ------------------------------------------------------------------------------------------
# caption
# ------------------------------------------------------------------------------------------


def test_caption_folder_skips_a_corrupt_file(tiny_model_dir, image_folder):
    result = run(
        "caption", image_folder, "--model", tiny_model_dir, "--beam-size", "2", "--batch-size", "8"
    )
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3  # the three good images, in the same batch as the bad one
    good = sorted(p.name for p in image_folder.glob("*.png"))
    assert [line.split("\t")[0].rsplit("/", 1)[-1] for line in lines] == good
    assert all(line.split("\t")[1].strip() for line in lines)  # a caption each
    assert "broken.jpg" in result.stderr
    assert "notes.txt" not in result.output
    assert "1 input(s) failed, 3 captioned" in result.stderr


def test_caption_no_repeat_ngram_flag_and_generation_default(
    tiny_model_dir, image_folder, tmp_path
):
    """A model biased to say one word forever: --no-repeat-ngram 1 forbids any repeat, and the
    same setting saved in generation_config.json becomes the model's default."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "parrot"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(str(model / "model.safetensors"))
    weights["out_vocab.bias"][4] += 100.0  # the first real word, every time
    weights["out_vocab.bias"][2] -= 100.0  # and never <end>
    save_file(weights, str(model / "model.safetensors"))

    def captions(*extra):
        result = run("caption", image_folder, "--model", model, "--max-length", "8", *extra)
        return [line.split("\t")[1].split() for line in result.stdout.splitlines()]

    # blocking off, the parrot loops (trained models block bigrams by default, see below)
    assert all(len(w) == 8 and len(set(w)) == 1 for w in captions("--no-repeat-ngram", "0"))
    for words in captions():  # the default, 2: no bigram twice
        bigrams = list(zip(words, words[1:]))
        assert len(set(bigrams)) == len(bigrams)
    blocked = captions("--no-repeat-ngram", "1")
    assert len(blocked) == 3 and all(len(set(words)) == len(words) == 8 for words in blocked)

    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(
        json.dumps({**generation, "no_repeat_ngram_size": 1})
    )
    assert captions() == blocked
    assert run("caption", image_folder, "--no-repeat-ngram", "11").exit_code == 2  # usage error


def test_caption_json_csv_and_output_file(tiny_model_dir, image_folder, tmp_path):
    pattern = str(image_folder / "*.png")  # a glob the command expands itself
    as_json = run("caption", pattern, "--model", tiny_model_dir, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert len(rows) == 3 and {"path", "caption", "score"} <= set(rows[0])

    out = tmp_path / "out" / "captions.csv"
    as_csv = run(
        "caption",
        pattern,
        "--model",
        tiny_model_dir,
        "--format",
        "csv",
        "--output",
        out,
        "--batch-size",
        "2",
    )  # two batches, one header
    assert as_csv.exit_code == 0, as_csv.output
    assert as_csv.stdout == ""
    parsed = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["path"] for r in parsed] == [r["path"] for r in rows]
    assert [r["caption"] for r in parsed] == [r["caption"] for r in rows]  # same model, same text

    streamed = run(
        "caption", pattern, "--model", tiny_model_dir, "--format", "csv", "--batch-size", "2"
    )
    assert list(csv.DictReader(io.StringIO(streamed.stdout))) == parsed


def test_caption_usage_errors(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("caption", empty, "--model", tiny_model_dir)
    assert result.exit_code == 2
    assert "no images found" in result.stderr

    bad_format = run("caption", empty, "--format", "xml")
    assert bad_format.exit_code == 2 and "--format" in bad_format.stderr


def test_missing_model_dir_is_a_clear_error(image_folder, shapes_prepared, tmp_path):
    missing = tmp_path / "no-such-model"
    for args in (
        ("caption", image_folder),
        ("predict", "--work-dir", shapes_prepared.work_dir),
        ("evaluate", "--work-dir", shapes_prepared.work_dir, "--no-java"),
        ("export", "--out-dir", tmp_path / "onnx"),
    ):
        result = run(*args, "--model", missing)
        assert result.exit_code == 2, (args, result.output)
        assert f"model directory not found: {missing}" in result.stderr
        assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------


def test_predict_random_image_writes_figure(tiny_model_dir, shapes_prepared, tmp_path):
    out = tmp_path / "predict.png"
    result = run(
        "predict",
        "--model",
        tiny_model_dir,
        "--work-dir",
        shapes_prepared.work_dir,
        "--seed",
        "3",
        "--beam-size",
        "2",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    image_line = next(line for line in result.stdout.splitlines() if line.startswith("image:"))
    name = image_line.split()[-1].rsplit("/", 1)[-1]
    assert name in shapes_prepared.splits.test
    assert "references:" in result.stdout
    for reference in shapes_prepared.captions[name]:
        assert reference in result.stdout
    with Image.open(out) as figure:
        assert figure.format == "PNG"
        width, height = figure.size
    assert width >= 600 and height >= 300


def test_predict_outside_image_has_no_references(tiny_model_dir, shapes_prepared, tmp_path):
    outside = tmp_path / "mine.png"
    shutil.copy(shapes_prepared.images_dir / shapes_prepared.splits.test[0], outside)
    out = tmp_path / "fig.png"
    result = run(
        "predict",
        "--model",
        tiny_model_dir,
        "--work-dir",
        tmp_path / "not-prepared",
        "--image",
        outside,
        "--out",
        out,
        "--beam-size",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert "references: (none" in result.stdout
    assert out.is_file()

    by_name = run(
        "predict",
        "--model",
        tiny_model_dir,
        "--work-dir",
        shapes_prepared.work_dir,
        "--image",
        shapes_prepared.splits.val[0],
        "--out",
        out,
        "--beam-size",
        "1",
    )
    assert by_name.exit_code == 0, by_name.output
    assert shapes_prepared.captions[shapes_prepared.splits.val[0]][0] in by_name.stdout

    unknown = run(
        "predict",
        "--model",
        tiny_model_dir,
        "--work-dir",
        shapes_prepared.work_dir,
        "--image",
        "nope.jpg",
        "--out",
        out,
    )
    assert unknown.exit_code == 2 and "nope.jpg" in unknown.stderr


def test_predict_missing_image_without_work_dir_says_file_not_found(tiny_model_dir, tmp_path):
    result = run(
        "predict",
        "--model",
        tiny_model_dir,
        "--work-dir",
        tmp_path / "not-prepared",
        "--image",
        tmp_path / "missing.jpg",
        "--out",
        tmp_path / "fig.png",
    )
    assert result.exit_code == 2, result.output
    assert "missing.jpg: file not found" in result.stderr
    assert "not a prepared work directory" not in result.stderr
    assert not (tmp_path / "fig.png").exists()


def test_predict_image_file_needs_no_work_dir(
    tiny_model_dir, shapes_prepared, tmp_path, monkeypatch
):
    """The default --work-dir (work/flickr8k) does not exist here: a file is enough."""
    picture = tmp_path / "mine.png"
    shutil.copy(shapes_prepared.images_dir / shapes_prepared.splits.test[1], picture)
    out = tmp_path / "fig.png"
    monkeypatch.chdir(tmp_path)
    result = run("predict", "--model", tiny_model_dir, "--image", picture, "-o", out)
    assert result.exit_code == 0, result.output
    assert "caption:" in result.stdout and "references: (none" in result.stdout
    assert out.is_file()


def test_predict_folder_is_a_clear_error(tiny_model_dir, image_folder, tmp_path):
    result = run(
        "predict", "--model", tiny_model_dir, "--image", image_folder, "-o", tmp_path / "f.png"
    )
    assert result.exit_code == 2, result.output
    assert "is a folder" in result.stderr and "captioner caption" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "f.png").exists()


# ------------------------------------------------------------------------------------------
# evaluate
# ------------------------------------------------------------------------------------------


def test_evaluate_writes_report_and_coco_results(
    tiny_model_dir, shapes_prepared, private_work_dir, tmp_path
):
    out_dir = tmp_path / "eval"
    result = run(
        "evaluate",
        "--model",
        tiny_model_dir,
        "--work-dir",
        private_work_dir,
        "--out-dir",
        out_dir,
        "--no-java",
        "--beam-size",
        "2",
        "--batch-size",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert "CIDEr-D" in result.stdout and "METEOR" in result.stdout

    report = json.loads((out_dir / "report_test_beam2.json").read_text())
    results = json.loads((out_dir / "results_test_beam2.json").read_text())
    test_names = shapes_prepared.splits.test
    assert report["n_images"] == len(test_names) == len(results)
    assert [r["image_id"] for r in results] == test_names
    assert all(isinstance(r["caption"], str) for r in results)
    assert set(report["scores"]) == set(METRIC_NAMES)
    assert report["scores"]["METEOR"] is None  # --no-java: unavailable, never 0
    assert all(0 <= report["scores"][k] <= 1000 for k in METRIC_NAMES if k != "METEOR")
    assert report["beam_size"] == 2 and report["split"] == "test"
    assert report["features"] == "encoded"  # no feature cache in this work dir


def test_evaluate_uses_a_complete_feature_cache(
    tiny_model_dir, shapes_prepared, private_work_dir, tmp_path
):
    from captioner.data.prepare import PreparedData
    from captioner.evaluation.evaluate import evaluate
    from captioner.features.pipeline import ensure_features

    ensure_features(PreparedData.load(private_work_dir), "efficientnet-lite0", progress=False)
    report = evaluate(
        tiny_model_dir,
        private_work_dir,
        "val",
        beam_size=1,
        use_java=False,
        limit=4,
        out_dir=tmp_path / "eval",
        progress=False,
    )
    assert report["features"] == "cache"
    assert report["n_images"] == 4
    results = json.loads((tmp_path / "eval" / "results_val_beam1.json").read_text())
    assert [r["image_id"] for r in results] == shapes_prepared.splits.val[:4]


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------


def test_export_writes_three_onnx_files_and_checks_parity(tiny_model_dir, tmp_path):
    out_dir = tmp_path / "onnx"
    result = run("export", "--model", tiny_model_dir, "--out-dir", out_dir)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["decoder_start.onnx", "decoder_step.onnx", "encoder.onnx"]
    assert "max abs diff" in result.stdout and "parity ok" in result.stdout


# ------------------------------------------------------------------------------------------
# the attention figure
# ------------------------------------------------------------------------------------------


def _result(words: list[str], grid: int = 7, seed: int = 0) -> CaptionResult:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(words), grid * grid))
    attention = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return CaptionResult(
        " ".join(words), words, -0.5, attention.reshape(len(words), grid, grid).astype(np.float32)
    )


def test_upsampled_attention_peaks_where_the_grid_does():
    grid = np.full((7, 7), 0.01, dtype=np.float32)
    grid[2, 5] = 1.0
    heat = upsample_attention(grid, 140, 280)  # a wide image: the grid is stretched
    assert heat.shape == (140, 280) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert 2 * 20 <= row < 3 * 20 and 5 * 40 <= col < 6 * 40
    overlay = overlay_attention(np.zeros((140, 280, 3), np.uint8), grid)
    assert overlay.dtype == np.uint8 and overlay.shape == (140, 280, 3)
    assert overlay[row, col].sum() > overlay[130, 10].sum()  # hot cell brighter than far away


def test_render_attention_figure_wraps_long_captions(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    short = render_attention_figure(
        image,
        _result(["a", "red", "circle"]),
        tmp_path / "s.png",
        references=["a red circle", "one red circle"],
    )
    words = "a red circle above a blue square on a plain white background today".split()
    long = render_attention_figure(
        image,
        _result(words),
        tmp_path / "l.png",
        references=["a red circle above a blue square"] * 5,
    )
    with Image.open(short) as a, Image.open(long) as b:
        assert a.format == b.format == "PNG"
        assert 5 * 240 <= b.size[0] <= 5 * 240 + 40  # rows of five 2.4-inch panels
        assert b.size[1] > a.size[1] * 1.8  # 13 panels: three rows instead of one
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_render_attention_figure_without_attention(tmp_path):
    result = CaptionResult("a dog", ["a", "dog"], -1.0, None)
    path = render_attention_figure(np.zeros((64, 64, 3), np.uint8), result, tmp_path / "n.png")
    with Image.open(path) as figure:
        assert figure.size[0] > 0
