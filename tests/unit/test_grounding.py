"""Grounding: word bias in decoding, the domain scorer, the class-to-word table, the grounder's
save/load contract, the encoder's concept output, and a grounded Captioner end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.decoding import beam_search, greedy_decode
from captioner.grounding.domain import DomainScorer, pooled
from captioner.grounding.grounder import Grounder, GroundingConfig
from captioner.grounding.word_model import (
    ConceptWordTable,
    FeatureWordDetector,
    roc_auc,
    softmax,
)


class TableStepper:
    """A stepper whose logits depend only on the last token: a fixed (V, V) table."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def start(self, features):
        B = features.size(0)
        return (features,), (torch.zeros(B, 1),)

    def step(self, tokens, state, memory):
        return self.table[tokens], state, torch.full((tokens.numel(), 4), 0.25)


def _stepper(V: int = 8, seed: int = 0) -> TableStepper:
    g = torch.Generator().manual_seed(seed)
    return TableStepper(torch.randn(V, V, generator=g) * 2)


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_zero_word_bias_changes_nothing(decode):
    stepper, feats = _stepper(), torch.zeros(3, 4, 2)
    run = greedy_decode if decode == "greedy" else beam_search
    plain = run(stepper, feats, max_length=6)
    biased = run(stepper, feats, max_length=6, word_bias=torch.zeros(3, 8))
    assert [r.token_ids for r in plain] == [r.token_ids for r in biased]
    assert [r.score for r in plain] == pytest.approx([r.score for r in biased])


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_word_bias_is_per_image(decode):
    """A large bias on word 5 for image 1 only makes image 1's caption start with it."""
    stepper, feats = _stepper(), torch.zeros(3, 4, 2)
    bias = torch.zeros(3, 8)
    bias[1, 5] = 50.0
    run = greedy_decode if decode == "greedy" else beam_search
    plain = run(stepper, feats, max_length=4)
    biased = run(stepper, feats, max_length=4, word_bias=bias)
    assert biased[1].token_ids[0] == 5
    assert biased[0].token_ids == plain[0].token_ids
    assert biased[2].token_ids == plain[2].token_ids


def test_word_bias_shape_is_checked():
    with pytest.raises(ValueError, match="word_bias"):
        beam_search(_stepper(), torch.zeros(2, 4, 2), word_bias=torch.zeros(3, 8))


def test_domain_scorer_calibrates_held_out_and_flags_far_points():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 32))
    train = rng.normal(size=(400, 8)) @ basis + 0.05 * rng.normal(size=(400, 32))
    dev = rng.normal(size=(300, 8)) @ basis + 0.05 * rng.normal(size=(300, 32))
    scorer = DomainScorer.fit(train, dev, components=8)
    dev_scores = scorer.score(dev)
    assert 0.4 < dev_scores.mean() < 0.6  # a held-out photo's score is uniform in [0, 1]
    far = rng.normal(size=(5, 32)) * 3  # off the training subspace
    assert (scorer.score(far) < 0.01).all()
    assert not scorer.in_domain(scorer.score(far)).any()
    again = DomainScorer.from_tensors(scorer.tensors(), scorer.residual_variance, 0.01)
    np.testing.assert_allclose(again.distance(dev[:20]), scorer.distance(dev[:20]), rtol=1e-4)
    # a rank may move by one where float32 summation order differs
    np.testing.assert_allclose(again.score(dev[:20]), dev_scores[:20], atol=2 / 300)


def test_domain_scorer_needs_more_rows_than_components():
    with pytest.raises(ValueError, match="training rows"):
        DomainScorer.fit(np.zeros((10, 4)), np.zeros((3, 4)), components=16)


def test_pooled_features_are_unit_length():
    grid = np.random.default_rng(1).normal(size=(3, 49, 16)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(pooled(grid), axis=1), 1.0, rtol=1e-5)


def test_concept_word_table_learns_class_word_rates():
    """Photos of class 0 always say word 0, photos of class 1 never do."""
    logits = np.full((200, 3), -20.0)
    logits[:100, 0] = 20.0
    logits[100:, 1] = 20.0
    targets = np.zeros((200, 1))
    targets[:100] = 1.0
    table = ConceptWordTable.fit(logits, targets, temperature=1.0, prior=1.0)
    p = table.predict(np.array([[20.0, -20, -20], [-20, 20.0, -20], [-20, -20, 20.0]]))
    assert p[0, 0] > 0.98 and p[1, 0] < 0.02
    assert p[2, 0] == pytest.approx(0.5, abs=1e-3)  # a class never seen: the base rate


def test_feature_word_detector_learns_a_word_from_the_features():
    """A word used exactly when feature 0 is high; the standardisation is folded into the
    weights, so raw features go in."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(400, 8)) * 3 + 5  # not standardised
    targets = (features[:, [0]] > 5).astype(np.float32)  # (400, 1)
    targets = np.concatenate([targets, np.full((400, 1), 0.2, np.float32)], 1)  # + a constant
    detector = FeatureWordDetector.fit(features, targets, l2=0.01)
    held = rng.normal(size=(200, 8)) * 3 + 5
    p = detector.predict(held)  # (200, 2)
    assert p.shape == (200, 2) and p.dtype == np.float32
    assert roc_auc(p[:, :1], held[:, [0]] > 5)[0] > 0.97
    assert np.allclose(p[:, 1], 0.2, atol=0.05)  # a word the features say nothing about
    low = FeatureWordDetector.fit(features, targets, l2=0.01, rank=1)  # one direction: feature 0
    assert low.projection.shape == (1, 8) and low.weight.shape == (2, 1)
    assert roc_auc(low.predict(held)[:, :1], held[:, [0]] > 5)[0] > 0.97
    with pytest.raises(ValueError, match="l2"):
        FeatureWordDetector.fit(features, targets, l2=0.0)
    with pytest.raises(ValueError, match="fit together"):
        FeatureWordDetector(np.zeros((2, 8)), np.zeros((3, 4)), np.zeros(3))


def test_detector_blends_into_the_in_domain_evidence_and_survives_save_load(tmp_path):
    grounder = _grounder()
    features = np.random.default_rng(4).normal(size=(3, 16)).astype(np.float32)
    logits = np.random.default_rng(2).normal(size=(3, 1000)) * 3
    scores = np.array([0.0, 0.5, 1.0])
    plain = grounder.word_bias(logits, scores, features=features).numpy()
    projection = np.eye(3, 16, dtype=np.float32)  # rank 3: features 0, 1, 2
    weight = np.zeros((2, 3), np.float32)
    weight[1, 0] = 4.0  # "dog" follows feature 0
    grounder.detector = FeatureWordDetector(projection, weight, np.array([0.0, -1.0], np.float32))
    grounder.config.detector_weight = 0.5
    table = grounder.table.predict(logits)
    found = grounder.detector.predict(features)
    np.testing.assert_allclose(
        grounder.learnt(logits, features), 0.5 * table + 0.5 * found, rtol=1e-6
    )
    blended = grounder.word_bias(logits, scores, features=features).numpy()
    inside = grounder.domain.in_domain(scores)
    assert not np.allclose(blended[inside], plain[inside])  # in domain the detector counts
    np.testing.assert_array_equal(blended[~inside], plain[~inside])  # out of domain it does not
    with pytest.raises(ValueError, match="pooled features"):
        grounder.word_bias(logits, scores)
    grounder.save_pretrained(tmp_path)
    loaded = Grounder.from_pretrained(tmp_path)
    assert loaded.config.detector_weight == 0.5
    np.testing.assert_allclose(
        loaded.word_bias(logits, scores, features=features).numpy(), blended, atol=1e-3
    )


def test_roc_auc_matches_hand_counts():
    scores = np.array([[0.1], [0.4], [0.35], [0.8]])
    labels = np.array([[0], [0], [1], [1]])
    assert roc_auc(scores, labels)[0] == pytest.approx(0.75)
    assert np.isnan(roc_auc(scores, np.zeros((4, 1))))[0]


def _grounder(vocab_size: int = 10) -> Grounder:
    """Words 4 ("cat") and 5 ("dog"): class 0 is a cat, class 1 a dog."""
    rng = np.random.default_rng(0)
    table = np.full((1000, 2), 0.3, dtype=np.float32)
    table[0] = [0.9, 0.01]
    table[1] = [0.01, 0.9]
    lexicon = np.zeros((1000, 2), dtype=np.float32)
    lexicon[0, 0] = lexicon[1, 1] = 1.0
    train = rng.normal(size=(200, 16))
    domain = DomainScorer.fit(train, rng.normal(size=(50, 16)), components=4)
    return Grounder(
        GroundingConfig(strength=1.0, ood_strength=2.0, temperature=1.0),
        np.array([4, 5]),
        ConceptWordTable(table, 1.0),
        lexicon,
        np.array([0.1, 0.3], dtype=np.float32),
        domain,
        vocab_size,
    )


def test_word_bias_favours_seen_and_disfavours_contradicted_words():
    grounder = _grounder()
    logits = np.full((1, 1000), -10.0)
    logits[0, 0] = 10.0  # a cat
    for in_domain in (1.0, 0.0):
        bias = grounder.word_bias(logits, np.array([in_domain]))
        assert bias.shape == (1, 10)
        assert bias[0, 4] > 0 > bias[0, 5]
        assert (bias[0, [0, 1, 2, 3, 6, 7, 8, 9]] == 0).all()  # other words untouched
    # out of domain, the stronger ood_strength applies
    inside = grounder.word_bias(logits, np.array([1.0]))
    outside = grounder.word_bias(logits, np.array([0.0]))
    assert abs(outside[0, 5]) > abs(inside[0, 5])
    fixed = grounder.word_bias(logits, np.array([0.0]), strength=0.0)
    assert (fixed == 0).all()


def test_grounder_save_load_round_trip(tmp_path):
    grounder = _grounder()
    grounder.save_pretrained(tmp_path)
    loaded = Grounder.from_pretrained(tmp_path)
    logits = np.random.default_rng(2).normal(size=(3, 1000)) * 3
    scores = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(
        loaded.word_bias(logits, scores).numpy(),
        grounder.word_bias(logits, scores).numpy(),
        atol=1e-3,  # the table is stored in fp16
    )
    assert loaded.config.ood_strength == grounder.config.ood_strength
    assert Grounder.from_pretrained(tmp_path / "nothing-here") is None


def test_damaged_grounding_files_are_a_clear_error(tmp_path):
    from captioner.errors import CheckpointError

    _grounder().save_pretrained(tmp_path)
    (tmp_path / "grounding.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="grounding"):
        Grounder.from_pretrained(tmp_path)


def test_encoder_concepts_output_matches_the_head_on_its_grid():
    from captioner.features.encoders import concept_head, get_spec, preprocess
    from captioner.features.onnx import FeatureExtractor

    spec = get_spec("efficientnet-lite0")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8) for _ in range(2)]
    batch = preprocess(images, spec)
    extractor = FeatureExtractor(spec.name, backend="onnx", threads=1)
    grid, logits = extractor.with_concepts(batch)
    assert grid.shape == (2, spec.num_pixels, spec.channels) and logits.shape == (2, 1000)
    np.testing.assert_allclose(extractor(batch), grid, atol=1e-5)
    with torch.inference_mode():
        head = concept_head(spec.name)(torch.from_numpy(grid)).numpy()
    np.testing.assert_allclose(logits, head, atol=1e-3)
    assert np.allclose(softmax(logits).sum(axis=1), 1.0, atol=1e-5)


def test_grounded_captioner_end_to_end(shapes_prepared, tiny_model_dir, tmp_path):
    """fit_grounding on the shapes data, saved beside a model, loaded by from_pretrained:
    captions come with concepts and an in-domain score, and strength 0 equals no grounding."""
    import shutil

    from captioner.api import Captioner
    from captioner.grounding.fit import fit_grounding

    model_dir = tmp_path / "grounded"
    shutil.copytree(tiny_model_dir, model_dir)
    plain = Captioner.from_pretrained(model_dir, backend="torch")
    grounder, report = fit_grounding(
        plain.vocab, shapes_prepared, plain.spec.name, GroundingConfig(), log=lambda *_: None
    )
    assert report["train_images"] == len(shapes_prepared.splits.train)
    grounder.save_pretrained(model_dir, extra={"fit": report})
    grounded = Captioner.from_pretrained(model_dir, backend="torch")
    assert grounded.grounder is not None
    images = [shapes_prepared.images_dir / n for n in shapes_prepared.splits.test[:3]]
    results = grounded.caption(images, beam_size=2, max_length=6)
    for r in results:
        assert r.in_domain is not None and 0.0 <= r.in_domain <= 1.0
        assert isinstance(r.out_of_domain, bool)
        assert all(isinstance(w, str) and 0 <= p <= 1 for w, p in r.concepts)
    batched = list(grounded.caption_batches([images[:1], images[1:]], beam_size=2, max_length=6))
    alone = grounded.caption(images[:1], beam_size=2, max_length=6) + grounded.caption(
        images[1:], beam_size=2, max_length=6
    )
    assert [(r.caption, r.concepts, r.in_domain) for b in batched for r in b] == [
        (r.caption, r.concepts, r.in_domain) for r in alone
    ]  # the logits travel with the grids through the pipeline
    off = grounded.caption(images, beam_size=2, max_length=6, grounding_strength=0.0)
    base = plain.caption(images, beam_size=2, max_length=6)
    assert [r.caption for r in off] == [r.caption for r in base]
    assert base[0].in_domain is None and base[0].concepts == []


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_positive_bias_is_spent_once_emitted(decode):
    """A bonus large enough to win every step names its word once, not at every step."""
    stepper, feats = _stepper(), torch.zeros(2, 4, 2)
    stepper.table[:, 2] = -30.0  # never <end>: every caption runs to max_length
    stepper.table[[5, 6], 5] = stepper.table[[5, 6], 6] = -20.0  # unlikely after themselves
    bias = torch.zeros(2, 8)
    bias[:, 5] = 50.0
    run = greedy_decode if decode == "greedy" else beam_search
    out = run(stepper, feats, max_length=6, word_bias=bias)
    for r in out:
        assert r.token_ids[0] == 5
        assert r.token_ids[1] != 5  # spent: a bias kept at +50 would repeat it
    groups = torch.arange(8)
    groups[6] = 5  # token 6 is token 5's plural: one bonus for both
    bias[:, 6] = 50.0
    out = run(stepper, feats, max_length=3, word_bias=bias, bias_groups=groups)
    for r in out:
        assert r.token_ids[0] in (5, 6) and r.token_ids[1] not in (5, 6)


def test_negative_bias_is_never_spent():
    stepper, feats = _stepper(), torch.zeros(1, 4, 2)
    plain = greedy_decode(stepper, feats, max_length=6)[0].token_ids
    banned = plain[0]
    bias = torch.zeros(1, 8)
    bias[0, banned] = -100.0
    out = greedy_decode(stepper, feats, max_length=6, word_bias=bias)[0].token_ids
    assert banned not in out


def test_word_groups_join_plurals():
    from captioner.grounding.grounder import word_groups

    words = ["<pad>", "cat", "cats", "puppy", "puppies", "grass"]
    groups = word_groups(words).tolist()
    assert groups[1] == groups[2] and groups[3] == groups[4]
    assert len({groups[1], groups[3], groups[5]}) == 3


def test_object_words_come_from_wordnet_lexicographer_files():
    from captioner.features.concepts import is_object_word, load_object_words

    objects = load_object_words()
    for word in ("man", "dogs", "water", "beach", "shirt"):
        assert is_object_word(word, objects), word
    for word in ("is", "standing", "black", "running", "the"):
        assert not is_object_word(word, objects), word


def test_object_word_list_errors_are_clear(tmp_path):
    from captioner.errors import ConfigError
    from captioner.features.concepts import load_object_words

    bad = tmp_path / "objects.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object word list"):
        load_object_words(bad)


def test_out_of_domain_penalises_unnamed_object_words_only():
    """Out of domain, a word the concepts do not name at all gets log(eps) (times the
    strength); in domain, a word outside the in-domain set gets nothing."""
    grounder = _grounder()
    grounder.in_domain_words = np.array([True, False])  # "dog" is biased out of domain only
    logits = np.full((1, 1000), -10.0)
    logits[0, 0] = 10.0  # a cat
    inside = grounder.log_ratios(logits, np.array([1.0]))
    outside = grounder.log_ratios(logits, np.array([0.0]))
    assert inside[0, 1] == 0.0
    assert outside[0, 1] == pytest.approx(np.log(grounder.config.epsilon), abs=1e-3)
    assert outside[0, 0] > 0  # the cat is named: its bonus outweighs its small penalty


def test_predict_says_plainly_when_a_photo_is_out_of_domain():
    from captioner.api import CaptionResult
    from captioner.cli.inference_commands import grounding_lines

    plain = CaptionResult("a dog", ["a", "dog"], -0.5, None)
    assert grounding_lines(plain) == []
    odd = CaptionResult(
        "a cat",
        ["a", "cat"],
        -0.5,
        None,
        concepts=[("cat", 0.95)],
        in_domain=0.0,
        out_of_domain=True,
    )
    lines = grounding_lines(odd)
    assert lines[0] == "concepts:   cat 0.95" and "out of domain" in lines[-1]
    usual = CaptionResult("a dog", ["a", "dog"], -0.5, None, concepts=[], in_domain=0.4)
    assert not any("warning" in line for line in grounding_lines(usual))


def test_ground_command_fits_and_saves_beside_a_copy(shapes_prepared, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from captioner.cli.main import app

    out = tmp_path / "grounded"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "ground",
            str(tiny_model_dir),
            "--work-dir",
            str(shapes_prepared.work_dir),
            "--out",
            str(out),
            "--no-tune",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "grounding.json").is_file() and (out / "model.safetensors").is_file()
    assert not (tiny_model_dir / "grounding.json").exists()  # the source is left alone
    grounded = Grounder.from_pretrained(out)
    assert grounded.config.strength == 0.5
    # the detector ran over the dev photos; synthetic shapes show no person, dog or cat on
    # enough of them to calibrate a threshold, so the gate stays off rather than guessing
    gate = json.loads((out / "grounding.json").read_text())["extra"]["fit"]["detector_gate"]
    assert gate["dev_images"] == len(shapes_prepared.splits.val) and gate["thresholds"] == {}
    assert not grounded.config.detection_gate().active
    bad = runner.invoke(app, ["ground", str(tiny_model_dir), "--strengths", "x,1"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_evaluate_reports_grounding_and_can_turn_it_off(shapes_prepared, tiny_model_dir, tmp_path):
    import shutil

    from captioner.api import Captioner
    from captioner.evaluation.evaluate import evaluate
    from captioner.grounding.fit import fit_grounding

    model_dir = tmp_path / "grounded"
    shutil.copytree(tiny_model_dir, model_dir)
    plain = Captioner.from_pretrained(model_dir, backend="torch")
    grounder, _ = fit_grounding(
        plain.vocab, shapes_prepared, plain.spec.name, GroundingConfig(), log=lambda *_: None
    )
    grounder.save_pretrained(model_dir)
    common = dict(split="test", beam_size=2, max_length=6, use_java=False, progress=False)
    on = evaluate(model_dir, shapes_prepared.work_dir, out_dir=tmp_path / "on", **common)
    off = evaluate(
        model_dir, shapes_prepared.work_dir, out_dir=tmp_path / "off", grounding=False, **common
    )
    assert on["grounding"] == {"strength": 0.5, "ood_strength": 5.0}
    assert off["grounding"] is None
