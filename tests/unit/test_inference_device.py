"""--device on caption, predict, evaluate and serve, tested without a GPU: "cpu" equals the
default exactly, "cuda" without a GPU is one clear error that changes nothing, a (faked)
visible GPU makes "auto" take the PyTorch path on cuda:0, and that path itself run on the CPU
gives the torch backend's captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from captioner.api import Captioner
from captioner.cli.main import app
from captioner.errors import ConfigError
from captioner.features.gpu_encoder import DeviceExtractor
from captioner.model.captioning_model import CaptioningModel


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture()
def images(shapes_prepared):
    return [shapes_prepared.images_dir / n for n in shapes_prepared.splits.test[:3]]


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture()
def fake_gpu(monkeypatch):
    """torch believes one GPU is visible (nothing is ever allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def _same(a, b) -> None:
    assert [r.caption for r in a] == [r.caption for r in b]
    assert [r.score for r in a] == [r.score for r in b]
    assert [r.alternatives for r in a] == [r.alternatives for r in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.attention, y.attention)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cpu_device_equals_the_default(tiny_model_dir, images, beam_size):
    default = Captioner.from_pretrained(tiny_model_dir, threads=1)
    cpu = Captioner.from_pretrained(tiny_model_dir, threads=1, device="cpu")
    assert cpu.device == torch.device("cpu") and cpu.backend == default.backend
    assert type(cpu.stepper) is type(default.stepper)
    _same(cpu.caption(images, beam_size=beam_size), default.caption(images, beam_size=beam_size))


def test_auto_without_a_gpu_is_the_cpu(tiny_model_dir, images, no_gpu):
    auto = Captioner.from_pretrained(tiny_model_dir, threads=1, device="auto")
    default = Captioner.from_pretrained(tiny_model_dir, threads=1)
    assert auto.device == torch.device("cpu") and auto.backend == default.backend
    _same(auto.caption(images, beam_size=2), default.caption(images, beam_size=2))


def test_cuda_without_a_gpu_is_a_clear_error(tiny_model_dir, no_gpu):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
        Captioner.from_pretrained(tiny_model_dir, device="cuda")
    with pytest.raises(ConfigError, match="--device must be one of"):
        Captioner.from_pretrained(tiny_model_dir, device="tpu")


def _one_clear_line(result) -> None:
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU is visible" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_device_cuda_without_a_gpu_changes_nothing(
    tiny_model_dir, images, shapes_prepared, tmp_path, no_gpu
):
    out = tmp_path / "captions.jsonl"
    _one_clear_line(
        run("caption", *images, "-m", tiny_model_dir, "-f", "jsonl", "-o", out, "--device", "cuda")
    )
    figure = tmp_path / "predict.png"
    _one_clear_line(
        run("predict", "-m", tiny_model_dir, "--image", images[0], "-o", figure, "--device", "cuda")
    )
    eval_dir = tmp_path / "eval"
    work = shapes_prepared.work_dir
    _one_clear_line(
        run(
            "evaluate",
            "-m",
            tiny_model_dir,
            "--work-dir",
            work,
            "--out-dir",
            eval_dir,
            "--no-java",
            "--device",
            "cuda",
        )  # fmt: skip
    )
    assert not out.exists() and not figure.exists() and not eval_dir.exists()


def test_serve_device_cuda_without_a_gpu_is_one_line(monkeypatch, no_gpu):
    import captioner.api

    def never_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded without the GPU asked for")

    monkeypatch.setattr(captioner.api.Captioner, "from_pretrained", never_load)
    _one_clear_line(run("serve", "--port", "0", "--device", "cuda"))


def test_evaluate_device_cuda_without_a_gpu_is_a_clear_error(
    tiny_model_dir, shapes_prepared, tmp_path, no_gpu
):
    from captioner.evaluation.evaluate import evaluate

    with pytest.raises(ConfigError, match="no CUDA GPU"):
        evaluate(tiny_model_dir, shapes_prepared.work_dir, out_dir=tmp_path / "e", device="cuda")
    assert not (tmp_path / "e").exists()


def test_a_visible_gpu_makes_auto_take_the_torch_path_on_cuda0(
    tiny_model_dir, monkeypatch, fake_gpu
):
    from captioner.devices import resolve_device

    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    model = CaptioningModel.from_pretrained(tiny_model_dir)
    placed = []  # (device, backend, precision) the GPU path was asked for
    monkeypatch.setattr(Captioner, "_on_gpu", lambda self, b, p: placed.append((self.device, b, p)))
    captioner = Captioner(model, device="auto", precision="auto")
    assert captioner.device == torch.device("cuda", 0)
    assert placed == [(torch.device("cuda", 0), "auto", "auto")]  # not the ONNX path


def test_onnx_and_int8_on_cuda_are_clear_errors(tiny_model_dir, fake_gpu):
    """Both checks come before anything is placed on the (faked) GPU."""
    model = CaptioningModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="backend onnx runs on the CPU only"):
        Captioner(model, backend="onnx", device="cuda")
    with pytest.raises(ConfigError, match="int8 encoder runs on ONNX Runtime"):
        Captioner(model, precision="int8", device="cuda")


@pytest.fixture()
def device_path(tiny_model_dir):
    """The GPU path (PyTorch encoder and decoder on ``self.device``), run on the CPU."""
    captioner = Captioner.from_pretrained(tiny_model_dir, backend="torch")
    captioner._on_gpu("auto", "auto")
    return captioner


def test_the_device_path_on_the_cpu_equals_the_torch_backend(tiny_model_dir, images, device_path):
    assert isinstance(device_path.extractor, DeviceExtractor)
    assert device_path.backend == "torch-cpu" and device_path.precision == "fp32"
    torch_backend = Captioner.from_pretrained(tiny_model_dir, backend="torch")
    for beam_size in (1, 3):
        got = device_path.caption(images, beam_size=beam_size, no_repeat_ngram_size=2)
        want = torch_backend.caption(images, beam_size=beam_size, no_repeat_ngram_size=2)
        assert [r.caption for r in got] == [r.caption for r in want]
        np.testing.assert_allclose(
            [r.score for r in got], [r.score for r in want], rtol=1e-5, atol=1e-6
        )


def test_evaluate_runs_with_the_device_path(shapes_prepared, device_path, tmp_path):
    """The GPU extractor has no ONNX file: the report says None instead of failing."""
    from captioner.evaluation.evaluate import evaluate

    report = evaluate(
        device_path,
        shapes_prepared.work_dir,
        "test",
        beam_size=2,
        use_java=False,
        limit=3,
        out_dir=tmp_path / "eval",
        use_cache=False,
        progress=False,
    )
    assert report["backend"] == "torch-cpu" and report["encoder_file"] is None
    assert report["device"] == "cpu" and report["n_images"] == 3
    results = json.loads((tmp_path / "eval" / "results_test_beam2.json").read_text())
    assert len(results) == 3


def test_auto_with_onnx_or_int8_asked_for_stays_on_the_cpu(tiny_model_dir, fake_gpu):
    model = CaptioningModel.from_pretrained(tiny_model_dir)
    captioner = Captioner(model, backend="onnx", threads=1, device="auto")
    assert captioner.device == torch.device("cpu") and captioner.backend == "onnx"


def test_evaluate_int8_on_cuda_fails_before_calibrating(
    tiny_model_dir, shapes_prepared, tmp_path, monkeypatch, fake_gpu
):
    import captioner.evaluation.evaluate as evaluation

    def never(*args):
        raise AssertionError("nothing may be calibrated for a run that cannot start")

    monkeypatch.setattr(evaluation, "_ensure_int8_encoder", never)
    with pytest.raises(ConfigError, match="int8 encoder runs on ONNX Runtime"):
        evaluation.evaluate(
            tiny_model_dir, shapes_prepared.work_dir, out_dir=tmp_path / "e", precision="int8",
            device="cuda",
        )  # fmt: skip
    assert not (tmp_path / "e").exists()
