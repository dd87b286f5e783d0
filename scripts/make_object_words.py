"""Generate src/captioner/features/object_words.json: English nouns that name things one can see
in a photo (people, animals, plants, artefacts, food, natural objects, substances, places, body
parts), from WordNet 3.0.

    apt-get install -y wordnet-base
    python scripts/make_object_words.py

Why: out of domain, grounding penalises the object words the encoder's concepts do not name
(the CHAIR metric's "hallucinated objects", Rohrbach et al. 2018, counts exactly such words).
Penalising every word would leave a caption of function words, so the penalty needs to know
which words name objects; WordNet's lexicographer files say so for every noun sense.

Rule: a single-word lemma is an object word when one of its TOP_SENSES most frequent noun senses
(index.noun lists them by SemCor frequency) lies in one of OBJECT_FILES, and the lemma has no
more frequent use as a verb, adjective or adverb by the same SemCor counts (so "standing",
"black", "running" are not object words, "man", "water", "beach" are). No word is listed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parents[1] / "src" / "captioner" / "features" / "object_words.json"
# lexicographer file numbers (WordNet's lexnames): noun.animal 05, noun.artifact 06,
# noun.body 08, noun.food 13, noun.group 14 (people, crowd, herd), noun.location 15,
# noun.object 17, noun.person 18, noun.phenomenon 19 (snow, wave, fire), noun.plant 20,
# noun.substance 27
OBJECT_FILES = {
    5: "animal",
    6: "artifact",
    8: "body",
    13: "food",
    14: "group",
    15: "location",
    17: "object",
    18: "person",
    19: "phenomenon",
    20: "plant",
    27: "substance",
}
TOP_SENSES = 2  # "table" is data first, furniture second


def read_index(path: Path) -> dict[str, list[str]]:
    """lemma -> synset offsets in sense-frequency order, for single-word lemmas."""
    senses = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" ") or not line.strip():
            continue  # licence header
        parts = line.split()
        lemma, p_cnt = parts[0], int(parts[3])
        offsets = parts[4 + p_cnt + 2 :]
        if "_" not in lemma and lemma.isalpha() and len(lemma) > 1:
            senses[lemma] = offsets
    return senses


def tag_counts(path: Path) -> dict[tuple[str, str], int]:
    """(lemma, pos digit) -> summed SemCor tag count over its senses, from index.sense."""
    counts: dict[tuple[str, str], int] = {}
    if not path.is_file():
        return counts
    for line in path.read_text(encoding="latin-1").splitlines():
        key, _offset, _num, cnt = line.split()
        lemma, rest = key.split("%", 1)
        pos = rest[0]  # 1 noun, 2 verb, 3 adjective, 4 adverb, 5 adjective satellite
        pos = "3" if pos == "5" else pos
        counts[(lemma, pos)] = counts.get((lemma, pos), 0) + int(cnt)
    return counts


def lexfile(data_noun: Path) -> dict[str, int]:
    """synset offset -> lexicographer file number, for every noun synset."""
    files = {}
    for line in data_noun.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        offset, lex, *_ = line.split(" ", 2)
        files[offset] = int(lex)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="WordNet 3.0 dict folder")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON to write")
    args = parser.parse_args()
    for name in ("index.noun", "data.noun", "index.verb", "index.adj"):
        if not (args.wordnet / name).is_file():
            sys.exit(f"error: {args.wordnet / name} not found (apt-get install wordnet-base)")
    nouns = read_index(args.wordnet / "index.noun")
    files = lexfile(args.wordnet / "data.noun")
    counts = tag_counts(args.wordnet / "index.sense")
    words: dict[str, str] = {}
    for lemma, offsets in nouns.items():
        kinds = [OBJECT_FILES.get(files.get(o, -1)) for o in offsets[:TOP_SENSES]]
        kind = next((k for k in kinds if k is not None), None)
        if kind is None:
            continue
        noun_uses = counts.get((lemma, "1"), 0)
        other_uses = max(counts.get((lemma, p), 0) for p in "234")
        if other_uses > noun_uses:
            continue
        words[lemma] = kind
    data = {
        "source": {
            "wordnet": "WordNet 3.0 (Debian wordnet-base)",
            "script": "scripts/make_object_words.py",
            "rule": "first noun sense in an object lexicographer file; not more used as "
            "another part of speech (SemCor counts)",
        },
        "words": {
            kind: sorted(w for w, k in words.items() if k == kind)
            for kind in sorted(set(OBJECT_FILES.values()))
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, separators=(",", ":"))
    os.replace(tmp, args.out)
    by_kind: dict[str, int] = {}
    for kind in words.values():
        by_kind[kind] = by_kind.get(kind, 0) + 1
    print(f"wrote {len(words)} object words to {args.out}: {by_kind}")


if __name__ == "__main__":
    main()
