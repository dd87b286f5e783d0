"""Tests for captioner.evaluation.metrics (pycocoevalcap wrapper).

Java-free tests use the pure-Python tokenizer (use_java=False). Tests that need Java are
skipped without it; those that run METEOR are marked slow because its JVM loads a large
paraphrase table on first use (the process is then shared by the later tests).
"""

from __future__ import annotations

import math
import shutil

import pytest

from captioner.errors import CaptionerError, DataError
from captioner.evaluation import metrics, ptb_tokenizer
from captioner.evaluation.metrics import METRIC_NAMES, format_scores, score_captions
from captioner.evaluation.ptb_tokenizer import ptb_like_tokenize

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH")

REFS = {
    "img1": [
        "a black dog runs across the grass",
        "a dog is running on a lawn",
        "the black dog is running outside",
    ],
    "img2": [
        "two children play soccer in a park",
        "kids playing football on the grass",
        "two kids kick a ball in the park",
    ],
    "img3": [
        "a man rides a red bicycle down the street",
        "a cyclist on a red bike in the city",
        "a man riding his bike on the road",
    ],
    "img4": [
        "a woman surfs a large wave",
        "a surfer riding a wave in the ocean",
        "a person on a surfboard in the sea",
    ],
}
IDENTICAL = {image: refs[0] for image, refs in REFS.items()}
GOOD = {
    "img1": "a black dog is running on the grass",
    "img2": "two kids play soccer in the park",
    "img3": "a man riding a red bike down the street",
    "img4": "a surfer rides a big wave in the ocean",
}
WRONG = {
    "img1": "pizza slices sit beside an oven",
    "img2": "an old clock tower at night",
    "img3": "three cats sleep under blankets",
    "img4": "snowy mountains behind wooden cabins",
}


# ------------------------------------------------------------------------------------------
# Pure-Python path (no Java needed)
# ------------------------------------------------------------------------------------------


def test_returns_all_metrics_in_order() -> None:
    scores = score_captions(REFS, GOOD, use_java=False)
    assert tuple(scores) == METRIC_NAMES
    assert scores["METEOR"] is None  # unavailable without Java, never 0
    for name in METRIC_NAMES:
        if name != "METEOR":
            assert isinstance(scores[name], float)


def test_identical_captions_score_perfect_without_java() -> None:
    scores = score_captions(REFS, IDENTICAL, use_java=False)
    assert scores["BLEU-4"] == pytest.approx(100.0, abs=1e-4)
    assert scores["BLEU-1"] == pytest.approx(100.0, abs=1e-4)
    assert scores["ROUGE-L"] == pytest.approx(100.0)
    assert scores["CIDEr-D"] > 0.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # 5 of 6 unigrams match ("is" does not), same length so no brevity penalty: 5/6.
        ("the cat is on the mat", 100.0 * 5 / 6),
        # Both unigrams match (precision 1) but 2 vs 6 words: brevity penalty exp(1 - 6/2).
        ("the cat", 100.0 * math.exp(1 - 6 / 2)),
    ],
)
def test_bleu1_known_value(prediction: str, expected: float) -> None:
    scores = score_captions({"x": ["the cat sat on the mat"]}, {"x": prediction}, use_java=False)
    # pycocoevalcap adds 1e-15 / 1e-9 smoothing terms, hence the tiny tolerance.
    assert scores["BLEU-1"] == pytest.approx(expected, abs=1e-6)


def test_wrong_caption_scores_lower_without_java() -> None:
    good = score_captions(REFS, GOOD, use_java=False)
    wrong = score_captions(REFS, WRONG, use_java=False)
    for name in METRIC_NAMES:
        if name == "METEOR":
            continue
        assert wrong[name] < good[name], name


def test_no_stdout_noise(capsys: pytest.CaptureFixture[str]) -> None:
    score_captions(REFS, GOOD, use_java=False)
    assert capsys.readouterr().out == ""  # pycocoevalcap's Bleu prints {'testlen': ...}


def test_extra_reference_ids_are_ignored() -> None:
    subset = {k: GOOD[k] for k in ("img1", "img2", "img3")}
    refs_subset = {k: REFS[k] for k in subset}
    assert score_captions(REFS, subset, use_java=False) == score_captions(
        refs_subset, subset, use_java=False
    )


def test_missing_references_raise_data_error() -> None:
    with pytest.raises(DataError, match="no reference captions.*'unknown'"):
        score_captions(REFS, {**GOOD, "unknown": "a dog"}, use_java=False)


@pytest.mark.parametrize(
    ("references", "predictions"),
    [
        ({}, {}),
        (REFS, {}),
        ({}, GOOD),
        ({"img1": []}, {"img1": "a dog"}),
        ({"img1": "a dog runs"}, {"img1": "a dog"}),  # a string, not a list of strings
        ({"img1": ["a dog runs"]}, {"img1": ["a dog"]}),  # prediction must be one string
    ],
)
def test_bad_input_raises_data_error(references: dict, predictions: dict) -> None:
    with pytest.raises(DataError):
        score_captions(references, predictions, use_java=False)


def test_auto_mode_without_java_reports_meteor_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ptb_tokenizer.shutil, "which", lambda name: None)
    scores = score_captions(REFS, GOOD)
    assert scores["METEOR"] is None
    assert scores == score_captions(REFS, GOOD, use_java=False)


def test_require_java_without_java_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ptb_tokenizer.shutil, "which", lambda name: None)
    with pytest.raises(CaptionerError, match="java"):
        score_captions(REFS, GOOD, use_java=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A man's dog doesn't run.", "a man 's dog does n't run"),
        ("Two (small) dogs, playing -- in snow!", "two -lrb- small -rrb- dogs playing in snow"),
        (
            "A black-and-white dog at 3.5 p.m. by 1,000 men",
            "a black-and-white dog at 3.5 p.m. by 1,000 men",
        ),
        ('He said "hello" ... ; : ?', "he said hello"),
        ("We cannot see a 3-year-old at 5:30pm", "we can not see a 3-year-old at 5:30 pm"),
        ("line\nbreak\tand   spaces", "line break and spaces"),
        ("", ""),
    ],
)
def test_ptb_like_tokenize(text: str, expected: str) -> None:
    # Expected strings are what coco-caption's Java PTBTokenizer + punctuation filter produce.
    assert ptb_like_tokenize(text) == expected


def test_captions_with_newlines_and_separators_are_scored() -> None:
    scores = score_captions(
        {"a": ["a dog\nruns ||| fast", ""], "b": ["two kids play"], "c": ["a cat"]},
        {"a": "a dog |||\nruns", "b": "", "c": "a cat"},
        use_java=False,
    )
    assert all(isinstance(scores[name], float) for name in METRIC_NAMES if name != "METEOR")


def test_format_scores_table() -> None:
    table = format_scores({"BLEU-1": 65.4321, "METEOR": None, "ROUGE-L": 50.0, "CIDEr-D": 120.0})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "score"]
    assert "65.43" in table and "120.00" in table
    assert any(line.split() == ["METEOR", "unavailable"] for line in lines)
    assert len({len(line) for line in lines}) == 1  # right-aligned columns
    assert format_scores({}) == "(no scores)"


# ------------------------------------------------------------------------------------------
# Java path (PTBTokenizer, METEOR)
# ------------------------------------------------------------------------------------------


@needs_java
def test_python_tokenizer_matches_java_tokenizer() -> None:
    captions = [
        "A little girl climbing into a wooden playhouse .",
        "Two men in ski gear , one standing , one sitting , in the snow .",
        "The boy's shirt is red, isn't it?",
        'A group of people stand outside a building that says "Bob\'s Diner".',
        "A dog (a lab) runs at 3.5 mph past 1,000 people in the U.S.A.",
        "We cannot see the 1950s AT&T 4x4 car at 5:30pm -- or can we...",
    ]
    java = ptb_tokenizer.tokenize_java({i: [c] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert ptb_like_tokenize(caption) == java[i][0], caption


@needs_java
@pytest.mark.slow
def test_identical_captions_with_java() -> None:
    scores = score_captions(REFS, IDENTICAL, use_java=True)
    assert scores["BLEU-4"] == pytest.approx(100.0, abs=1e-4)
    assert scores["ROUGE-L"] == pytest.approx(100.0)
    assert scores["CIDEr-D"] > 0.0
    assert scores["METEOR"] is not None and scores["METEOR"] > 90.0


@needs_java
@pytest.mark.slow
def test_wrong_caption_scores_lower_on_every_metric_with_java() -> None:
    good = score_captions(REFS, GOOD, use_java=True)
    wrong = score_captions(REFS, WRONG, use_java=True)
    for name in METRIC_NAMES:
        assert good[name] is not None and wrong[name] is not None, name
        assert wrong[name] < good[name], name


@needs_java
@pytest.mark.slow
def test_python_fallback_close_to_java_path() -> None:
    java = score_captions(REFS, GOOD, use_java=True)
    fallback = score_captions(REFS, GOOD, use_java=False)
    assert java["METEOR"] is not None and fallback["METEOR"] is None
    for name in METRIC_NAMES:
        if name != "METEOR":
            assert fallback[name] == pytest.approx(java[name], rel=1e-6, abs=1e-6), name


@needs_java
@pytest.mark.slow
def test_meteor_process_is_reused_survives_odd_text_and_closes() -> None:
    first = score_captions(REFS, GOOD, use_java=True)
    process = metrics._meteor.meteor_p
    odd = score_captions(
        {"a": ["a dog\nruns ||| fast", ""], "b": ["two kids play"], "c": ["a cat"]},
        {"a": "a dog |||\nruns", "b": "", "c": "a cat"},
        use_java=True,
    )
    assert isinstance(odd["METEOR"], float)
    second = score_captions(REFS, GOOD, use_java=True)
    assert second == first
    assert metrics._meteor.meteor_p is process  # one JVM for every call
    metrics.close_meteor()
    assert metrics._meteor is None
    assert process.poll() is not None  # the java child is gone


@needs_java
def test_meteor_timeout_gives_none_and_kills_java(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(metrics, "METEOR_TIMEOUT_S", 0.0)
    monkeypatch.setattr(metrics, "METEOR_TIMEOUT_PER_IMAGE_S", 0.0)
    started: list[metrics._ManagedMeteor] = []

    class Recording(metrics._ManagedMeteor):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    monkeypatch.setattr(metrics, "_ManagedMeteor", Recording)
    metrics.close_meteor()
    scores = score_captions(REFS, GOOD, use_java=True)
    assert scores["METEOR"] is None
    assert scores["BLEU-1"] is not None and scores["BLEU-1"] > 0
    assert metrics._meteor is None
    assert len(started) == 1 and started[0].meteor_p.poll() is not None
    assert "METEOR unavailable" in caplog.text
