"""Generate src/captioner/features/imagenet_concepts.json: the encoder head's 1000 ImageNet classes
as everyday words, from timm's class list and WordNet 3.0.

    pip download --no-deps -d /tmp/timm timm   # then unzip timm/data/_info/imagenet_syn*.txt
    apt-get install -y wordnet-base wordnet-sense-index
    python scripts/make_imagenet_concepts.py --timm-info /tmp/timm/timm/data/_info

Inputs: timm's ``imagenet_synsets.txt`` (the 1000 wnids in classifier order, i.e. sorted) and
``imagenet_synset_to_lemma.txt`` (wnid -> lemma text; the first lemma is the class ``name``);
WordNet 3.0's ``data.noun`` (hypernyms ``@`` and instance hypernyms ``@i``; noun offsets are the
ImageNet ids) and ``index.sense`` (per-sense SemCor tag counts). Every ``data.*`` file's glosses
give a second familiarity signal, because SemCor is small (canoe, motorcycle and moped have no
tagged occurrence at all).

The rule (no per-class typing):

* A *name* is a single-word lemma (letters, at most one hyphen) that does not merely clip the
  synset's preferred compound name ("toy" of "toy_dog", "grand" of "grand_piano"). Display words
  are lower-cased.
* ``tag(w, s)``: SemCor tag count of lemma w in synset s (index.sense). ``gloss(w)``: number of
  WordNet glosses (all parts of speech) that contain w or a simple plural of it.
* ``familiar(w, s, g)``: ``tag(w, s) >= 1`` or ``gloss(w) >= g``: attested in that sense in
  SemCor, or common enough that WordNet uses it to define other things.
* ``words`` of a class, most specific first (1 or 2):
  1. the class's own first name that is ``familiar(.., GLOSS_OWN)`` (canoe, daisy, ladybug; not
     tabby 0, espresso 4);
  2. walking the hypernyms breadth-first (nearest first, never entering ``STOP`` or ``GENERAL``
     synsets), the nearest synset with a name ``familiar(.., GLOSS_ANCESTOR)`` gives its most
     familiar one (highest tag count, then gloss count): tabby -> cat, canoe -> boat,
     moped -> motorcycle, golden retriever -> dog, espresso -> coffee;
  3. nothing found: the head noun of the preferred name ("saltshaker").
  The ancestor threshold is higher than the own one because technical definer's terms (teleost
  8, placental 9) must not win over the everyday word above them (fish, mammal).
* ``ancestors``: every single-word lemma (lower-cased) of the class and of all its hypernyms, up to
  and excluding the ``STOP`` synsets (entity, object, whole, artifact, organism, ...), nearest
  first; a caption model's vocabulary is matched against these.

Known limits of the rule (looked at in the full output, ``--show``): a breed's nearest familiar
ancestor may be an intermediate group (Yorkshire terrier -> terrier, not dog), and a few groups are
zoological (carnivore for badger, ruminant for bison). No per-class override table: WordNet has an
everyday sense for every class, the rule just stops at the nearest one.

``GENERAL`` lists synsets that WordNet's glosses use a lot but that do not name what a photo shows
(device, container, equipment, ...): they stay in ``ancestors`` but never become display words."""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "captioner" / "features" / "imagenet_concepts.json"
TIMM_INFO = Path("/tmp/timm/timm/data/_info")  # after unzipping the wheel in /tmp/timm
WORDNET = Path("/usr/share/wordnet")

# gloss counts: canoe 19, ladybug 7, daisy 11, espresso 4, tabby 0; teleost 8, placental 9
GLOSS_OWN = 5  # the class's own name: it is exactly what the photo shows
GLOSS_ANCESTOR = 12  # a broader word must be familiar, not just a definer's term

# (offset, first lemma): checked against data.noun so a typo fails loudly
STOP = {
    ("00001740", "entity"),
    ("00001930", "physical_entity"),
    ("00002137", "abstraction"),
    ("00002684", "object"),
    ("00003553", "whole"),
    ("00004258", "living_thing"),
    ("00004475", "organism"),
    ("00007347", "causal_agent"),
    ("00019613", "substance"),
    ("00020090", "substance"),
    ("00020827", "matter"),
    ("00021939", "artifact"),
    ("00031921", "relation"),
    ("03575240", "instrumentality"),
    ("13809207", "part"),
}
GENERAL = {
    ("03076708", "commodity"),
    ("03093574", "consumer_goods"),
    ("03094503", "container"),
    ("03122748", "covering"),
    ("03129123", "creation"),
    ("03183080", "device"),
    ("03294048", "equipment"),
    ("03563967", "implement"),
    ("04081844", "restraint"),
    ("04341686", "structure"),
    ("04377057", "system"),
    ("07570720", "nutriment"),
}

WORD = re.compile(r"[A-Za-z]+(-[A-Za-z]+)?")


class Synset:
    __slots__ = ("lemmas", "hypernyms")

    def __init__(self, lemmas: list[str], hypernyms: list[str]):
        self.lemmas = lemmas
        self.hypernyms = hypernyms


def read_nouns(wordnet: Path) -> dict[str, Synset]:
    """data.noun -> {offset: Synset}; only the fields this script needs."""
    synsets = {}
    with open(wordnet / "data.noun", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" ")
            count = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i] for i in range(count)]
            i = 4 + 2 * count
            hypernyms = []
            for _ in range(int(fields[i])):
                symbol, offset, pos = fields[i + 1 : i + 4]
                i += 4
                if symbol in ("@", "@i") and pos == "n":
                    hypernyms.append(offset)
            synsets[fields[0]] = Synset(lemmas, hypernyms)
    return synsets


def read_senses(wordnet: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """index.sense -> {(lemma, noun offset): (sense number, SemCor tag count)}."""
    senses = {}
    with open(wordnet / "index.sense", encoding="utf-8") as handle:
        for line in handle:
            key, offset, sense, tag = line.split()
            lemma, rest = key.split("%")
            if rest.startswith("1"):  # ss_type 1 = noun
                senses[(lemma, offset)] = (int(sense), int(tag))
    return senses


def read_gloss_counts(wordnet: Path) -> collections.Counter[str]:
    """How many WordNet glosses (all parts of speech) contain each lower-case word."""
    counts: collections.Counter[str] = collections.Counter()
    for pos in ("noun", "verb", "adj", "adv"):
        with open(wordnet / f"data.{pos}", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("  ") or " | " not in line:
                    continue
                counts.update(set(re.findall(r"[a-z]+", line.split(" | ", 1)[1].lower())))
    return counts


class Rule:
    """The everyday-word rule of the module docstring over one WordNet."""

    def __init__(self, wordnet: Path):
        self.synsets = read_nouns(wordnet)
        self.senses = read_senses(wordnet)
        self.glosses = read_gloss_counts(wordnet)
        for offset, lemma in STOP | GENERAL:
            found = self.synsets.get(offset)
            if found is None or found.lemmas[0].lower() != lemma:
                raise SystemExit(
                    f"error: WordNet synset {offset} is not {lemma!r}: not WordNet 3.0?"
                )
        self.stop = {offset for offset, _ in STOP}
        self.general = {offset for offset, _ in GENERAL}

    def tag(self, lemma: str, offset: str) -> int:
        return self.senses.get((lemma.lower(), offset), (0, 0))[1]

    def gloss(self, word: str) -> int:
        word = word.lower()
        plurals = [word, word + "s", word + "es"]
        if word.endswith("y"):
            plurals.append(word[:-1] + "ies")
        return sum(self.glosses[w] for w in plurals)

    def familiar(self, lemma: str, offset: str, gloss_min: int) -> bool:
        return self.tag(lemma, offset) >= 1 or self.gloss(lemma) >= gloss_min

    def hypernyms(self, offset: str, skip: set[str]) -> list[str]:
        """The synset and its hypernyms breadth-first (nearest first), not entering ``skip``."""
        order, queue, seen = [], [offset], {offset}
        while queue:
            current = queue.pop(0)
            order.append(current)
            for parent in self.synsets[current].hypernyms:
                if parent not in seen and parent not in skip:
                    seen.add(parent)
                    queue.append(parent)
        return order

    def singles(self, offset: str) -> list[str]:
        return [lemma for lemma in self.synsets[offset].lemmas if WORD.fullmatch(lemma)]

    def names(self, offset: str) -> list[str]:
        """Single-word lemmas that do not clip the preferred name ("toy" of "toy_dog")."""
        first = self.synsets[offset].lemmas[0].lower()
        return [
            lemma for lemma in self.singles(offset) if not first.startswith(lemma.lower() + "_")
        ]

    def best(self, offset: str, test) -> str | None:
        """The most familiar single-word lemma of a synset that passes ``test``."""
        found = [
            (self.tag(lemma, offset), self.gloss(lemma), -i, lemma.lower())
            for i, lemma in enumerate(self.names(offset))
            if test(lemma, offset)
        ]
        return max(found)[3] if found else None

    def words(self, offset: str) -> list[str]:
        own = [
            lemma.lower() for lemma in self.names(offset) if self.familiar(lemma, offset, GLOSS_OWN)
        ]
        words = own[:1]
        for parent in self.hypernyms(offset, self.stop | self.general)[1:]:
            word = self.best(parent, lambda w, s: self.familiar(w, s, GLOSS_ANCESTOR))
            if word is not None:
                words.append(word)
                break
        if not words:  # nothing familiar: the head noun of the name ("saltshaker")
            words.append(self.synsets[offset].lemmas[0].split("_")[-1].lower())
        return list(dict.fromkeys(words))

    def ancestors(self, offset: str) -> list[str]:
        found = [
            lemma.lower() for s in self.hypernyms(offset, self.stop) for lemma in self.singles(s)
        ]
        return list(dict.fromkeys(found))


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found (see this script's docstring for where it comes from)"
        )
    return path.read_text(encoding="utf-8").splitlines()


def build(timm_info: Path, wordnet: Path, timm_version: str) -> dict:
    wnids = [
        line.strip() for line in read_lines(timm_info / "imagenet_synsets.txt") if line.strip()
    ]
    lemma_text = dict(
        line.split("\t", 1) for line in read_lines(timm_info / "imagenet_synset_to_lemma.txt")
    )
    if len(wnids) != 1000 or len(set(wnids)) != 1000 or wnids != sorted(wnids):
        raise SystemExit("error: imagenet_synsets.txt is not the 1000 sorted ILSVRC-2012 wnids")
    for name in ("data.noun", "index.sense", "data.verb", "data.adj", "data.adv"):
        if not (wordnet / name).is_file():
            raise SystemExit(
                f"error: {wordnet / name} not found "
                "(apt-get install wordnet-base wordnet-sense-index)"
            )
    rule = Rule(wordnet)
    classes = []
    for wnid in wnids:
        offset = wnid[1:]
        if offset not in rule.synsets or wnid not in lemma_text:
            raise SystemExit(f"error: {wnid} is not in WordNet 3.0 or timm's lemma list")
        name = lemma_text[wnid].split(",")[0].strip()
        if name.replace(" ", "_") != rule.synsets[offset].lemmas[0]:
            raise SystemExit(f"error: {wnid}: timm calls it {name!r}, WordNet does not")
        classes.append(
            {
                "wnid": wnid,
                "name": name,
                "words": rule.words(offset),
                "ancestors": rule.ancestors(offset),
            }
        )
    return {
        "source": {
            "classes": f"timm {timm_version} data/_info/imagenet_synsets.txt (ILSVRC-2012 order)",
            "names": f"timm {timm_version} data/_info/imagenet_synset_to_lemma.txt",
            "wordnet": "WordNet 3.0 (Debian wordnet-base, wordnet-sense-index)",
            "script": "scripts/make_imagenet_concepts.py",
            "rule": {"gloss_own": GLOSS_OWN, "gloss_ancestor": GLOSS_ANCESTOR},
        },
        "classes": classes,
    }


def show(data: dict, sample: int) -> None:
    """Statistics and a random sample, for choosing the thresholds by eye."""
    classes = data["classes"]
    lengths = collections.Counter(len(c["words"]) for c in classes)
    print("words per class:", dict(sorted(lengths.items())))
    first = collections.Counter(c["words"][0] for c in classes if c["words"])
    last = collections.Counter(c["words"][-1] for c in classes if c["words"])
    print("distinct display words:", len({w for c in classes for w in c["words"]}))
    print("most common first words:", first.most_common(25))
    print("most common last words:", last.most_common(40))
    print("no words:", [c["name"] for c in classes if not c["words"]])
    for c in random.Random(0).sample(classes, sample):
        print(f"  {c['wnid']} {c['name']:30s} {c['words']}  | {' '.join(c['ancestors'][:8])}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timm-info", type=Path, default=TIMM_INFO, help="timm's data/_info")
    parser.add_argument("--timm-version", default="1.0.31", help="version of that timm wheel")
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="WordNet 3.0 dict folder")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON to write")
    parser.add_argument("--show", type=int, default=50, help="print stats and N random classes")
    parser.add_argument("--wnid", action="append", default=[], help="also print these classes")
    args = parser.parse_args()

    data = build(args.timm_info, args.wordnet, args.timm_version)
    if args.show:
        show(data, args.show)
    for c in data["classes"]:
        if c["wnid"] in args.wnid:
            print(f"  {c['wnid']} {c['name']:30s} {c['words']}  | {' '.join(c['ancestors'])}")

    sys.path.insert(0, str(REPO / "src"))
    from captioner.io import atomic_write_text

    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    atomic_write_text(args.out, text + "\n")
    print(f"wrote {args.out} ({len(text) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
