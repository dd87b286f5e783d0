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

# How the word lists were chosen: every word seen >= 5 times in Flickr8k's captions.txt (2,977
# words) was read through and the nouns that name a person (people in general, ages and family
# roles, and the activity or job nouns Flickr8k uses for the person doing it: "surfer", "rider")
# were kept. Left out on purpose: pronouns ("he", "her", "his": Flickr8k uses them for dogs too,
# "a dog carries his toy"), "male"/"female" ("a male weimaraner"), "boxer" (a fighter or a dog
# breed), "jumper" (a person or a sweater), and group nouns that are as often dogs ("couple",
# "group", "team", "family"). A few inflections absent from that vocabulary are added (marked).
PERSON_WORDS: frozenset[str] = frozenset(
    """
    man men woman women person people persons guy guys lady ladies gentleman human humans
    individual individuals someone somebody adult adults mans crowd crowds audience spectators
    onlookers pedestrian pedestrians tourists passengers fans
    boy boys girl girls child children kid kids baby babies toddler toddlers infant teenager
    teenagers teen teens youth
    mother father mom dad daughter son brother sister parent parents bride groom bridesmaids
    groomsmen friend friends teammate peers member members owner owners
    player players skateboarder skateboarders snowboarder snowboarders surfer surfers rider riders
    biker bikers skier skiers skiiers climber climbers hiker hikers cyclist cyclists bicyclist
    bicyclists bicycler motorcyclist motorcyclists racer racers runner runners goalie wrestler
    wrestlers referee skater skaters driver photographer photographers policeman policemen officer
    officers cop kayaker kayakers swimmer swimmers cheerleader cheerleaders catcher pitcher batter
    batsman bowler rollerblader worker workers musician musicians artist artists singer guitarist
    drummer dancer dancers performer performers diver jockey jockeys waterskier fisherman vendor
    trainer wakeboarder footballer footballers backpacker jogger windsurfer firefighter fireman
    soldier sailor cowboy cowboys cowgirl clown clowns instructor teacher waiter priest athlete
    athletes gymnast quarterback baseman mountaineer surfboarder boarder cameraman fencers defenders
    opponent viewer student students santa pirate pirates ninja dj rival
    """.split()
)  # "persons", "humans" are the added inflections

# The same reading for dogs: "dog(s)", "puppy/puppies" and the breed names Flickr8k uses as nouns
# ("a black lab", "a german shepherd"). "boxer" is left out (see above).
DOG_WORDS: frozenset[str] = frozenset(
    """
    dog dogs puppy puppies pup pups doggy canine retriever terrier terriers collie greyhound
    greyhounds shepherd shephard poodle poodles husky labrador lab dalmatian dalmation doberman
    rottweiler pitbull beagle dachshund bulldog pug pugs corgi sheltie hound
    """.split()
)  # "pup", "pups", "doggy", "canine" are the added words


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
