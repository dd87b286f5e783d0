"""The sentence check behind "captions that are not sentences" (bench/bench_ood.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from captioner.evaluation import grammar

REPO = Path(__file__).resolve().parents[2]


def test_link_grammar_tells_sentences_from_word_salad():
    parses = grammar.sentence_parser()
    if parses is None:
        pytest.skip("link-grammar not installed (apt-get install python3-link-grammar)")
    assert parses("a dog runs through the snow")
    assert parses("a cat")  # a short description is a well-formed phrase
    assert not parses("a a is is sitting on a fallen in the blue")
    assert not parses("a drinks is sitting on a food in the liquid")
    assert not parses("")


def test_bench_ood_counts_parse_failures_and_short_descriptions(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_ood", REPO / "bench" / "bench_ood.py")
    bench_ood = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_ood", bench_ood)  # its dataclass looks itself up
    spec.loader.exec_module(bench_ood)
    monkeypatch.setattr(grammar, "sentence_parser", lambda: lambda text: "is is" not in text)
    photos = [
        bench_ood.Photo("a", "p", "1", "x", ["cat"], False, False, ""),
        bench_ood.Photo("b", "p", "1", "y", ["dog"], False, True, ""),
    ]
    result = bench_ood.score(photos, ["a cat", "a is is dog"], shorts=[True, False])
    assert result["parse_failures"] == [1, 2]
    assert result["short_descriptions"] == [1, 2]
    assert [r["parses"] for r in result["photos"]] == [True, False]
    monkeypatch.setattr(grammar, "sentence_parser", lambda: None)
    assert bench_ood.score(photos, ["a cat", "a dog"])["parse_failures"] is None
