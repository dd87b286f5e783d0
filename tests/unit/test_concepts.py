"""ImageNetConcepts: the packaged class list, word aggregation, top words and the lexicon."""

from __future__ import annotations

import json

import numpy as np
import pytest

from captioner.errors import ConfigError
from captioner.features.concepts import ImageNetConcepts


@pytest.fixture(scope="module")
def concepts() -> ImageNetConcepts:
    return ImageNetConcepts.load()


def _probs(concepts: ImageNetConcepts, **by_wnid: float) -> np.ndarray:
    probs = np.zeros((1, 1000), dtype=np.float32)
    for wnid, p in by_wnid.items():
        probs[0, concepts.wnids.index(wnid)] = p
    return probs


def test_packaged_file_loads_in_classifier_order(concepts):
    assert len(concepts.wnids) == len(set(concepts.wnids)) == 1000
    assert concepts.wnids == sorted(concepts.wnids)  # ILSVRC-2012 order is sorted wnids
    assert concepts.wnids[0] == "n01440764" and concepts.names[0] == "tench"
    assert concepts.names[concepts.wnids.index("n02124075")] == "Egyptian cat"
    assert all(1 <= len(w) <= 3 for w in concepts.words)
    assert concepts.vocabulary == sorted({w for ws in concepts.words for w in ws})
    assert "script" in concepts.source


@pytest.mark.parametrize(
    ("wnid", "words"),
    [
        ("n02124075", ["cat"]),  # Egyptian cat
        ("n02123045", ["cat"]),  # tabby
        ("n07920052", ["coffee"]),  # espresso
        ("n02951358", ["canoe", "boat"]),
        ("n11939491", ["daisy", "flower"]),
        ("n02099601", ["dog"]),  # golden retriever
        ("n02165456", ["ladybug", "beetle"]),
        ("n03785016", ["motorcycle"]),  # moped
        ("n02085620", ["dog"]),  # Chihuahua: not "toy", a clipping of "toy dog"
    ],
)
def test_generated_words_for_well_known_classes(concepts, wnid, words):
    assert concepts.words[concepts.wnids.index(wnid)] == words


def test_ancestors_climb_the_hypernyms_but_stop_before_abstract_ones(concepts):
    tabby = concepts.ancestors[concepts.wnids.index("n02123045")]
    assert tabby[0] == "tabby"
    for word in ("cat", "feline", "carnivore", "mammal", "animal"):
        assert word in tabby
    for word in ("entity", "object", "whole", "organism"):
        assert word not in tabby


def test_word_probabilities_sum_the_classes_of_each_word(concepts):
    # tabby 0.5 + Egyptian cat 0.2 -> cat 0.7; canoe 0.1 -> canoe 0.1 and boat 0.1 + yawl 0.05
    probs = _probs(concepts, n02123045=0.5, n02124075=0.2, n02951358=0.1, n04612504=0.05)
    words = concepts.word_probabilities(probs)
    assert words.shape == (1, len(concepts.vocabulary))
    got = dict(zip(concepts.vocabulary, words[0]))
    assert got["cat"] == pytest.approx(0.7)
    assert got["canoe"] == pytest.approx(0.1)
    assert got["boat"] == pytest.approx(0.15)
    assert sum(v for w, v in got.items() if w not in {"cat", "canoe", "boat"}) == 0


def test_top_ranks_first_words_and_applies_the_threshold(concepts):
    probs = np.concatenate(
        [
            _probs(concepts, n02123045=0.5, n02124075=0.3, n02951358=0.12, n04612504=0.04),
            _probs(concepts, n11939491=0.9),
        ]
    )
    top = concepts.top(probs, k=5, min_prob=0.05)
    # canoe's mass stays with "canoe", yawl's 0.04 "boat" is under the threshold
    assert [w for w, _ in top[0]] == ["cat", "canoe"]
    assert top[0][0][1] == pytest.approx(0.8)
    assert top[1] == [("daisy", pytest.approx(0.9))]
    assert concepts.top(probs, k=1)[0] == [("cat", pytest.approx(0.8))]
    assert concepts.top(probs, min_prob=0.95) == [[], []]


def test_probabilities_of_the_wrong_shape_are_a_clear_error(concepts):
    with pytest.raises(ConfigError, match="1000"):
        concepts.word_probabilities(np.zeros((2, 999)))


def test_lexicon_matches_words_ancestors_and_plurals(concepts):
    table = concepts.lexicon(["dogs", "butterflies", "cat", "animals", "wolves", "zzz", "boat"])
    assert table.shape == (1000, 7) and table.dtype == np.float32
    golden = concepts.wnids.index("n02099601")
    tabby = concepts.wnids.index("n02123045")
    canoe = concepts.wnids.index("n02951358")
    assert table[golden, 0] == 1 and table[tabby, 0] == 0  # "dogs" -> dog
    assert table[concepts.wnids.index("n02279972"), 1] == 1  # "butterflies" -> monarch
    assert table[golden, 1] == 0
    assert table[tabby, 2] == 1 and table[golden, 2] == 0
    assert table[tabby, 3] == table[golden, 3] == 1 and table[canoe, 3] == 0
    assert table[concepts.wnids.index("n02114367"), 4] == 1  # timber wolf
    assert table[:, 5].sum() == 0
    assert table[canoe, 6] == 1


def _write(tmp_path, data) -> str:
    path = tmp_path / "concepts.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def _valid() -> dict:
    classes = [
        {"wnid": f"n{i:08d}", "name": f"c{i}", "words": [f"w{i}"], "ancestors": []}
        for i in range(1000)
    ]
    return {"source": {}, "classes": classes}


def test_a_valid_file_of_our_own_loads(tmp_path):
    concepts = ImageNetConcepts.load(_write(tmp_path, _valid()))
    assert len(concepts.vocabulary) == 1000


@pytest.mark.parametrize(
    "broken",
    [
        "{not json",
        {"classes": []},
        [1, 2, 3],
        {"classes": [{"wnid": "n1"}] * 1000},
        "dup",
        "nowords",
    ],
)
def test_malformed_files_are_a_config_error(tmp_path, broken):
    if broken == "dup":
        broken = _valid()
        broken["classes"][1]["wnid"] = broken["classes"][0]["wnid"]
    elif broken == "nowords":
        broken = _valid()
        broken["classes"][7]["words"] = []
    with pytest.raises(ConfigError, match="ImageNet concepts"):
        ImageNetConcepts.load(_write(tmp_path, broken))


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ImageNetConcepts.load(tmp_path / "absent.json")


def test_zero_one_matrix_is_the_dense_product():
    from captioner.features.concepts import ZeroOneMatrix

    rng = np.random.default_rng(0)
    dense = (rng.random((7, 30)) < 0.1).astype(np.float32)
    dense[3] = 0.0  # a word no class names
    probs = rng.random((4, 30)).astype(np.float32)
    got = ZeroOneMatrix(dense)(probs)
    assert got.shape == (4, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, probs @ dense.T, rtol=1e-6)
    assert (got[:, 3] == 0).all()
    assert ZeroOneMatrix(dense)(np.zeros((0, 30))).shape == (0, 7)
    with pytest.raises(ValueError, match="zeros and ones"):
        ZeroOneMatrix(dense * 0.5)
