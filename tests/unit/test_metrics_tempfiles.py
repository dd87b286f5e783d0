"""Issue 22: a SIGKILL during ``evaluate`` left a temp file of captions inside the installed
pycocoevalcap package (its PTBTokenizer writes its input there). Ours goes to a temp dir."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import captioner.evaluation.ptb_tokenizer as ptb

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH")
PACKAGE_DIR = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
CAPTIONS = {
    "a": ["A dog runs, on the grass.", "two dogs (brown) play!"],
    "b": ["It's a man's hat -- isn't it?", "café au lait ... ok"],
    "c": ["x"],
}


@needs_java
def test_tokenizer_input_lives_in_our_temp_dir_while_java_runs(tmp_path, monkeypatch):
    """While the JVM runs (when a kill would strike), the input file is under the system temp
    dir, and nothing new is in the package directory."""
    monkeypatch.setattr(ptb.tempfile, "tempdir", str(tmp_path))
    before = set(os.listdir(PACKAGE_DIR))
    seen = []
    real_run = subprocess.run

    def spy(command, **kwargs):
        seen.append((command[-1], os.path.exists(command[-1]), set(os.listdir(PACKAGE_DIR))))
        return real_run(command, **kwargs)

    monkeypatch.setattr(ptb.subprocess, "run", spy)
    ptb.tokenize_java(CAPTIONS)
    assert len(seen) == 1, "the tokenizer did not run through our own command"
    path, existed, during = seen[0]
    assert existed and path.startswith(str(tmp_path) + os.sep)
    assert during == before and set(os.listdir(PACKAGE_DIR)) == before
    assert list(tmp_path.iterdir()) == []  # cleaned up after a normal run


@needs_java
def test_tokenizer_output_is_pycocoevalcaps(capsys):
    payload = {k: [{"caption": c} for c in caps] for k, caps in CAPTIONS.items()}
    expected = PTBTokenizer().tokenize(payload)
    capsys.readouterr()
    assert ptb.tokenize_java(CAPTIONS) == expected
    assert expected["a"][0] == "a dog runs on the grass"


def test_a_failing_tokenizer_is_one_captioner_error(monkeypatch):
    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, b"", b"Error: no class\nmain failed\n")

    monkeypatch.setattr(ptb.subprocess, "run", failing)
    with pytest.raises(ptb.CaptionerError, match="exited with 1: main failed"):
        ptb.tokenize_java(CAPTIONS)
