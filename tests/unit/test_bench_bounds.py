"""bench/bench_bounds.py's ceilings: the pure counting, on hand-made photos (no encoder run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bounds():
    spec = importlib.util.spec_from_file_location(
        "bench_bounds", REPO / "bench" / "bench_bounds.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_ood", None)


def _photo(bounds, pid: str, words: list[str]):
    return bounds.bench_ood.Photo(pid, "pkg", "1", f"{pid}.png", words, False, False, "")


def test_vocabulary_ceiling_counts_photos_with_any_subject_word_known(bounds):
    photos = [_photo(bounds, "cat", ["cat", "kitten"]), _photo(bounds, "moon", ["moon", "lunar"])]
    assert bounds.vocabulary_named(photos, ["a", "kitten", "dog"]) == [True, False]
    assert bounds.vocabulary_named(photos, []) == [False, False]


def test_concept_ceiling_reads_the_top_concept_words(bounds):
    from captioner.features.concepts import ImageNetConcepts

    concepts = ImageNetConcepts.load()
    cat = next(i for i, ws in enumerate(concepts.words) if ws[0] == "cat")
    probs = np.zeros((2, 1000), dtype=np.float32)
    probs[0, cat] = 0.9  # a cat photo the head sees as a cat
    fish = next(i for i, ws in enumerate(concepts.words) if ws[0] == "fish")
    probs[1, fish] = 0.9  # and one it sees as something else
    photos = [_photo(bounds, "a", ["cat"]), _photo(bounds, "b", ["cat"])]
    assert bounds.concepts_named(photos, probs, concepts, 5, 0.05) == [True, False]


def test_union_ceiling_keeps_caption_hits_and_adds_concept_hits(bounds):
    rows = [{"subject_named": True}, {"subject_named": False}, {"subject_named": False}]
    assert bounds.union_named(rows, [False, True, False]) == [True, True, False]
    with pytest.raises(ValueError):
        bounds.union_named(rows, [True])


def test_training_prior_counts_any_reference_naming_a_person_or_dog(bounds):
    refs = {
        "1.jpg": ["a man runs", "someone running"],
        "2.jpg": ["a dog runs", "a brown puppy"],
        "3.jpg": ["a boy and his dog", "two kids"],
        "4.jpg": ["a snowy mountain", "a manhole in the street"],  # "manhole" is no man
    }
    prior = bounds.training_prior(list(refs), refs)
    assert prior == {"photos": 4, "person": 2, "dog": 2, "neither": 1}
