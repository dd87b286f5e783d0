"""The person/animal detector, its gate on caption words and the short descriptions."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from captioner.errors import CheckpointError
from captioner.evaluation.hallucination import DOG_WORDS, PERSON_WORDS
from captioner.features.detector import DetectorOutput, ObjectDetector, bundled_detector_dir
from captioner.features.detector_words import LABEL_WORDS, display_name
from captioner.grounding.detection import DetectionGate, detector_concepts, dev_thresholds
from captioner.grounding.grounder import GroundingConfig
from captioner.grounding.second_look import SecondLook, merged_concepts
from captioner.grounding.short_description import leading_noun, short_description

LABELS = ["???", "Person", "Dog", "Cat", "Car"]
OBJECT_WORDS = {"man", "dog", "cat", "car", "fish", "building", "shoe", "shoes", "table"}


def test_bundled_detector_runs_and_batches_consistently():
    detector = ObjectDetector.from_pretrained()
    assert "Person" in detector.labels and "Dog" in detector.labels and len(detector.labels) == 24
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (120, 90, 3), dtype=np.uint8), np.zeros((50, 60, 3), np.uint8)]
    batch = detector(images).probabilities
    assert batch.shape == (2, 24) and np.all((batch >= 0) & (batch <= 1))
    alone = detector(images[1:]).probabilities
    np.testing.assert_allclose(batch[1:], alone, atol=1e-5)
    assert detector([]).probabilities.shape == (0, 24)


def test_damaged_detector_is_one_clear_error(tmp_path):
    folder = tmp_path / "detector"
    shutil.copytree(bundled_detector_dir(), folder)
    onnx_file = folder / "detector.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="checksum"):
        ObjectDetector.from_pretrained(folder)
    (folder / "detector.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        ObjectDetector.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="no detector"):
        ObjectDetector.from_pretrained(tmp_path / "missing")


def test_the_bundled_description_names_its_provenance():
    meta = json.loads((bundled_detector_dir() / "detector.json").read_text())
    assert meta["licence"] == "Apache-2.0" and "@mediapipe/objectron" in meta["source"]
    assert set(LABEL_WORDS) == set(meta["labels"]) - {"???"}


def test_one_reading_of_person_and_dog_words():
    assert LABEL_WORDS["Person"] is PERSON_WORDS and LABEL_WORDS["Dog"] is DOG_WORDS
    assert display_name("Person") == "person" and display_name("Footwear") == "shoe"


def test_gate_penalises_only_below_its_threshold():
    itos = ["<pad>", "a", "man", "dog", "cat", "is"]
    gate = DetectionGate({"Person": 0.3, "Dog": 0.2}, strength=4.0, max_penalty=10.0)
    gated = gate.gated_ids(itos)
    assert gated["Person"].tolist() == [2] and gated["Dog"].tolist() == [3]
    probs = np.array([[0, 0.9, 0.9, 0, 0], [0, 0.05, 0.5, 0, 0], [0, 0.0, 0.0, 0, 0]], np.float32)
    bias = gate.bias(DetectorOutput(LABELS, probs), gated, len(itos))
    assert np.all(bias[0] == 0)  # both seen: nothing changes
    assert bias[1, 2] == pytest.approx(4.0 * np.log(0.06 / 0.31), rel=1e-5)
    assert bias[1, 3] == 0 and bias[1, 4] == 0  # dog seen; cat not gated
    assert bias[2, 2] == pytest.approx(-10.0)  # 4 * log(0.01 / 0.31) = -13.7, capped
    assert bias[2, [0, 1, 5]].tolist() == [0, 0, 0]  # other words never
    assert gate.names_gated_word([1, 2, 5], gated) and not gate.names_gated_word([1, 4], gated)


@pytest.mark.parametrize(
    "thresholds, strength",
    [({"Unicorn": 0.2}, 1.0), ({"Person": 1.5}, 1.0), ({"Person": 0.2}, -1.0)],
)
def test_gate_rejects_nonsense(thresholds, strength):
    with pytest.raises(ValueError):
        DetectionGate(thresholds, strength)


def test_grounding_config_builds_the_gate_from_its_fields():
    config = GroundingConfig.from_json(
        {"person_threshold": 0.25, "dog_threshold": 0.2, "gate_strength": 6}
    )
    gate = config.detection_gate()
    assert gate.active and gate.thresholds == {"Person": 0.25, "Dog": 0.2}
    assert not GroundingConfig().detection_gate().active  # older groundings: no gate
    with pytest.raises(ValueError):
        GroundingConfig.from_json({"person_threshold": 2.0, "gate_strength": 1})


def test_dev_thresholds_are_quantiles_of_the_photos_that_show_the_class():
    p = np.linspace(0, 1, 101)
    shows = p > 0.5  # only the upper half shows a person
    out = dev_thresholds({"Person": p, "Dog": p}, {"Person": shows, "Dog": np.zeros(101)}, 0.1)
    assert out["Person"] == pytest.approx(np.quantile(p[shows], 0.1), abs=1e-4)
    assert "Dog" not in out  # no dev photo shows one: no gate
    few = dev_thresholds({"Cat": p}, {"Cat": p > 0.9}, 0.1)  # 10 photos: too few to trust
    assert few == {}


def test_detector_concepts_and_merging():
    probs = np.array([[0.9, 0.74, 0.1, 0.6, 0.0]], np.float32)
    (seen,) = detector_concepts(DetectorOutput(LABELS, probs), min_prob=0.5)
    assert seen == [("person", 0.74), ("cat", 0.6)]  # background never listed
    merged = merged_concepts([("cat", 0.95), ("mat", 0.1)], seen)
    assert merged == [("cat", 0.95), ("person", 0.74), ("mat", 0.1)]


@pytest.mark.parametrize(
    "tokens, noun",
    [
        ("a white fish is in the water", "fish"),
        ("two shoes are on a table", "shoe"),
        ("a is is on a blue in the bubble", None),
        ("a white and a red white is in the flowers", None),
        ("a building is standing", "building"),
        ("two black and white dogs are running", "dog"),
        ("a smiling and a camera are standing", None),
        ("a man and a dog are running", "man"),
    ],
)
def test_leading_noun(tokens, noun):
    assert leading_noun(tokens.split(), OBJECT_WORDS) == noun


def test_short_description_prefers_a_supported_decoder_noun_else_the_top_concept():
    concepts = [("bubble", 0.2), ("cat", 0.6)]
    backed = short_description(
        "a cat is in the blue".split(), concepts, OBJECT_WORDS, {"cat": 0.9}.get
    )
    assert backed == ["a", "cat"]
    unbacked = short_description(
        "a dog is in the blue".split(), [("eagle", 0.6)], OBJECT_WORDS, lambda w: 0.0
    )
    assert unbacked == ["an", "eagle"]  # the decoder's "dog" has no support: the concept wins
    assert short_description("a is is".split(), [], OBJECT_WORDS, lambda w: 0.0) is None
    weak = [("table", 0.2, 3), ("floor", 0.3, 9)]
    chosen = short_description("a is is".split(), [], OBJECT_WORDS, lambda w: 0.0, set(), weak)
    assert chosen == ["a", "floor"]  # no concept listed: the best-supported word


class CountingDetector:
    labels = LABELS

    def __init__(self, person: float):
        self.person, self.calls = person, 0

    def __call__(self, images):
        self.calls += len(images)
        probs = np.zeros((len(images), len(LABELS)), np.float32)
        probs[:, 1] = self.person
        return DetectorOutput(LABELS, probs)


def make_second_look(person: float, short: bool = True):
    itos = ["<pad>", "<start>", "<end>", "<unk>", "a", "man", "dog", "is", "in", "water", "bird"]
    itos += ["with"]
    config = GroundingConfig(person_threshold=0.3, gate_strength=6.0, short_out_of_domain=short)
    grounder = SimpleNamespace(
        config=config,
        support=lambda logits, itos: [{"bird": 0.5, "water": 0.0} for _ in range(len(logits))],
        word_ids=np.array([itos.index("bird"), itos.index("water")]),
        lexicon=np.array([[1, 0], [1, 0], [0, 1]], np.float32),  # (classes, words)
    )
    look = SecondLook(grounder, itos)
    look._detector = CountingDetector(person)
    look._object_words = {"man", "dog", "water", "bird"}
    return look, itos


def decoded_as(itos, *captions):
    return [SimpleNamespace(token_ids=[itos.index(w) for w in c.split()]) for c in captions]


def photos(*flags, concepts=()):
    """One ImageGrounding-like record per out-of-domain flag."""
    return [SimpleNamespace(out_of_domain=flag, concepts=list(concepts)) for flag in flags]


def run(look, itos, decoded, described, decode, **options):
    """SecondLook on n photos with zero logits, thumbnails, bias and grids."""
    n = len(decoded)
    return look(
        decoded,
        described,
        np.zeros((n, 1000)),
        np.zeros((n, 8, 8, 3), np.uint8),
        torch.zeros(n, len(itos)),
        torch.zeros(n, 4, 3),
        decode,
        **options,
    )


def test_second_look_redecodes_only_doubted_captions():
    look, itos = make_second_look(person=0.05)
    decoded = decoded_as(itos, "a man is in water", "a dog is in water")
    seen_bias = []

    def decode(features, bias):
        seen_bias.append(bias)
        return decoded_as(itos, "a bird is in water")

    out, short = run(look, itos, decoded, photos(False, False), decode)
    assert look.detector.calls == 1  # the dog caption names no gated word: never looked at
    assert len(seen_bias) == 1 and seen_bias[0][0, itos.index("man")] < -5
    assert [itos[t] for t in out[0].token_ids] == "a bird is in water".split()
    assert out[1] is decoded[1] and short == [None, None]


def test_second_look_uses_detections_computed_beside_decoding():
    look, itos = make_second_look(person=0.9)
    decoded = decoded_as(itos, "a man is in water")
    doubted = np.zeros((1, len(LABELS)), np.float32)  # the detector saw no person after all
    again = decoded_as(itos, "a bird is in water")
    for detections in (doubted, lambda: doubted):  # an array, or a callable that waits
        out, _ = run(look, itos, decoded, photos(False), lambda f, b: again, detections=detections)
        assert out[0] is again[0]
    assert look.detector.calls == 0  # never run again here


def test_second_look_keeps_a_caption_the_detector_supports():
    look, itos = make_second_look(person=0.9)
    decoded = decoded_as(itos, "a man is in water")

    def decode(features, bias):
        raise AssertionError("a supported caption is not decoded again")

    out, _ = run(look, itos, decoded, photos(False), decode)
    assert out[0] is decoded[0]


def test_second_look_describes_out_of_domain_photos_briefly():
    look, itos = make_second_look(person=0.9)
    decoded = decoded_as(itos, "a bird is in water")
    described = photos(True, concepts=[("parrot", 0.4)])
    _, short = run(look, itos, decoded, described, lambda f, b: decoded)
    # the decoder's own noun, backed by the concepts; the detector's classes join the concepts
    assert short == [["a", "bird"]] and described[0].concepts[0] == ("person", 0.9)
    salad = decoded_as(itos, "a is in water")
    described = photos(True, concepts=[("parrot", 0.4)])
    _, short = run(look, itos, salad, described, lambda f, b: salad)
    assert short == [["a", "person"]]  # no noun to keep: the sure detector class names it
    look_off, _ = make_second_look(person=0.9, short=False)
    _, short = run(look_off, itos, decoded, photos(True), lambda f, b: decoded)
    assert short == [None]


def test_second_look_keeps_the_caption_when_the_gate_leaves_no_subject():
    look, itos = make_second_look(person=0.05)
    decoded = decoded_as(itos, "a man is in water")
    salad = decoded_as(itos, "a is in water")  # word salad without "man"
    out, _ = run(look, itos, decoded, photos(False), lambda f, b: salad)
    assert out[0] is decoded[0]


def test_second_look_describes_a_caption_without_a_subject_briefly_in_domain_too():
    look, itos = make_second_look(person=0.9)
    described = photos(False, concepts=[("parrot", 0.7)])
    salad = decoded_as(itos, "a is in water")
    _, short = run(look, itos, salad, described, lambda f, b: salad)
    assert short == [["a", "person"]]  # the sure detector class beats the parrot's 0.7
    fine = decoded_as(itos, "a bird is in water")
    _, short = run(look, itos, fine, described, lambda f, b: fine)
    assert short == [None]


def test_short_description_hedges_to_a_word_more_likely_right_than_wrong():
    unsure = [("daisy", 0.3), ("bee", 0.1)]
    hedges = [("flower", 0.6, 5), ("plant", 0.8, 40), ("daisy", 0.3, 1)]
    chosen = short_description(["a", "is"], unsure, OBJECT_WORDS, lambda w: 0.0, set(), hedges)
    assert chosen == ["a", "flower"]  # the most specific word at >= 0.5
    sure = [("daisy", 0.7)]
    assert short_description([], sure, OBJECT_WORDS, lambda w: 0.0, set(), hedges) == ["a", "daisy"]
    nothing_likely = [("flower", 0.4, 5)]
    assert short_description([], unsure, OBJECT_WORDS, lambda w: 0.0, set(), nothing_likely) == [
        "a",
        "daisy",
    ]


def test_short_description_prefers_everyday_words():
    concepts = [("watercraft", 0.3), ("boat", 0.2), ("roundworm", 0.5)]
    chosen = short_description(["a"], concepts, OBJECT_WORDS, lambda w: 0.0, {"boat"})
    assert chosen == ["a", "roundworm"]  # 0.5 / 2 = 0.25 still beats the everyday 0.2
    chosen = short_description(["a"], concepts[:2], OBJECT_WORDS, lambda w: 0.0, {"boat"})
    assert chosen == ["a", "boat"]  # 0.2 beats 0.3 / 2
    chosen = short_description(["a"], concepts[:2], OBJECT_WORDS, lambda w: 0.0, set())
    assert chosen == ["a", "watercraft"]  # no vocabulary given: the top concept


def test_group_nouns_need_one_of_the_gated_classes():
    itos = ["a", "group", "of", "man", "dog"]
    gate = DetectionGate({"Person": 0.3, "Dog": 0.3}, strength=4.0)
    gated = gate.gated_ids(itos)
    probs = np.array([[0, 0.05, 0.9, 0, 0], [0, 0.05, 0.1, 0, 0]], np.float32)
    bias = gate.bias(DetectorOutput(LABELS, probs), gated, len(itos))
    assert bias[0, 1] == 0 and bias[0, 3] < 0  # a group of dogs may be said, a man not
    assert bias[1, 1] == pytest.approx(bias[1, 4]) and bias[1, 4] < 0  # neither: the milder
    assert gate.names_gated_word([0, 1, 2], gated)


def test_the_bundled_model_says_less_on_a_photo_unlike_its_training_photos():
    """End to end, the bundled model and detector: noise is out of domain, so the caption is a
    short description, the decoder's sentence kept as the first alternative, and every output
    form says so."""
    from captioner.api import Captioner
    from captioner.web.schemas import to_response

    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    (result,) = Captioner.from_pretrained().caption(noise)
    assert result.out_of_domain and result.short
    assert result.tokens[0] in ("a", "an") and len(result.tokens) == 2
    assert result.alternatives[0][0] != result.caption  # the sentence it replaced
    assert result.attention.shape[0] == 2  # one (uniform) map per word
    assert result.to_dict()["short"] is True
    assert to_response(result, attention=False).short is True


def test_grounding_with_non_finite_weights_is_refused(tmp_path):
    """NaN grounding weights once gave the caption "" scored -inf (invalid JSON): one clear
    error at load instead."""
    from safetensors.numpy import load_file, save_file

    from captioner.api import bundled_model_dir
    from captioner.grounding.grounder import GROUNDING_CONFIG, GROUNDING_WEIGHTS, Grounder

    folder = tmp_path / "grounded"
    folder.mkdir()
    shutil.copy(bundled_model_dir() / GROUNDING_CONFIG, folder / GROUNDING_CONFIG)
    tensors = load_file(str(bundled_model_dir() / GROUNDING_WEIGHTS))
    tensors["base_rate"] = tensors["base_rate"].copy()
    tensors["base_rate"][3] = np.nan
    save_file(tensors, str(folder / GROUNDING_WEIGHTS))
    with pytest.raises(CheckpointError, match="non-finite values in base_rate"):
        Grounder.from_pretrained(folder)
