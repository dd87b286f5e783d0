"""Reranking the finished beams by fluency (decoding/sentences.py) and the sentence check it is
given (evaluation/grammar.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captioner.decoding.sentences import prefer_sentences, sentences_first
from captioner.decoding.steps import DecodeResult
from captioner.evaluation import grammar

WORDS = "a man in blue shirt is smiling on".split()


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def beams(*texts: str) -> DecodeResult:
    """A beam search result over ``texts``, best first, each with distinct attention."""
    alternatives = [(ids(t), -0.1 * (k + 1)) for k, t in enumerate(texts)]
    alphas = [np.full((len(i), 4), k, np.float32) for k, (i, _) in enumerate(alternatives)]
    first_ids, first_score = alternatives[0]
    return DecodeResult(first_ids, first_score, alphas[0], alternatives, alphas)


def has_verb(token_ids: list[int]) -> bool:
    return WORDS.index("is") in token_ids and token_ids[-1] != WORDS.index("is")


def test_the_best_beam_that_is_a_sentence_is_said_with_its_own_attention():
    result = beams("a man in blue shirt", "a man in blue shirt is", "a man is smiling")
    (chosen,) = prefer_sentences([result], has_verb)
    assert chosen.token_ids == ids("a man is smiling")
    assert chosen.score == pytest.approx(-0.3)
    assert (chosen.alphas == 2).all() and chosen.alphas.shape == (4, 4)
    # nothing the decoder said is lost: every beam stays, the chosen one first
    assert [a for a, _ in chosen.alternatives] == [
        ids("a man is smiling"),
        ids("a man in blue shirt"),
        ids("a man in blue shirt is"),
    ]
    assert [float(a[0, 0]) for a in chosen.alternative_alphas] == [2, 0, 1]


def test_a_sentence_or_a_row_with_no_sentence_anywhere_stays_as_it_is():
    sentence = beams("a man is smiling", "a man in blue shirt")
    fragments = beams("a man in blue shirt", "a man on blue shirt")
    assert prefer_sentences([sentence, fragments], has_verb) == [sentence, fragments]
    nothing_wider = lambda rows: [beams("a man in blue shirt", "a man") for _ in rows]  # noqa: E731
    assert prefer_sentences([sentence, fragments], has_verb, nothing_wider) == [sentence, fragments]


def test_a_wider_search_is_asked_only_for_rows_whose_beams_hold_no_sentence():
    asked = []

    def widen(rows):
        asked.append(rows)
        return [beams("a man is smiling", "a man in blue shirt") for _ in rows]

    decoded = [
        beams("a man in blue shirt", "a man is smiling"),  # its own second beam will do
        beams("a man in blue shirt", "a man on blue shirt"),
        beams("a man is smiling"),
    ]
    chosen = prefer_sentences(decoded, has_verb, widen)
    assert asked == [[1]]
    assert [c.token_ids for c in chosen] == [ids("a man is smiling")] * 3
    assert (chosen[1].alphas == 0).all()  # the wider search's own best beam, its attention


def test_sentences_first_widens_with_the_same_word_bias():
    calls = []

    def decode(features, word_bias, width):
        calls.append((features.tolist(), None if word_bias is None else word_bias.tolist(), width))
        text = "a man is smiling" if width > 3 else "a man in blue shirt"
        return [beams(text) for _ in range(len(features))]

    run = sentences_first(decode, has_verb, beam_size=3)
    features, bias = torch.arange(2.0).reshape(2, 1, 1), torch.tensor([[1.0], [2.0]])
    assert [r.token_ids for r in run(features, bias)] == [ids("a man is smiling")] * 2
    assert calls == [
        ([[[0.0]], [[1.0]]], [[1.0], [2.0]], 3),
        ([[[0.0]], [[1.0]]], [[1.0], [2.0]], 6),
    ]


def test_greedy_results_without_alternative_attention_are_left_alone():
    result = beams("a man in blue shirt", "a man is smiling")
    result.alternative_alphas = []
    assert prefer_sentences([result], has_verb) == [result]


def test_a_caption_cut_off_on_a_function_word_is_no_complete_sentence(monkeypatch):
    grammar.complete_sentence_check.cache_clear()
    monkeypatch.setattr(grammar, "sentence_parser", lambda: lambda text: True)
    try:
        complete = grammar.complete_sentence_check()
        assert complete("a boy in a blue shirt is smiling")
        assert not complete("a boy in a blue shirt is")  # link-grammar reads it as ellipsis
        assert not complete("a man is standing on a")
        assert not complete("")
        monkeypatch.setattr(grammar, "sentence_parser", lambda: None)
        grammar.complete_sentence_check.cache_clear()
        assert grammar.complete_sentence_check() is None  # no parser: no check, never a guess
    finally:
        grammar.complete_sentence_check.cache_clear()


def test_link_grammar_accepts_the_dangling_copula_that_the_check_refuses():
    parses, complete = grammar.sentence_parser(), grammar.complete_sentence_check()
    if parses is None:
        pytest.skip("link-grammar not installed (apt-get install python3-link-grammar)")
    assert parses("a boy in a blue shirt is") and not complete("a boy in a blue shirt is")
    assert complete("a boy in a blue shirt is smiling")
    assert not complete("a man in a blue shirt")


def test_skipped_rows_keep_their_best_scored_beam_and_are_never_widened():
    fragment = beams("a man in blue shirt", "a man is smiling")
    asked = []
    kept = prefer_sentences([fragment], has_verb, lambda rows: asked.append(rows), skip=[True])
    assert kept == [fragment] and asked == []
