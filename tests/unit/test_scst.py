"""Self-critical training: the CIDEr-D reward equals pycocoevalcap's, sampled log-probs are the
model's, the update raises the reward it is given, and a run resumes and refuses like `train`."""

from __future__ import annotations

import csv
import math
import random
import shutil

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from safetensors.torch import load_file

from captioner.data.synthetic import make_shapes_dataset
from captioner.data.vocab import SPECIAL_TOKENS, Vocabulary
from captioner.decoding.steps import banned_ids, masked_log_probs
from captioner.errors import ConfigError
from captioner.model.captioning_model import CaptioningModel
from captioner.model.config import DecoderConfig
from captioner.model.decoder import ShowAttendTellDecoder
from captioner.training.batching import build_samples
from captioner.training.bleu_reward import SentenceBleu
from captioner.training.caption_reward import CaptionReward
from captioner.training.checkpoint import list_checkpoints
from captioner.training.cider_reward import CiderD
from captioner.training.config import ScstConfig, TrainConfig
from captioner.training.loop import train
from captioner.training.scst import (
    reference_corpus,
    sample_captions,
    scst_lr,
    scst_step,
    self_critical_loss,
    train_scst,
)

WORDS = "a dog cat man runs sits on the grass snow red blue ball with".split()
VOCAB = [*SPECIAL_TOKENS, *WORDS]


def _tiny_decoder(
    vocab_size: int, feature_dim: int = 16, dropout: float = 0.0, num_pixels: int = 4
):
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=vocab_size,
        feature_dim=feature_dim,
        num_pixels=num_pixels,
        embed_dim=16,
        hidden_dim=24,
        attention_dim=16,
        context_dim=16,
        dropout=dropout,
    )
    return ShowAttendTellDecoder(config)


def test_cider_reward_equals_pycocoevalcap_on_the_same_corpus():
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))  # noqa: E731
    refs = {f"img{i}": [sentence() for _ in range(5)] for i in range(15)}
    hyps = {k: [sentence()] for k in refs}
    hyps["img0"] = [refs["img0"][2]]  # an exact match, and an empty caption
    hyps["img1"] = [""]
    corpus_score, per_image = Cider().compute_score(refs, hyps)
    cider = CiderD([[r.split() for r in refs[k]] for k in refs])
    ours = cider.scores([hyps[k][0].split() for k in refs], range(len(refs)))
    assert ours == pytest.approx(list(per_image), abs=1e-12)
    assert sum(ours) / len(ours) == pytest.approx(corpus_score, abs=1e-12)
    assert ours[0] > 1.0 and ours[1] == 0.0


def test_sentence_bleu1_equals_pycocoevalcap_per_caption(capsys):
    rng = random.Random(1)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))  # noqa: E731
    refs = {f"img{i}": [sentence() for _ in range(5)] for i in range(12)}
    hyps = {k: [sentence()] for k in refs}
    hyps["img0"] = ["a"]  # far shorter than every reference: brevity penalty
    _, per_caption = Bleu(1).compute_score(refs, hyps, verbose=0)
    capsys.readouterr()  # Bleu prints its length ratio
    bleu = SentenceBleu([[r.split() for r in refs[k]] for k in refs], order=1)
    ours = bleu.scores([hyps[k][0].split() for k in refs], range(len(refs)))
    assert ours == pytest.approx(list(per_caption[0]), abs=1e-6)
    assert 0 < ours[0] < 0.2


def test_sentence_bleu2_clips_smooths_and_penalises_brevity():
    bleu = SentenceBleu([[["a", "dog", "runs", "on", "the", "snow"]]], order=2)
    assert bleu.score(["a", "dog", "runs", "on", "the", "snow"], 0) == pytest.approx(1.0)
    # "the the the": unigrams clipped to 1/3, bigrams (0 + 1) / (2 + 1), brevity exp(1 - 6/3)
    expected = math.exp(1 - 6 / 3) * math.sqrt((1 / 3) * (1 / 3))
    assert bleu.score(["the", "the", "the"], 0) == pytest.approx(expected)
    assert bleu.score(["cat"], 0) == 0.0 and bleu.score([], 0) == 0.0
    with pytest.raises(ValueError, match="order"):
        SentenceBleu([[["a"]]], order=5)


def test_self_critical_loss_pushes_up_samples_that_beat_their_siblings():
    log_probs = torch.zeros(6, requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]])
    loss = self_critical_loss(log_probs, torch.full((6,), 2.0), rewards)
    loss.backward()
    grad = log_probs.grad
    # gradient descent raises log p where the gradient is negative
    assert grad[0] < 0 and grad[1] > 0
    assert grad[3:].abs().max() < 1e-7, "equal rewards carry no signal"
    advantages = torch.tensor([1 - 0.25, 0 - 0.75, 0.5 - 0.5])
    assert grad[:3] == pytest.approx((-advantages / 12).tolist())


def test_sampled_log_probs_are_the_models_own():
    vocab = Vocabulary(VOCAB)
    decoder = _tiny_decoder(len(vocab)).eval()
    features = torch.randn(2, 4, 16)
    banned = torch.tensor(banned_ids(vocab.pad_id, vocab.start_id, vocab.unk_id, True))
    generator = torch.Generator().manual_seed(1)
    out = sample_captions(
        decoder,
        features,
        3,
        7,
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        banned=banned,
        generator=generator,
    )
    assert len(out.token_ids) == 6 and out.log_prob_sums.requires_grad
    with torch.no_grad():
        for row, ids in enumerate(out.token_ids):
            assert len(ids) <= 7 and not set(ids) & set(banned.tolist()) and vocab.end_id not in ids
            ended = len(ids) < 7
            assert out.finished[row] == ended
            steps = ids + [vocab.end_id] if ended else ids
            assert out.num_tokens[row] == len(steps)
            memory, state = decoder.start(features[row // 3 : row // 3 + 1])
            token, total = torch.tensor([vocab.start_id]), 0.0
            for target in steps:
                logits, state, _ = decoder.step(token, state, memory)
                total += float(masked_log_probs(logits, banned)[0, target])
                token = torch.tensor([target])
            assert float(out.log_prob_sums[row]) == pytest.approx(total, abs=1e-4)


def test_scst_updates_raise_the_reward():
    """Two images whose references differ: self-critical steps must make the samples of each
    closer to its own references (a wrong sign or baseline makes the reward fall)."""
    vocab = Vocabulary(VOCAB)
    refs = [["a dog runs on the snow"] * 3, ["a man sits on the red ball"] * 3]
    reward = CaptionReward(
        CiderD([[vocab.encode(r, add_special=False) for r in image] for image in refs])
    )
    decoder = _tiny_decoder(len(vocab)).train()
    features = torch.randn(2, 4, 16)
    images = torch.tensor([0, 1])
    cfg = ScstConfig(init_model="unused", samples_per_image=8, max_length=8, grad_clip=1.0)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    rewards = [
        scst_step(decoder, optimizer, features, images, reward, cfg, vocab, generator)[0]
        for _ in range(50)
    ]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > 2.0 * first, f"mean reward went from {first:.2f} to {last:.2f}"


def test_scst_step_adds_the_weighted_bleu_term_to_the_reward():
    vocab = Vocabulary(VOCAB)
    refs = [["a dog runs on the snow"] * 3, ["a man sits on the red ball"] * 3]
    corpus = [[vocab.encode(r, add_special=False) for r in image] for image in refs]
    cider, bleu = CiderD(corpus), SentenceBleu(corpus, order=1)
    features, images = torch.randn(2, 4, 16), torch.tensor([0, 1])
    rewards = {}
    for weight in (0.0, 2.0):
        decoder = _tiny_decoder(len(vocab)).eval()
        optimizer = torch.optim.Adam(decoder.parameters(), lr=0.0)  # same samples both times
        cfg = ScstConfig(init_model="unused", samples_per_image=4, max_length=8)
        reward = CaptionReward(cider, bleu=bleu, bleu_weight=weight)
        generator = torch.Generator().manual_seed(3)
        rewards[weight] = scst_step(
            decoder, optimizer, features, images, reward, cfg, vocab, generator
        )[0]
    generator = torch.Generator().manual_seed(3)
    sampled = sample_captions(
        _tiny_decoder(len(vocab)).eval(),
        features,
        4,
        8,
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        banned=torch.tensor(banned_ids(vocab.pad_id, vocab.start_id, vocab.unk_id, True)),
        generator=generator,
    )
    owners = [0] * 4 + [1] * 4
    mean_bleu = sum(bleu.scores(sampled.token_ids, owners)) / 8
    assert mean_bleu > 0
    assert rewards[2.0] == pytest.approx(rewards[0.0] + 2.0 * mean_bleu, abs=1e-6)


def test_reward_end_scores_an_unfinished_phrase_below_a_finished_one():
    """With <end> counted, "a dog runs on the <end>" shares no 4-gram ending with the references,
    so stopping mid-phrase costs reward that it would not cost without it."""
    vocab = Vocabulary(VOCAB)
    caption = "a dog runs on the snow"
    # a second image, so that idf is not zero for every n-gram
    samples = build_samples(
        ["img", "x"], {"img": [caption] * 3, "x": ["a man sits with a ball"] * 3}, vocab
    )
    references = reference_corpus(samples)
    assert references[0][0] == vocab.encode(caption, add_special=False)
    plain = CaptionReward.from_references(references, end_id=vocab.end_id)
    with_end = CaptionReward.from_references(references, end_id=vocab.end_id, reward_end=True)
    full = vocab.encode(caption, add_special=False)
    cut = full[:-1]  # "a dog runs on the"

    def drop(reward: CaptionReward) -> float:
        high, low = reward.scores([full, cut], [True, True], [0, 0])
        return high - low

    assert drop(with_end) > drop(plain) > 0
    # the same words cut by the length limit (no <end> sampled) earn less only when <end> counts
    finished, cut_off = with_end.scores([full, full], [True, False], [0, 0])
    assert finished == pytest.approx(10.0) and cut_off < finished
    assert plain.scores([full, full], [True, False], [0, 0]) == [pytest.approx(10.0)] * 2


def test_scst_learning_rate_is_constant_or_a_cosine_to_min_lr():
    constant = ScstConfig(init_model="m", lr=1e-4)
    assert {scst_lr(s, 100, constant) for s in (0, 50, 100)} == {1e-4}
    cosine = ScstConfig(init_model="m", lr=1e-4, min_lr=1e-5)
    assert scst_lr(0, 100, cosine) == pytest.approx(1e-4)
    assert scst_lr(50, 100, cosine) == pytest.approx(5.5e-5)
    assert scst_lr(100, 100, cosine) == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="min-lr"):
        ScstConfig(init_model="m", lr=1e-4, min_lr=2e-4)
    with pytest.raises(ConfigError, match="dropout"):
        ScstConfig(init_model="m", dropout=1.0)


@pytest.fixture(scope="module")
def xe_model(tmp_path_factory):
    """A shapes dataset, its work dir, and a decoder trained a few steps with cross-entropy."""
    root = tmp_path_factory.mktemp("scst")
    data = make_shapes_dataset(root / "data", num_images=30, seed=5)
    cfg = TrainConfig(
        data_dir=str(data),
        work_dir=str(root / "work"),
        run_dir=str(root / "xe"),
        num_words=0,
        min_count=1,
        embed_dim=24,
        hidden_dim=32,
        attention_dim=24,
        context_dim=24,
        dropout=0.1,
        batch_size=20,
        epochs=1,
        threads=1,
        val_images=4,
    )
    return train(cfg), cfg


def _scst_cfg(xe_model, tmp_path, **overrides) -> ScstConfig:
    best, xe_cfg = xe_model
    settings = dict(
        init_model=str(best),
        work_dir=xe_cfg.work_dir,
        run_dir=str(tmp_path / "scst"),
        images_per_batch=4,
        samples_per_image=3,
        max_length=8,
        lr=1e-3,
        threads=1,
        val_images=4,
        epochs=1,
    )
    return ScstConfig(**{**settings, **overrides})


def test_scst_run_resumes_exactly_records_and_refuses_changes(xe_model, tmp_path):
    straight = _scst_cfg(xe_model, tmp_path / "a")
    train_scst(straight, log=lambda *a: None)
    interrupted = _scst_cfg(xe_model, tmp_path / "b", max_steps=2)
    train_scst(interrupted, log=lambda *a: None)
    shutil.move(tmp_path / "b", tmp_path / "c")  # a moved run dir resumes
    resumed = _scst_cfg(xe_model, tmp_path / "c", max_steps=4)  # max_steps may change
    train_scst(resumed, log=lambda *a: None)
    full = _scst_cfg(xe_model, tmp_path / "c", max_steps=0)  # finish the epoch
    best = train_scst(full, log=lambda *a: None)
    a, b = (
        load_file(
            str(list_checkpoints(tmp_path / d / "scst" / "checkpoints")[-1] / "model.safetensors")
        )
        for d in ("a", "c")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

    run = tmp_path / "c" / "scst"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["train_reward"]) >= 0
    # the epoch's mean reward covers the batches before both interruptions
    straight_rows = list(csv.DictReader((tmp_path / "a" / "scst" / "metrics.csv").open()))
    assert rows[0]["train_reward"] == straight_rows[0]["train_reward"]
    assert (run / "scst_config.json").is_file() and (
        run / "epochs" / "epoch_001.safetensors"
    ).is_file()
    model = CaptioningModel.from_pretrained(best)
    assert model.extra["scst_config"]["lr"] == 1e-3
    assert model.extra["init_model"]["train_config"]["hidden_dim"] == 32  # provenance kept
    assert model.vocab.to_json() == CaptioningModel.from_pretrained(xe_model[0]).vocab.to_json()

    with pytest.raises(ConfigError, match="lr"):
        train_scst(_scst_cfg(xe_model, tmp_path / "c", lr=5e-3), log=lambda *a: None)


def test_scst_refuses_a_model_with_another_vocabulary(xe_model, tmp_path):
    best, _ = xe_model
    model = CaptioningModel.from_pretrained(best)
    other_vocab = Vocabulary([*SPECIAL_TOKENS, "zebra", "giraffe"])
    decoder = _tiny_decoder(
        len(other_vocab), feature_dim=model.encoder.channels, num_pixels=model.encoder.num_pixels
    )
    other = CaptioningModel(decoder, other_vocab, model.encoder).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="vocabulary"):
        train_scst(_scst_cfg(xe_model, tmp_path, init_model=str(other)), log=lambda *a: None)
    assert not (tmp_path / "scst").exists(), "a refused run writes nothing"
