"""Prefer a finished beam that is a sentence over a better-scored one that is not.

Flickr8k's references include fragments ("a man in a blue shirt"), so the decoder sometimes
ends after a noun phrase, or strands a word ("a man is standing on a"). Among the ``beam_size``
hypotheses beam search finished there is often a full sentence that scores a little lower
("a man in a blue shirt is smiling"): reranking the finished beams by fluency keeps the decoder's
own words and only changes which of them it says. What counts as a sentence is the caller's
check (link-grammar's full parse, :mod:`captioner.evaluation.grammar`, where installed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from captioner.decoding.steps import DecodeResult


def prefer_sentences(
    decoded: Sequence[DecodeResult],
    is_sentence: Callable[[list[int]], bool],
    skip: Sequence[bool] | None = None,
) -> list[DecodeResult]:
    """Each result whose best hypothesis fails ``is_sentence`` becomes its best-scored
    alternative that passes, with that alternative's own attention; the others, the ``skip``
    rows and results with no passing alternative are returned as they are. ``alternatives``
    keeps every hypothesis, the chosen one first, so nothing the decoder said is lost."""
    chosen = []
    for i, result in enumerate(decoded):
        if (skip is not None and skip[i]) or not result.token_ids or is_sentence(result.token_ids):
            chosen.append(result)
            continue
        chosen.append(_first_sentence(result, is_sentence))
    return chosen


def _first_sentence(result: DecodeResult, is_sentence: Callable[[list[int]], bool]) -> DecodeResult:
    if len(result.alternative_alphas) != len(result.alternatives):
        return result  # no attention for the alternatives (greedy): nothing to promote
    for k, (ids, score) in enumerate(result.alternatives[1:], start=1):
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
    return result
