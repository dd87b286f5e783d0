"""The honest fallback: on a photo unlike the training photos, say less and be right.

Out of domain the decoder's Flickr8k language has nothing true to attach its sentence to: a
full sentence there was word salad a third of the time ("a is is on a blue in the bubble") and a
confident wrong scene most of the rest. What the evidence does support is one thing in the photo.
So an out-of-domain photo is described as "a/an <noun>": a concept the encoder is sure of, else
the head noun the grounded decoder led with when the concepts name it (its grounding picked it
among the Flickr8k words, so it is often the right everyday word: "building", "car", "fish"),
else the most specific word that is more likely right than wrong ("a flower" when no one kind of
flower is sure). The result says it is a short description.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from captioner.features.concepts import _singulars

# words that end a caption's leading noun phrase without being its noun
PHRASE_BREAKERS = frozenset(
    "is are was were be on in of with at by near under over through into from to for while "
    "and his her its their".split()
)
DETERMINERS = frozenset("a an the two three four five several some many".split())
LEADING_WINDOW = 6  # the leading noun phrase is looked for in the caption's first words
MIN_SUPPORT = 0.1  # concept probability a decoder noun needs to be trusted as the subject
RARE_WORD_WEIGHT = 0.5  # a concept word outside the model's vocabulary counts half
HEDGE = 0.5  # a word is said when it is more likely right than wrong


def noun_form(token: str, object_words: set[str]) -> str | None:
    """The object word a token is, singular ("dogs" -> "dog"); None when it is none."""
    singulars = sorted(s for s in _singulars(token) if s != token and s in object_words)
    if singulars:
        return singulars[0]
    return token if token in object_words else None


def leading_phrase(tokens: Sequence[str], object_words: set[str]) -> list[str]:
    """A caption's leading noun phrase up to its head noun ("two white dogs are ..." -> ["two",
    "white", "dogs"]); [] when the caption starts without one ("a is is on ...")."""
    for n, token in enumerate(tokens[:LEADING_WINDOW]):
        if token in PHRASE_BREAKERS and token != "and":
            return []
        if token == "and" and n > 0 and n + 1 < len(tokens) and tokens[n + 1] in DETERMINERS:
            # "a man and a woman": two noun phrases; "a smiling and a camera": the first has
            # no noun, so the caption has no subject ("black and white" goes on as one)
            return []
        if noun_form(token, object_words) is not None:
            return list(tokens[: n + 1])
    return []


def leading_noun(tokens: Sequence[str], object_words: set[str]) -> str | None:
    """The head noun of a caption's leading noun phrase, singular ("two dogs are ..." ->
    "dog"); None when there is none."""
    phrase = leading_phrase(tokens, object_words)
    return noun_form(phrase[-1], object_words) if phrase else None


def with_article(noun: str) -> list[str]:
    return ["an" if noun[:1] in "aeiou" else "a", noun]


def short_description(
    tokens: Sequence[str],
    concepts: Sequence[tuple[str, float]],
    object_words: set[str],
    support: Callable[[str], float],
    everyday: set[str] | None = None,
    hedges: Sequence[tuple[str, float, int]] = (),
) -> list[str] | None:
    """["a", "cat"] for an out-of-domain photo, the first of:

    1. the decoder's leading noun when ``support`` (the concepts' probability for a word)
       backs it: its own everyday word for what the concepts see;
    2. the best concept (words in ``everyday``, the model's vocabulary, preferred) when it is
       more likely right than wrong (probability >= ``HEDGE``);
    3. hedging (Deng et al. 2012, "Hedging your bets"): the most specific of ``hedges``
       (word, probability summed over the classes it names, how many classes) that is more
       likely right than wrong: "a flower" when no one flower class is sure, "an animal"
       when no one kind is;
    4. the best concept, however unsure; with none listed, the most probable of ``hedges``.
    None when there is nothing to say."""
    noun = leading_noun(tokens, object_words)
    if noun is not None and support(noun) >= MIN_SUPPORT:
        return with_article(noun)
    everyday = everyday or set()
    best = None
    if concepts:
        # an everyday word (one the caption model knows) is worth twice a rare one: "a boat"
        # reads better than "a watercraft" and is as often right
        best = max(concepts, key=lambda c: c[1] * (1.0 if c[0] in everyday else RARE_WORD_WEIGHT))
        if best[1] >= HEDGE:
            return with_article(best[0])
    likely = [(n_classes, -p, word) for word, p, n_classes in hedges if p >= HEDGE and n_classes]
    if likely:
        return with_article(min(likely)[2])
    if best is not None:
        return with_article(best[0])
    # no concept listed at all: the word the classes support most, however little
    backed = [(p, word) for word, p, n_classes in hedges if n_classes and p > 0]
    return with_article(max(backed)[1]) if backed else None
