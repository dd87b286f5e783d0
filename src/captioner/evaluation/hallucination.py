"""Hallucination measures: does a caption name its subject, does it invent people or dogs?

The bundled Flickr8k model puts a person or a dog into most photos that show neither, because
nearly every Flickr8k caption has one. These helpers give the yardstick for that:

- ``subject_named(caption, subject_words)``: an out-of-domain photo's subject is named;
- ``invented_rate(captions, references, words)``: on a captioned dataset, among the images none of
  whose references mention a word class (``PERSON_WORDS``, ``DOG_WORDS``), how many captions do.

Matching is on whole tokens from ``captioner.data.vocab.tokenize`` (the same lowercase,
punctuation-free split the vocabulary uses), never on substrings: "manhole" is not "man".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from captioner.data.vocab import tokenize

# the word lists live beside the detector that gates them: one reading of "a person word"
from captioner.features.detector_words import DOG_WORDS, PERSON_WORDS  # noqa: F401


def caption_tokens(caption: str | Iterable[str]) -> list[str]:
    """A caption as tokens: a string is tokenized, a token list is lowercased as is."""
    if isinstance(caption, str):
        return tokenize(caption)
    return [str(token).lower() for token in caption]


def mentions(caption_tokens_: str | Iterable[str], words: Iterable[str]) -> bool:
    """Whether any whole token of the caption is one of ``words`` (case-insensitive)."""
    vocabulary = {w.lower() for w in words}
    return any(token in vocabulary for token in caption_tokens(caption_tokens_))


def subject_named(caption: str | Iterable[str], subject_words: Iterable[str]) -> bool:
    """Whether the caption names the photo's subject (any of ``subject_words`` as a token)."""
    return mentions(caption, subject_words)


def invented_rate(
    captions: Mapping[str, str],
    references: Mapping[str, list[str]],
    words: Iterable[str],
) -> tuple[int, int]:
    """(count, total): among captioned images none of whose references mention ``words``
    (``total``), how many captions do (``count``). Images without references are skipped."""
    vocabulary = frozenset(w.lower() for w in words)
    count = total = 0
    for image, caption in captions.items():
        refs = references.get(image)
        if not refs or any(mentions(ref, vocabulary) for ref in refs):
            continue
        total += 1
        count += mentions(caption, vocabulary)
    return count, total


def share(count: int, total: int) -> str:
    """``"12/226 (5.3%)"``; ``"0/0"`` when there is nothing to count."""
    return f"{count}/{total} ({100 * count / total:.1f}%)" if total else f"{count}/{total}"
