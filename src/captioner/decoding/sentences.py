"""Prefer a finished beam that is a sentence over a better-scored one that is not.

Flickr8k's references include fragments ("a man in a blue shirt"), so the decoder sometimes
ends after a noun phrase, or strands a word ("a man is standing on a"). Among the hypotheses
beam search finished there is often a full sentence that scores a little lower ("a man in a blue
shirt is smiling"): reranking the finished beams by fluency keeps the decoder's own words and
only changes which of them it says. When none of them is a sentence, the same photo is searched
again with twice the beams (rare, so cheap) before the fragment is kept. What counts as a
sentence is the caller's check (link-grammar's full parse, :mod:`captioner.evaluation.grammar`,
where installed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from captioner.decoding.steps import DecodeResult

WIDER = 2  # beams of the second search, as a multiple of the first's


def prefer_sentences(
    decoded: Sequence[DecodeResult],
    is_sentence: Callable[[list[int]], bool],
    widen: Callable[[list[int]], list[DecodeResult]] | None = None,
    skip: Sequence[bool] | None = None,
) -> list[DecodeResult]:
    """Each result whose best hypothesis fails ``is_sentence`` becomes its best-scored
    alternative that passes, with that alternative's own attention. ``widen(rows)``: those
    rows searched again with more beams, asked only for rows none of whose beams passes; its
    best passing hypothesis is then said. Rows with nothing that passes, and ``skip`` rows,
    stay as they were.
    ``alternatives`` keeps every hypothesis, the chosen one first."""
    chosen = list(decoded)
    stuck = []
    for i, result in enumerate(decoded):
        if (skip is not None and skip[i]) or not result.token_ids or is_sentence(result.token_ids):
            continue
        better = first_sentence(result, is_sentence, start=1)
        if better is None:
            stuck.append(i)
        else:
            chosen[i] = better
    if widen is not None and stuck:
        for i, wide in zip(stuck, widen(stuck), strict=True):
            better = first_sentence(wide, is_sentence, start=0)
            if better is not None:
                chosen[i] = better
    return chosen


def first_sentence(
    result: DecodeResult, is_sentence: Callable[[list[int]], bool], start: int
) -> DecodeResult | None:
    """``result`` with its best alternative from index ``start`` on that passes promoted to
    the front (None: none passes, or no attention kept for the alternatives)."""
    if len(result.alternative_alphas) != len(result.alternatives):
        return None  # greedy keeps no alternatives' attention: nothing to promote
    for k, (ids, score) in enumerate(result.alternatives[start:], start=start):
        if ids and is_sentence(ids):
            order = [k, *(j for j in range(len(result.alternatives)) if j != k)]
            return replace(
                result,
                token_ids=list(ids),
                score=score,
                alphas=result.alternative_alphas[k],
                alternatives=[result.alternatives[j] for j in order],
                alternative_alphas=[result.alternative_alphas[j] for j in order],
            )
    return None


def sentences_first(
    decode: Callable[[torch.Tensor, torch.Tensor | None, int], list[DecodeResult]],
    is_sentence: Callable[[list[int]], bool] | None,
    beam_size: int,
) -> Callable[..., list[DecodeResult]]:
    """``decode(features (B, P, C), word_bias (B, V) or None, beams)`` turned into a decoder
    of (features, word_bias, skip=None) that prefers sentences, widening to ``WIDER *
    beam_size`` beams (with the same word bias) where the first search finished none; ``skip``
    rows (B,) keep the best-scored beam. With no check (None) or one beam (greedy keeps no
    alternatives), it decodes at ``beam_size`` and nothing more."""

    def run(
        features: torch.Tensor,
        word_bias: torch.Tensor | None,
        skip: Sequence[bool] | None = None,
    ) -> list[DecodeResult]:
        def widen(rows: list[int]) -> list[DecodeResult]:
            bias = None if word_bias is None else word_bias[rows]
            return decode(features[rows], bias, WIDER * beam_size)

        first = decode(features, word_bias, beam_size)
        if is_sentence is None or beam_size == 1:
            return first
        return prefer_sentences(first, is_sentence, widen, skip)

    return run
