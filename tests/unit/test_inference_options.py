"""Options shared by the inference commands: thread counts above the CPU cores are capped with
a note, not taken as given (the probe's ``--threads 999`` started 1,001 threads and ran 250x
slower), and every ``--precision`` tells the same story."""

from __future__ import annotations

import pytest

import captioner.settings
import captioner.web.app


class Stop(Exception):
    """Raised by the fake create_app: the settings were seen, nothing is served."""


def test_serve_caps_workers_and_decode_threads_at_the_cores(monkeypatch, capsys):
    from captioner.cli.serve import serve

    seen = []

    def create_app(load_model, settings):
        seen.append(settings)
        raise Stop

    monkeypatch.setattr(captioner.settings, "available_cores", lambda: 2)
    monkeypatch.setattr(captioner.web.app, "create_app", create_app)
    with pytest.raises(Stop):
        serve(port=0, workers=64, decode_threads=50, device="cpu", log_level="critical")
    assert (seen[0].workers, seen[0].decode_threads) == (2, 2)
    err = capsys.readouterr().err
    assert "--workers 64 is more than the 2 CPU cores here: using 2" in err
    assert "--decode-threads 50 is more than the 2 CPU cores here: using 2" in err


def test_serve_keeps_thread_counts_within_the_cores(monkeypatch, capsys):
    from captioner.cli.serve import serve

    seen = []

    def create_app(load_model, settings):
        seen.append(settings)
        raise Stop

    monkeypatch.setattr(captioner.settings, "available_cores", lambda: 8)
    monkeypatch.setattr(captioner.web.app, "create_app", create_app)
    with pytest.raises(Stop):
        serve(port=0, workers=3, decode_threads=2, device="cpu", log_level="critical")
    assert (seen[0].workers, seen[0].decode_threads) == (3, 2)
    assert "CPU cores" not in capsys.readouterr().err


def test_every_precision_option_tells_the_same_story():
    """caption and predict said int8 was within the quality bar, evaluate and serve that it was
    over it: one shared text now, saying int8 is opt-in."""
    import typer.main

    from captioner.cli.inference_options import PRECISION_HELP
    from captioner.cli.main import app

    group = typer.main.get_command(app)
    helps = {}
    for name in ("caption", "predict", "evaluate", "serve"):
        (option,) = [p for p in group.commands[name].params if p.name == "precision"]
        helps[name] = option.help
    assert all(PRECISION_HELP in text for text in helps.values()), helps
    assert "opt-in" in PRECISION_HELP and "over the quality bar" not in " ".join(helps.values())
