"""Flickr8k end to end (skipped when ../shared/data/flickr8k is absent)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from captioner.data.captions import read_captions
from captioner.data.prepare import PrepareSettings, prepare

pytestmark = pytest.mark.flickr8k

README = Path(__file__).resolve().parents[2] / "README.md"


def test_both_caption_files_read_the_same_captions(flickr8k_dir):
    csv_set = read_captions(flickr8k_dir / "captions.txt")
    token_set = read_captions(flickr8k_dir / "Flickr8k.token.txt")
    assert len(csv_set.captions) == 8091
    assert csv_set.num_captions == 40455
    assert all(len(c) == 5 for c in csv_set.captions.values())
    shared = set(csv_set.captions) & set(token_set.captions)
    assert len(shared) == 8091
    name = "1000268201_693b08cb0e.jpg"
    assert csv_set.captions[name] == token_set.captions[name]


def test_prepare_uses_the_official_split(flickr8k_dir, tmp_path):
    data = prepare(flickr8k_dir, tmp_path / "work", PrepareSettings())
    s = data.splits
    assert s.settings.method == "official"
    assert (len(s.train), len(s.val), len(s.test)) == (6000, 1000, 1000)
    assert not set(s.train) & set(s.test) and not set(s.val) & set(s.test)
    assert 2000 < len(data.vocab) < 3500  # words seen >= 5 times in training captions
    assert data.vocab.itos[:5] == ["<pad>", "<start>", "<end>", "<unk>", "a"]


def _readme_scores() -> dict[str, float]:
    """The shipped model's test-split row of the README's quality table."""
    text = README.read_text(encoding="utf-8")
    row = re.search(r"^\| \*\*captioner[^|]*\*\*[^\n]*$", text, re.MULTILINE)
    assert row, "README has no '| **captioner ...** |' row in its quality table"
    cells = [c.strip().strip("*") for c in row.group(0).strip("|").split("|")]
    return {
        "BLEU-1": float(cells[1]),
        "BLEU-4": float(cells[2]),
        "METEOR": float(cells[3]),
        "CIDEr-D": float(cells[4]),
    }


@pytest.mark.slow
def test_bundled_model_matches_the_readme_on_the_test_split(flickr8k_dir, tmp_path):
    """Regression guard over every stage: decode the 1,000 test images with the bundled model
    and compare with the numbers the README states for it."""
    from captioner.evaluation.evaluate import evaluate

    prepare(flickr8k_dir, tmp_path / "work", PrepareSettings())
    # decoding settings: the bundled model's generation_config.json, as the README reports
    report = evaluate(
        None,
        tmp_path / "work",
        split="test",
        out_dir=tmp_path / "eval",
        use_java=False,
        progress=False,
    )
    assert report["n_images"] == 1000
    stated = _readme_scores()
    for metric in ("BLEU-4", "CIDEr-D"):
        assert report["scores"][metric] >= stated[metric] - 1.0, (metric, report["scores"])
