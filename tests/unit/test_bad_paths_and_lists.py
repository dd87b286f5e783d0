"""One line, not a traceback, for inputs of the training and export side that are not what they
claim: a file given as a folder, a binary calibration list, a damaged int8 pointer."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import captioner.features.quantize as quantize
from captioner.cli.main import app
from captioner.errors import ConfigError, DataError
from captioner.settings import check_folder_option


def _clean(result) -> str:
    out = result.output + (getattr(result, "stderr", "") or "")
    assert result.exit_code == 2, out
    assert "Traceback" not in out and "error:" in out
    return out


def test_a_file_is_not_a_folder(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="--run-dir .*notes.txt is a file"):
        check_folder_option(afile, "--run-dir")
    with pytest.raises(ConfigError, match="lies under the file"):
        check_folder_option(afile / "sub", "--work-dir")
    check_folder_option(tmp_path / "new" / "deeper", "--run-dir")  # to be created: fine


@pytest.mark.parametrize("flag", ["--work-dir", "--run-dir"])
def test_train_refuses_a_file_as_its_folders(tmp_path, flag):
    afile = tmp_path / "taken"
    afile.write_text("x")
    args = ["train", "--work-dir", str(tmp_path / "w"), "--run-dir", str(tmp_path / "r")]
    args[args.index(flag) + 1] = str(afile)
    out = _clean(CliRunner().invoke(app, args))
    assert f"{flag} {afile} is a file" in out
    assert afile.read_text() == "x"


def test_prepare_refuses_a_file_as_its_work_dir(tmp_path, shapes_dir):
    afile = tmp_path / "taken"
    afile.write_text("x")
    out = _clean(
        CliRunner().invoke(
            app, ["prepare", "--data-dir", str(shapes_dir), "--work-dir", str(afile)]
        )
    )
    assert "--work-dir" in out and "is a file" in out


def test_export_refuses_a_file_as_its_out_dir(tmp_path):
    afile = tmp_path / "taken"
    afile.write_text("x")
    out = _clean(CliRunner().invoke(app, ["export", "--out-dir", str(afile)]))
    assert "--out-dir" in out


def test_a_binary_calibration_list_is_a_data_error(tmp_path):
    listing = tmp_path / "list.bin"
    listing.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(DataError, match="not a UTF-8 text list"):
        quantize.calibration_from_dir(tmp_path, 10, listing)
    latin1 = tmp_path / "list.txt"
    latin1.write_bytes("caf\xe9.jpg\n".encode("latin-1"))
    with pytest.raises(DataError, match="not a UTF-8 text list"):
        quantize.calibration_from_dir(tmp_path, 10, latin1)


@pytest.mark.parametrize(
    "content", [b"{broken", b"[1, 2]", b'{"file": 3}', b'{"file": "../../x.onnx"}', b"\xff\x00"]
)
def test_a_damaged_int8_pointer_is_one_clear_error(tmp_path, monkeypatch, content):
    pointer = tmp_path / "efficientnet-lite0-int8.default.json"
    pointer.write_bytes(content)
    monkeypatch.setattr(quantize, "default_pointer", lambda encoder: pointer)
    with pytest.raises(ConfigError, match="int8 encoder pointer .* is damaged"):
        quantize.default_int8_encoder("efficientnet-lite0")
