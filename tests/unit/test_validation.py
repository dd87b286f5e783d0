"""Settings validation (captioner.settings) and the CLI's handling of nonsense values: every bad
value is one clear error naming the setting, the value and the allowed range; no traceback."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from captioner import __version__
from captioner.cli.main import app
from captioner.errors import CheckpointError, ConfigError
from captioner.model.captioning_model import CaptioningModel
from captioner.model.config import DecoderConfig, GenerationConfig
from captioner.progress import progress_bar
from captioner.settings import Bounds, check_value
from captioner.training.config import ScstConfig, TrainConfig


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_clean_error(result, *needles: str) -> None:
    """Exit code 2, each needle in stderr, and no Python traceback anywhere."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# ---- the rules themselves --------------------------------------------------------------------


@pytest.mark.parametrize(
    "bounds, text",
    [
        (Bounds(ge=0), "at least 0"),
        (Bounds(gt=0), "greater than 0"),
        (Bounds(ge=1, le=4), "from 1 to 4"),
        (Bounds(ge=0, lt=1), "at least 0 and below 1"),
        (Bounds(le=2.5), "at most 2.5"),
        (Bounds(choices=("auto", "onnx", "torch")), "one of auto, onnx or torch"),
    ],
)
def test_bounds_describe(bounds, text):
    assert bounds.describe() == text


@pytest.mark.parametrize(
    "value, kind, match",
    [
        ("abc", int, "must be an integer, not 'abc'"),
        (16.5, int, "must be an integer, not 16.5"),
        (True, int, "must be an integer, not True"),
        ("0.1", float, "must be a number"),
        (math.nan, float, "finite"),
        (math.inf, float, "finite"),
        (1, bool, "true or false"),
        (3, str, "a string"),
        (None, int, "an integer, not None"),
    ],
)
def test_check_value_rejects_wrong_types(value, kind, match):
    with pytest.raises(ConfigError, match=match):
        check_value("x", value, kind, False, Bounds())


def test_check_value_accepts_and_converts():
    assert check_value("x", 2, float, False, Bounds(ge=0)) == 2.0
    assert isinstance(check_value("x", 2, float, False, Bounds()), float)
    assert check_value("x", None, float, True, Bounds(ge=0)) is None
    with pytest.raises(ConfigError, match=r"x must be at least 0 and below 1, not 1\.0"):
        check_value("x", 1.0, float, False, Bounds(ge=0, lt=1))


# ---- training and SCST settings --------------------------------------------------------------

TRAIN_BAD = [
    ("--label-smoothing", "2", "at least 0 and below 1"),
    ("--max-caption-length", "0", "at least 1"),
    ("--threads", "-1", "at least 0"),
    ("--num-words", "-1", "at least 0"),
    ("--warmup-steps", "-10", "at least 0"),
    ("--keep-last", "-1", "at least 0"),
    ("--val-max-length", "0", "from 1 to 100"),
    ("--val-images", "-1", "at least 0"),
    ("--max-steps", "-1", "at least 0"),
    ("--grad-clip", "-1", "at least 0"),
    ("--backend", "tpu", "one of auto, onnx or torch"),
    ("--dropout", "1", "at least 0 and below 1"),
    ("--lr", "0", "greater than 0"),
    ("--seed", "-3", "at least 0"),
    ("--min-lr", "0.5", "at most --lr"),
]


@pytest.mark.parametrize("flag, value, allowed", TRAIN_BAD)
def test_train_rejects_nonsense_values(flag, value, allowed, tmp_path):
    run_dir, work_dir = tmp_path / "run", tmp_path / "work"
    result = run("train", "--run-dir", run_dir, "--work-dir", work_dir, flag, value)
    assert_clean_error(result, flag, allowed)
    assert value.lstrip("-") in result.stderr  # the value given
    assert not run_dir.exists() and not work_dir.exists()  # nothing else changed


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--bleu-order", "5", "from 1 to 4"),
        ("--bleu-weight", "-1", "at least 0"),
        ("--samples-per-image", "1", "at least 2"),
        ("--threads", "-1", "at least 0"),
        ("--keep-last", "-1", "at least 0"),
        ("--max-length", "0", "from 1 to 100"),
        ("--backend", "tpu", "one of auto, onnx or torch"),
        ("--dropout", "1.5", "at least 0 and below 1"),
    ],
)
def test_scst_rejects_nonsense_values(flag, value, allowed, tmp_path):
    run_dir = tmp_path / "run"
    result = run("scst", "--init-model", tmp_path, "--run-dir", run_dir, flag, value)
    assert_clean_error(result, flag, allowed)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "cls, data, match",
    [
        (TrainConfig, {"hidden_dim": "abc"}, "--hidden-dim must be an integer, not 'abc'"),
        (TrainConfig, {"epochs": 2.5}, "--epochs must be an integer, not 2.5"),
        (TrainConfig, {"lr": "fast"}, "--lr must be a number"),
        (TrainConfig, {"work_dir": 3}, "--work-dir must be a string"),
        (TrainConfig, {"layers": 2}, "unknown training settings keys"),
        (ScstConfig, {"init_model": "m", "reward_end": "yes"}, "--reward-end must be true or"),
        (ScstConfig, {"init_model": "m", "min_lr": -1}, "--min-lr must be at least 0"),
    ],
)
def test_saved_settings_are_checked_too(cls, data, match):
    with pytest.raises(ConfigError, match=match):
        cls.from_json(data)


def test_settings_defaults_are_valid_and_round_trip():
    for config in (TrainConfig(), ScstConfig(init_model="m")):
        assert type(config).from_json(json.loads(json.dumps(config.to_json()))) == config
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


# ---- model directories -----------------------------------------------------------------------


@pytest.fixture()
def picture(tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), (120, 30, 200)).save(path)
    return path


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_model_dir, target)
    return target


def _edit_decoder(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["decoder"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "value, match",
    [
        ("abc", "hidden_dim must be an integer, not 'abc'"),
        (16.5, "not 16.5"),
        (0, "from 1 to 16384"),
        (10**9, "hidden_dim must be from 1 to 16384, not 1000000000"),  # not a 1 TB allocation
    ],
)
def test_model_config_with_bad_hidden_dim(model_copy, picture, value, match):
    _edit_decoder(model_copy, hidden_dim=value)
    with pytest.raises(ConfigError, match=match) as info:
        CaptioningModel.from_pretrained(model_copy)
    assert "config.json" in str(info.value)
    assert_clean_error(run("caption", picture, "--model", model_copy), "hidden_dim")


def test_model_config_that_is_not_an_object(model_copy, picture):
    (model_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"must be a JSON object, not \[1, 2\]"):
        CaptioningModel.from_pretrained(model_copy)
    assert_clean_error(run("caption", picture, "--model", model_copy), "JSON object")


@pytest.mark.parametrize(
    "content, match",
    [
        ("5", "generation settings must be a JSON object, not 5"),
        ('{"beam_size": "three"}', "beam_size must be an integer, not 'three'"),
        ('{"beam_size": 0}', "beam_size must be from 1 to 20, not 0"),
        ('{"length_penalty": -1}', "length_penalty must be from 0 to 10"),
        ('{"suppress_unk": "no"}', "suppress_unk must be true or false"),
        ('{"max_length": 1e9}', "max_length must be an integer"),
    ],
)
def test_bad_generation_config(model_copy, picture, content, match):
    (model_copy / "generation_config.json").write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        CaptioningModel.from_pretrained(model_copy)
    assert "generation_config.json" in str(info.value)
    assert_clean_error(run("caption", picture, "--model", model_copy), match.split()[0])


def test_generation_config_defaults_and_partial_files():
    assert GenerationConfig.from_json({"beam_size": 1}).to_json() == {
        **GenerationConfig().to_json(),
        "beam_size": 1,
    }
    with pytest.raises(ConfigError, match="unknown generation settings keys"):
        GenerationConfig.from_json({"beams": 2})


def test_decoder_config_requires_vocab_size():
    with pytest.raises(ConfigError, match="lacks vocab_size"):
        DecoderConfig.from_json({"hidden_dim": 8})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        DecoderConfig.from_json("gru")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_weights_with_nan_or_inf_are_refused(model_copy, picture, bad):
    weights = load_file(str(model_copy / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = bad
    save_file(weights, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name} contains NaN or infinite values"):
        CaptioningModel.from_pretrained(model_copy)
    assert_clean_error(run("caption", picture, "--model", model_copy), "NaN")


# ---- the other commands' options -------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (("prepare", "--data-dir", "{tmp}", "--num-words", "-1"), "--num-words"),
        (("prepare", "--data-dir", "{tmp}", "--min-count", "0"), "--min-count"),
        (("prepare", "--data-dir", "{tmp}", "--test-size", "2"), "--test-size"),
        (("features", "--work-dir", "{tmp}", "--threads", "-1"), "--threads"),
        (("features", "--work-dir", "{tmp}", "--batch-size", "0"), "--batch-size"),
        (("features", "--work-dir", "{tmp}", "--augment", "-1"), "--augment"),
        (("features", "--work-dir", "{tmp}", "--backend", "tpu"), "--backend"),
        (("features", "--work-dir", "{tmp}", "--augment-strength", "max"), "--augment-strength"),
        (("average", "{tmp}", "--out", "{tmp}/avg", "--last", "0"), "--last"),
        (("average", "{tmp}", "--out", "{tmp}/avg", "--epoch", "0"), "--epoch"),
        (("caption", "{tmp}", "--backend", "tpu"), "--backend"),
        (("caption", "{tmp}", "--batch-size", "0"), "--batch-size"),
        (("predict", "--seed", "-1"), "--seed"),
        (("predict", "--backend", "tpu"), "--backend"),
        (("evaluate", "--work-dir", "{tmp}", "--length-penalty", "-1"), "--length-penalty"),
        (("evaluate", "--work-dir", "{tmp}", "--limit", "-1"), "--limit"),
        (("evaluate", "--work-dir", "{tmp}", "--backend", "tpu"), "--backend"),
        (("export", "--out-dir", "{tmp}/onnx", "--tolerance", "0"), "--tolerance"),
        (("preview", "augment", "{tmp}/x.png", "-n", "0"), "-n"),
        (("preview", "augment", "{tmp}/x.png", "--strength", "max"), "--strength"),
    ],
)
def test_every_command_rejects_nonsense_numbers(args, needle, tmp_path):
    before = sorted(tmp_path.iterdir())
    result = run(*(a.format(tmp=tmp_path) for a in args))
    assert_clean_error(result, needle)
    assert sorted(tmp_path.iterdir()) == before  # nothing written


# ---- help, version, progress bars ------------------------------------------------------------

COMMANDS = [
    (),
    ("prepare",),
    ("features",),
    ("train",),
    ("scst",),
    ("average",),
    ("caption",),
    ("predict",),
    ("evaluate",),
    ("export",),
    ("serve",),
    ("preview", "augment"),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_metavar_on_flags(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    help_line = next(line for line in result.output.splitlines() if "--help" in line)
    assert "<" not in help_line


def test_value_options_keep_their_metavar():
    result = run("train", "--help")
    line = next(line for line in result.output.splitlines() if "--label-smoothing" in line)
    assert "<float>" in line and "at least 0 and below 1" in line


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"captioner {__version__}"


def test_scst_help_names_both_rewards():
    result = run("scst", "--help")
    summary = result.output.split("Options")[0]
    assert "CIDEr-D" in summary and "BLEU" in summary and "--bleu-weight" in summary


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    piped = io.StringIO()
    with progress_bar(range(3), file=piped) as bar:
        assert bar.disable
        assert list(bar) == [0, 1, 2]
    assert piped.getvalue() == ""

    terminal = _FakeTerminal()
    with progress_bar(range(3), file=terminal, desc="work") as bar:
        assert not bar.disable
        assert list(bar) == [0, 1, 2]
    assert "work" in terminal.getvalue()
    with progress_bar(range(3), file=_FakeTerminal(), disable=True) as bar:
        assert bar.disable
