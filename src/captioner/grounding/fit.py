"""Fit a model's grounding from a prepared work directory's cached features (minutes, CPU).

Everything is learnt on the training split and chosen on the dev split: the class-to-word
table and its smoothing, the feature detector's weight decay and its share beside the table
(both by mean dev ROC AUC over words), which words get a bias, the domain scorer (fitted on
training photos, calibrated on dev photos). Only view 0 (the unaugmented photos) is used:
grounding describes photos as users send them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from captioner.data.prepare import PreparedData
from captioner.data.vocab import Vocabulary, tokenize
from captioner.errors import DataError
from captioner.features.concepts import ImageNetConcepts, is_object_word, load_object_words
from captioner.features.encoders import concept_head
from captioner.grounding.domain import DEFAULT_COMPONENTS, DomainScorer, unit_rows
from captioner.grounding.grounder import Grounder, GroundingConfig
from captioner.grounding.word_model import ConceptWordTable, FeatureWordDetector, roc_auc

TEMPERATURES = (1.0, 2.0, 4.0)
PRIORS = (0.5, 2.0, 8.0)
MIN_TRAIN_IMAGES = 10  # a learnt word needs this many training photos that use it
DETECTOR_L2 = (0.1, 0.3)  # weight decays tried for the feature detector
DETECTOR_WEIGHTS = (0.5, 1.0)  # its shares in the learnt evidence tried beside the table alone


@dataclass
class SplitInputs:
    names: list[str]
    pooled: np.ndarray  # (N, C) unit-length mean of each grid
    logits: np.ndarray  # (N, 1000) the encoder head's logits


def split_inputs(prepared: PreparedData, encoder: str) -> dict[str, SplitInputs]:
    """Pooled features and concept logits of the train and dev photos, from the view-0 cache."""
    from captioner.features.cache import load_cache
    from captioner.features.pipeline import ensure_features

    dirs = ensure_features(prepared, encoder, progress=True)  # resumes or builds view 0
    names, grids = load_cache(dirs[0])  # (N, P, C) fp16
    head = concept_head(encoder)
    means, logit_chunks = [], []
    with torch.inference_mode():
        for i in range(0, len(names), 512):
            mean = head.pooled(grids[i : i + 512])  # (b, C): the frozen network's, for a trunk
            means.append(mean)
            logit_chunks.append(head.head(mean))  # (b, 1000)
        mean = torch.cat(means)  # (N, C)
        logits = torch.cat(logit_chunks).numpy()  # (N, 1000)
    unit = unit_rows(mean.numpy())  # (N, C), as domain.pooled() gives for one grid
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split in ("train", "val"):
        wanted = list(prepared.splits[split])
        missing = [n for n in wanted if n not in index]
        if missing or not wanted:
            raise DataError(f"the {split} split has no cached features for {missing[:3]}")
        rows = np.array([index[n] for n in wanted])
        out[split] = SplitInputs(wanted, unit[rows], logits[rows])
    return out


def word_targets(names: list[str], captions: dict[str, list[str]], vocab: Vocabulary) -> np.ndarray:
    """(N, V) share of each photo's reference captions that use each vocabulary word."""
    targets = np.zeros((len(names), len(vocab)), dtype=np.float32)
    for row, name in enumerate(names):
        refs = captions[name]
        for caption in refs:
            ids = {vocab.stoi[w] for w in tokenize(caption) if w in vocab}
            targets[row, list(ids)] += 1.0 / len(refs)
    targets[:, :4] = 0.0  # special tokens are never evidence
    return targets


def fit_grounding(
    vocab: Vocabulary,
    prepared: PreparedData,
    encoder: str,
    config: GroundingConfig | None = None,
    log=print,
) -> tuple[Grounder, dict]:
    """The grounding of a model with this vocabulary and encoder, and a report of the choices."""
    config = config or GroundingConfig()
    inputs = split_inputs(prepared, encoder)
    train, dev = inputs["train"], inputs["val"]
    y_train = word_targets(train.names, prepared.captions, vocab)  # (N, V)
    y_dev = word_targets(dev.names, prepared.captions, vocab)
    frequent = (y_train > 0).sum(axis=0) >= MIN_TRAIN_IMAGES  # (V,)
    frequent[:4] = False
    candidates = np.flatnonzero(frequent)

    best = None  # smoothing chosen by the mean dev ROC AUC over the frequent words
    for temperature in TEMPERATURES:
        for prior in PRIORS:
            table = ConceptWordTable.fit(train.logits, y_train[:, candidates], temperature, prior)
            predicted = table.predict(dev.logits)  # (M, len(candidates))
            auc = roc_auc(predicted, y_dev[:, candidates] > 0)
            mean_auc = float(np.nanmean(auc))
            log(f"grounding: temperature {temperature}, prior {prior}: dev mean AUC {mean_auc:.4f}")
            if best is None or mean_auc > best[0]:
                best = (mean_auc, temperature, prior, auc, predicted)
    mean_auc, temperature, prior, auc, table_dev = best
    table_auc = mean_auc

    concepts = ImageNetConcepts.load()
    objects = load_object_words()
    lexicon_all = concepts.lexicon(vocab.itos)  # (1000, V)
    lexicon_all[:, :4] = 0.0
    named = lexicon_all.sum(axis=0) > 0  # (V,) words that name some ImageNet class
    content = np.array([is_object_word(w, objects) for w in vocab.itos])
    content[:4] = False
    # one detector fit per weight decay covers every word that may end up biased
    columns = np.union1d(candidates, np.flatnonzero(content | named))  # (D,)
    position = {int(c): i for i, c in enumerate(columns)}
    cand_cols = np.array([position[int(c)] for c in candidates])
    chosen = (0.0, 0.0, None, mean_auc)  # (weight, l2, detector, dev mean AUC): table alone
    for l2 in DETECTOR_L2:
        detector = FeatureWordDetector.fit(train.pooled, y_train[:, columns], l2)
        found = detector.predict(dev.pooled)[:, cand_cols]  # (M, len(candidates))
        for weight in DETECTOR_WEIGHTS:
            blend_auc = roc_auc((1 - weight) * table_dev + weight * found, y_dev[:, candidates] > 0)
            blend_mean = float(np.nanmean(blend_auc))
            log(f"grounding: detector l2 {l2}, weight {weight}: dev mean AUC {blend_mean:.4f}")
            if blend_mean > chosen[3]:
                chosen = (weight, l2, detector, blend_mean)
    detector_weight, detector_l2, detector, mean_auc = chosen
    # which words are biased, in domain and out, goes by the table's AUC: the detector ranks
    # even "a", "two" and "front" well on Flickr8k photos, and every biased word is penalised
    # out of domain unless the concepts name it; the detector only sharpens the evidence
    learnt = np.zeros(len(vocab), dtype=bool)
    learnt[candidates[np.nan_to_num(auc) >= config.min_auc]] = True
    # out of domain, the object words (WordNet nouns for visible things) the concepts do not
    # name are penalised, rare ones included; not the ones frequent yet unpredictable from the
    # concepts, which captions use as function words ("a", "in front of", "on top of")
    function = np.zeros(len(vocab), dtype=bool)
    function[candidates[np.nan_to_num(auc, nan=0.5) < config.min_auc]] = True
    content &= ~function
    word_ids = np.flatnonzero(content | named | learnt)
    in_domain_words = (learnt | named)[word_ids]
    table = ConceptWordTable.fit(train.logits, y_train[:, word_ids], temperature, prior)
    components = min(DEFAULT_COMPONENTS, len(train.names) // 2)  # small data sets: fewer dirs
    domain = DomainScorer.fit(train.pooled, dev.pooled, components, config.threshold)
    config = replace(
        config,
        temperature=temperature,
        prior=prior,
        residual_variance=domain.residual_variance,
        detector_weight=detector_weight,
        detector_l2=detector_l2,
    )
    if detector is not None:  # its rows for the biased words, in word_ids order
        rows = np.array([position[int(w)] for w in word_ids])
        detector = FeatureWordDetector(
            detector.projection, detector.weight[rows], detector.bias[rows]
        )
    lexicon = lexicon_all[:, word_ids]
    grounder = Grounder(
        config,
        word_ids,
        table,
        lexicon,
        np.zeros(len(word_ids)),
        domain,
        len(vocab),
        concepts,
        in_domain_words,
        detector,
    )
    grounder.base_rate = grounder.evidence(train.logits, features=train.pooled).mean(axis=0)
    report = {
        "temperature": temperature,
        "prior": prior,
        "dev_mean_auc": round(mean_auc, 4),
        "dev_mean_auc_table": round(table_auc, 4),
        "detector_weight": detector_weight,
        "detector_l2": detector_l2,
        "biased_words": len(word_ids),
        "biased_in_domain": int(in_domain_words.sum()),
        "function_words": int(function.sum()),
        "object_words": int(content.sum()),
        "learnt_words": int(learnt.sum()),
        "lexicon_words": int(named.sum()),
        "train_images": len(train.names),
        "dev_images": len(dev.names),
    }
    return grounder, report
