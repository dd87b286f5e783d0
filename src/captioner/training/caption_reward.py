"""The self-critical reward of a sampled caption: CIDEr-D, optionally with <end> counted as a
token, plus an optional weighted sentence-BLEU term.

One object holds the reward options so that the update step (`scst.scst_step`) only asks "how good
is each sample?" and a new reward term does not widen its signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from captioner.training.bleu_reward import SentenceBleu
from captioner.training.cider_reward import CiderD


@dataclass(frozen=True)
class CaptionReward:
    cider: CiderD
    end_id: int | None = None  # set: a finished caption is scored with its <end> (--reward-end)
    bleu: SentenceBleu | None = None
    bleu_weight: float = 0.0

    @classmethod
    def from_references(
        cls,
        references: Sequence[Sequence[Sequence[int]]],
        *,
        end_id: int,
        reward_end: bool = False,
        bleu_weight: float = 0.0,
        bleu_order: int = 1,
    ) -> CaptionReward:
        """``references[image]``: that image's captions as word ids, without <start>/<end>."""
        if reward_end:
            cider = CiderD([[list(ref) + [end_id] for ref in refs] for refs in references])
        else:
            cider = CiderD(references)
        bleu = SentenceBleu(references, bleu_order) if bleu_weight > 0 else None
        return cls(cider, end_id if reward_end else None, bleu, bleu_weight if bleu else 0.0)

    def scores(
        self,
        token_ids: Sequence[Sequence[int]],
        finished: Sequence[bool],
        images: Sequence[int],
    ) -> list[float]:
        """Rewards of captions ``token_ids`` (words only) of corpus images ``images``;
        ``finished[n]``: whether caption n ended with <end> rather than at the length limit."""
        candidates = token_ids
        if self.end_id is not None:
            candidates = [
                [*ids, self.end_id] if done else ids
                for ids, done in zip(token_ids, finished, strict=True)
            ]
        scores = self.cider.scores(candidates, images)
        if self.bleu is not None:
            extra = self.bleu.scores(token_ids, images)  # words only: <end> is not a word here
            scores = [c + self.bleu_weight * b for c, b in zip(scores, extra, strict=True)]
        return scores
