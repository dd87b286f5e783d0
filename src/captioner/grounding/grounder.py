"""Grounded decoding: a per-image word prior from the encoder's ImageNet concepts.

What it does, for every image, from the same encoder pass that feeds the decoder:

1. **Concepts.** The encoder's ImageNet head gives 1000 class probabilities; WordNet turns them
   into everyday words with probabilities (``cat 0.95``), shown beside every caption.
2. **In-domain score.** :class:`~captioner.grounding.domain.DomainScorer`: the share of held-out
   Flickr8k photos at least as unusual as this one. Below ``threshold`` the photo is called out
   of domain and the caption flagged as possibly wrong.
3. **Evidence per caption word.** Two sources, chosen between by the in-domain flag itself
   (``trust``: 1 for an in-domain photo, 0 for one flagged out of domain; a blend in between
   let the learnt base rates of "man" and "dog" back into photos unlike any training photo,
   which is what the out-of-domain path exists to stop, and the photos the user is warned
   about are exactly the ones decoded on concepts alone):
   - learnt: :class:`~captioner.grounding.word_model.ConceptWordTable`, how often Flickr8k
     captions of photos with these concepts use the word (Yao et al. 2017's attributes),
     blended (``detector_weight``, chosen on dev) with
     :class:`~captioner.grounding.word_model.FeatureWordDetector`, a logistic regression per
     word on the pooled feature, which sees what ImageNet has no class for (people, grass);
   - lexical: the probability of the classes the word names in WordNet ("cat" for the three
     cat classes, "animal" for all animals), which holds on any photo.
   In domain the evidence is ``noisy_or(learnt, lexical)``; out of domain only the lexicon
   counts (see :meth:`Grounder.log_ratios`), so a cat photo gets no "dog" and no "man"
   evidence, whatever the decoder's Flickr8k prior says.
4. **Word bias.** ``strength * log((evidence + eps) / (base_rate + eps))``, clipped, added to the
   decoder's logits at every step (a product of experts; see :mod:`captioner.decoding.greedy`):
   words the concepts support more than on an average training photo are favoured, words they
   contradict (the CHAIR metric's "hallucinated objects", Rohrbach et al. 2018) disfavoured.
   ``strength`` is ``trust * strength + (1 - trust) * ood_strength``: in domain it is the dev
   split's choice; out of domain the concepts' evidence has to outweigh the decoder's prior.
   Only the words whose learnt evidence ranks dev photos well (ROC AUC >= ``min_auc``) or that
   name some ImageNet class are biased; function words never are.

Nothing here is specific to one model: :func:`captioner.grounding.fit.fit_grounding` builds it
for any model's vocabulary from the training split's cached features, and picks ``strength``
on the dev split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from captioner.errors import CheckpointError
from captioner.features.concepts import ImageNetConcepts, ZeroOneMatrix, _singulars
from captioner.grounding.detection import DetectionGate
from captioner.grounding.domain import DomainScorer, pooled
from captioner.grounding.word_model import ConceptWordTable, FeatureWordDetector, softmax
from captioner.io import atomic_path, atomic_write_json, read_json

GROUNDING_WEIGHTS = "grounding.safetensors"
GROUNDING_CONFIG = "grounding.json"
FORMAT_VERSION = 1


@dataclass
class GroundingConfig:
    strength: float = 0.5  # weight of the log evidence ratio in domain (chosen on dev)
    # ... and out of domain (trust 0), where the decoder's Flickr8k prior says nothing about
    # which objects are there and the concepts must win over it
    ood_strength: float = 5.0
    temperature: float = 2.0  # of the class softmax feeding the learnt table
    # share of the feature detector in the learnt evidence, the rest being the table's (chosen
    # on dev by mean ROC AUC over words; 0 when the grounding has no detector)
    detector_weight: float = 0.0
    detector_l2: float = 0.0  # the detector's weight decay (a fitted choice, saved here)
    prior: float = 2.0  # pseudo-photos shrinking the table to each word's base rate
    epsilon: float = 0.01  # floor of both evidences in the log ratio
    max_bias: float = 5.0  # |log evidence ratio| cap per word, before the strength
    # cap of a positive bias, in nats: enough to name a word once against the decoder's prior
    max_bonus: float = 8.0
    # learnt words kept when they rank dev photos at least this well: at 0.75 "man" (0.74) and
    # "woman" (0.73) fell out, the words most often invented; function words rank below 0.62
    min_auc: float = 0.7
    threshold: float = 0.01  # in-domain score below which a photo is out of domain
    residual_variance: float = 1.0  # of the domain scorer (a fitted value, saved here)
    top_k: int = 5  # concepts listed per image
    min_prob: float = 0.05  # concepts listed only from this probability
    # the detector's gate on person / dog / cat words (grounding/detection.py): presence
    # probabilities below which each is doubted (dev quantiles; 0 = not gated) and its strength
    person_threshold: float = 0.0
    dog_threshold: float = 0.0
    cat_threshold: float = 0.0
    gate_strength: float = 0.0
    detector_min_prob: float = 0.5  # detector classes listed among the concepts from this
    # out of domain, a short description ("a cat") instead of a sentence the evidence cannot
    # support (grounding/short_description.py)
    short_out_of_domain: bool = True

    @classmethod
    def from_json(cls, data: dict) -> GroundingConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        config = cls(**{k: type(getattr(cls, k))(v) for k, v in known.items()})
        if min(config.strength, config.ood_strength) < 0:
            raise ValueError("strength and ood_strength must be >= 0")
        if config.temperature <= 0 or config.epsilon <= 0:
            raise ValueError("temperature and epsilon must be > 0")
        if not 0 <= config.detector_weight <= 1:
            raise ValueError("detector_weight must be between 0 and 1")
        config.detection_gate()  # its own checks
        return config

    def detection_gate(self) -> DetectionGate:
        thresholds = {
            label: t
            for label, t in (
                ("Person", self.person_threshold),
                ("Dog", self.dog_threshold),
                ("Cat", self.cat_threshold),
            )
            if t > 0
        }
        return DetectionGate(thresholds, self.gate_strength)


@dataclass
class ImageGrounding:
    """What the concepts say about one image."""

    concepts: list[tuple[str, float]]  # everyday words, best first: [("cat", 0.95), ...]
    in_domain: float  # share of held-out training-like photos at least as unusual, 0..1
    out_of_domain: bool  # in_domain below the model's threshold: the caption may be wrong


def word_groups(words: list[str]) -> torch.Tensor:
    """(V,) group id per vocabulary word: a word and its plural share one ("cat", "cats"), so
    decoding spends one positive bonus on either (see :func:`captioner.decoding.greedy`)."""
    index = {w: i for i, w in enumerate(words)}
    groups = []
    for i, w in enumerate(words):
        forms = [f for f in _singulars(w) if f in index]
        groups.append(min((index[f] for f in forms), default=i))
    return torch.tensor(groups, dtype=torch.long)


class Grounder:
    """Concepts, in-domain score and decoding bias for one caption model's vocabulary."""

    def __init__(
        self,
        config: GroundingConfig,
        word_ids: np.ndarray,
        table: ConceptWordTable,
        lexicon: np.ndarray,
        base_rate: np.ndarray,
        domain: DomainScorer,
        vocab_size: int,
        concepts: ImageNetConcepts | None = None,
        in_domain_words: np.ndarray | None = None,
        detector: FeatureWordDetector | None = None,
    ):
        self.config = config
        self.word_ids = np.asarray(word_ids, dtype=np.int64)  # (W,) vocabulary ids biased
        self.table = table  # (1000, W)
        self.lexicon = np.asarray(lexicon, dtype=np.float32)  # (1000, W) 0/1
        self._lexicon_t = ZeroOneMatrix(self.lexicon.T)  # (W, 1000) sparse: lexical()
        self.base_rate = np.asarray(base_rate, dtype=np.float32)  # (W,) mean training evidence
        self.domain = domain
        self.vocab_size = int(vocab_size)
        self.concepts = concepts or ImageNetConcepts.load()
        W = len(self.word_ids)
        # (W,) the words biased in domain too (learnt or named by a class); the rest (rarer
        # content words) only out of domain, where "not named by the concepts" is the evidence
        mask = np.ones(W, dtype=bool) if in_domain_words is None else in_domain_words
        self.in_domain_words = np.asarray(mask, dtype=bool)
        if self.table.table.shape != (1000, W) or self.lexicon.shape != (1000, W):
            raise CheckpointError(f"grounding tables do not match its {W} words")
        self.detector = detector  # logistic regressions on the pooled feature, or None
        if detector is not None and detector.weight.shape[0] != W:
            raise CheckpointError(f"grounding detector does not match its {W} words")

    def trust(self, in_domain: np.ndarray) -> np.ndarray:
        """(B,) in-domain scores -> (B,) 1.0 where the learnt evidence applies (the photo is in
        domain), else 0.0."""
        return self.domain.in_domain(in_domain).astype(np.float32)

    def lexical(self, logits: np.ndarray) -> np.ndarray:
        """(B, 1000) logits -> (B, W) probability of the classes each word names."""
        return np.minimum(self._lexicon_t(softmax(logits)), 1.0)

    def support(self, logits: np.ndarray, itos: list[str]) -> list[dict[str, float]]:
        """(B, 1000) logits, the model's vocabulary -> per image, word -> probability of the
        classes the word names (the lexical evidence), for the words the grounding biases."""
        lexical = self.lexical(logits)  # (B, W)
        names = [itos[i] for i in self.word_ids]
        return [dict(zip(names, row.tolist(), strict=True)) for row in lexical]

    def learnt(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """(B, 1000) logits, (B, C) pooled features -> (B, W) learnt word probabilities: the
        table's, blended with the feature detector's when the grounding has one."""
        table = self.table.predict(logits)  # (B, W)
        weight = self.config.detector_weight
        if self.detector is None or weight == 0:
            return table
        if features is None:
            raise ValueError("this grounding's detector needs the pooled features")
        return (1.0 - weight) * table + weight * self.detector.predict(features)

    def evidence(
        self,
        logits: np.ndarray,
        lexical: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> np.ndarray:
        """(B, 1000) logits, (B, C) pooled features -> in-domain evidence (B, W) in [0, 1]:
        noisy-or of the learnt probabilities and the lexicon (``lexical`` when the caller has
        it already)."""
        learnt = self.learnt(logits, features)  # (B, W)
        lexical = self.lexical(logits) if lexical is None else lexical
        return 1.0 - (1.0 - learnt) * (1.0 - lexical)  # (B, W)

    def log_ratios(
        self, logits: np.ndarray, in_domain: np.ndarray, features: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, 1000) logits, (B,) in-domain scores, (B, C) pooled features -> (B, W)
        unweighted bias per word.

        In domain: log(evidence / base rate), for the in-domain words. Out of domain: the
        lexicon alone, as a penalty log(lexical + eps) on every content word (0 for a word the
        concepts name with certainty, log(eps) for one they do not name at all) plus the same
        ratio's positive part for the words they name more than usual."""
        c = self.config
        lexical = self.lexical(logits)  # (B, W)
        evidence = self.evidence(logits, lexical, features)  # (B, W)
        inside = np.log((evidence + c.epsilon) / (self.base_rate + c.epsilon))
        inside = np.clip(inside, -c.max_bias, c.max_bias) * self.in_domain_words  # (B, W)
        named = np.log((lexical + c.epsilon) / (self.base_rate + c.epsilon))
        outside = np.log(lexical + c.epsilon) + np.clip(named, 0.0, c.max_bias)  # (B, W)
        trust = self.trust(in_domain)[:, None]  # (B, 1)
        return trust * inside + (1.0 - trust) * outside

    def word_bias(
        self,
        logits: np.ndarray,
        in_domain: np.ndarray,
        strength: float | None = None,
        features: np.ndarray | None = None,
    ) -> torch.Tensor:
        """(B, 1000) logits, (B,) in-domain scores, (B, C) pooled features (see
        :func:`~captioner.grounding.domain.pooled`) -> (B, V) float32 logit bias."""
        c = self.config
        ratio = self.log_ratios(logits, in_domain, features)  # (B, W)
        if strength is None:  # per image: the dev choice in domain, ood_strength outside
            trust = self.trust(in_domain)  # (B,)
            weight = (trust * c.strength + (1.0 - trust) * c.ood_strength)[:, None]  # (B, 1)
        else:
            weight = np.full((len(ratio), 1), float(strength), dtype=np.float32)
        bias = np.zeros((len(ratio), self.vocab_size), dtype=np.float32)  # (B, V)
        bias[:, self.word_ids] = np.minimum(weight * ratio, c.max_bonus)
        return torch.from_numpy(bias)

    def describe(
        self, grid: np.ndarray, logits: np.ndarray, features: np.ndarray | None = None
    ) -> tuple[list[ImageGrounding], np.ndarray]:
        """grid (B, P, C), logits (B, 1000) -> one ImageGrounding per image, in-domain (B,)
        (``features``: the grid's pooled features, when the caller has them)."""
        scores = self.domain.score(pooled(grid) if features is None else features)  # (B,)
        top = self.concepts.top(softmax(logits), self.config.top_k, self.config.min_prob)
        out = [
            ImageGrounding(t, float(s), not inside)
            for t, s, inside in zip(top, scores, self.domain.in_domain(scores), strict=True)
        ]
        return out, scores

    # -- save / load: safetensors + JSON beside the model's own files ---------------------

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "word_ids": self.word_ids,
            "table": self.table.table.astype(np.float16),
            "lexicon": self.lexicon.astype(np.uint8),
            "base_rate": self.base_rate,
            "in_domain_words": self.in_domain_words.astype(np.uint8),
            **self.domain.tensors(),
        }
        if self.detector is not None:
            tensors["detector_projection"] = self.detector.projection  # (r, C)
            tensors["detector_weight"] = self.detector.weight  # (W, r)
            tensors["detector_bias"] = self.detector.bias  # (W,)
        with atomic_path(path / GROUNDING_WEIGHTS) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        config = asdict(self.config)
        config["temperature"] = self.table.temperature
        config["residual_variance"] = self.domain.residual_variance
        config["threshold"] = self.domain.threshold
        atomic_write_json(
            path / GROUNDING_CONFIG,
            {
                "format_version": FORMAT_VERSION,
                "vocab_size": self.vocab_size,
                "config": config,
                **({"extra": extra} if extra else {}),
            },
        )
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Grounder | None:
        """The grounding saved in a model directory, or None when it has none."""
        path = Path(path)
        if not (path / GROUNDING_CONFIG).is_file():
            return None
        try:
            meta = read_json(path / GROUNDING_CONFIG)
            if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError("unsupported format_version")
            config = GroundingConfig.from_json(meta["config"])
            vocab_size = int(meta["vocab_size"])
            t = load_file(str(path / GROUNDING_WEIGHTS))
            damaged = sorted(
                k for k, v in t.items() if v.dtype.kind == "f" and not np.isfinite(v).all()
            )
            if damaged:  # NaN weights gave "" captions scored -inf, silently
                raise ValueError(f"non-finite values in {', '.join(damaged)}")
            domain = DomainScorer.from_tensors(t, config.residual_variance, config.threshold)
            detector = None
            if "detector_weight" in t:
                detector = FeatureWordDetector(
                    t["detector_projection"], t["detector_weight"], t["detector_bias"]
                )
            elif config.detector_weight > 0:
                raise ValueError("detector_weight is set but the detector is missing")
            return cls(
                config,
                t["word_ids"],
                ConceptWordTable(t["table"].astype(np.float32), config.temperature),
                t["lexicon"].astype(np.float32),
                t["base_rate"],
                domain,
                vocab_size,
                in_domain_words=t["in_domain_words"].astype(bool)
                if "in_domain_words" in t
                else None,
                detector=detector,
            )
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any damage is one clear error
            raise CheckpointError(f"{path}: unreadable grounding files ({exc})") from exc
