"""Outputs of caption / predict / evaluate are checked before the work (issue 22): an
unwritable or wrong output is one clear line and exit code 2 before any decoding; a full disk
is one line; caption takes the same decoding options as predict and evaluate; evaluate gives
each run's best/ its own report folder."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from captioner.cli.main import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture()
def photos(shapes_prepared, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in shapes_prepared.splits.test[:2]:
        shutil.copy(shapes_prepared.images_dir / name, folder / name)
    return folder


@pytest.fixture()
def a_file(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("in the way")
    return path


def one_clear_line(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("fmt", ["json", "text", "jsonl"])
def test_caption_refuses_an_unwritable_output_before_loading_anything(photos, a_file, fmt):
    """The model does not exist: the output is checked first, so that is never reached."""
    result = run("caption", photos, "-f", fmt, "-o", a_file / "out.txt", "-m", "/no/such/model")
    one_clear_line(result, "--output", "is a file")
    assert "model directory not found" not in result.stderr
    folder = run("caption", photos, "-f", fmt, "-o", photos, "-m", "/no/such/model")
    one_clear_line(folder, "not a folder")


def test_caption_disk_full_is_one_line(tiny_model_dir, photos, tmp_path, monkeypatch):
    from captioner.bulk import writers

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers.os, "write", full)
    out = tmp_path / "captions.jsonl"
    result = run("caption", photos, "-m", tiny_model_dir, "-f", "jsonl", "-o", out)
    one_clear_line(result, "No space left on device", "rerun resumes")
    assert out.read_bytes() == b""  # nothing half-written


def test_caption_takes_length_penalty_and_no_grounding(tiny_model_dir, photos, monkeypatch):
    import captioner.bulk

    seen = {}
    real = captioner.bulk.caption_bulk

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(captioner.bulk, "caption_bulk", spy)
    result = run(
        "caption", photos, "-m", tiny_model_dir, "--length-penalty", "0.5", "--no-grounding"
    )
    assert result.exit_code == 0, result.output
    assert seen["length_penalty"] == 0.5 and seen["grounding"] is False
    for command in ("caption", "predict", "evaluate"):
        help_text = run(command, "--help").stdout
        assert "--length-penalty" in help_text and "--no-grounding" in help_text, command


def test_predict_refuses_a_folder_or_a_non_png_figure(tiny_model_dir, photos, tmp_path):
    image = next(photos.iterdir())
    folder = run("predict", "-m", tiny_model_dir, "--image", image, "--out", tmp_path)
    one_clear_line(folder, "not a folder")
    pdf = run("predict", "-m", tiny_model_dir, "--image", image, "--out", tmp_path / "x.pdf")
    one_clear_line(pdf, ".png")
    assert not (tmp_path / "x.pdf").exists()


def test_evaluate_checks_out_dir_before_decoding(tiny_model_dir, shapes_prepared, a_file):
    args = ("evaluate", "-m", tiny_model_dir, "--work-dir", shapes_prepared.work_dir, "--no-java")
    existing = run(*args, "--out-dir", a_file)
    one_clear_line(existing, "in the way")
    under = run(*args, "--out-dir", a_file / "eval")
    one_clear_line(under, "is a file")
    assert a_file.read_text() == "in the way"


def test_evaluate_names_a_runs_best_after_the_run(tiny_model_dir, tmp_path):
    from captioner.evaluation.evaluate import DEFAULT_EVAL_ROOT, default_out_dir

    one, two = tmp_path / "run-a" / "best", tmp_path / "run-b" / "best"
    shutil.copytree(tiny_model_dir, one)
    shutil.copytree(tiny_model_dir, two)
    assert default_out_dir(one) == DEFAULT_EVAL_ROOT / "run-a-best"
    assert default_out_dir(one) != default_out_dir(two)
    assert default_out_dir(tiny_model_dir) == DEFAULT_EVAL_ROOT / tiny_model_dir.name


def test_caption_json_uses_path_and_rest_concepts(tiny_model_dir, photos):
    result = run("caption", photos, "-m", tiny_model_dir, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2 and all("path" in r and "image" not in r for r in records)
