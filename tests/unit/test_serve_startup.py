"""`captioner serve` with a bad model, backend or log level: one line, no uvicorn traceback
(issue: "Fixes from a second reliability probe", item 10)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, says",
    [
        (["--model", "/nonexistent/model"], "model directory not found"),
        (["--backend", "foo"], "backend must be one of"),
        (["--log-level", "verbose"], "--log-level must be one of"),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(args, says):
    done = subprocess.run(
        [sys.executable, "-m", "captioner", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert says in output and "Traceback" not in output
    assert len(output.splitlines()) == 1, output
