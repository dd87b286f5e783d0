"""Word-level vocabulary with the special tokens the decoder needs, saved as JSON."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioner.errors import VocabularyError
from captioner.io import atomic_write_json, read_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # PAD must be id 0: masks and embeddings rely on it

_NON_WORD = re.compile(r"[^a-z0-9' ]+")


def tokenize(caption: str) -> list[str]:
    """Lowercase, drop punctuation, split on whitespace (the Karpathy-JSON convention)."""
    text = _NON_WORD.sub(" ", caption.lower().replace("'", ""))
    return text.split()


class Vocabulary:
    """Maps words to ids and back; ids 0..3 are ``<pad> <start> <end> <unk>``."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise VocabularyError(f"a vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(words)) != len(words):
            raise VocabularyError("a vocabulary has duplicate words")
        self.itos: list[str] = list(words)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    @classmethod
    def build(
        cls, captions: Iterable[str], num_words: int | None = 5000, min_count: int = 1
    ) -> Vocabulary:
        """Keep the ``num_words`` most frequent words seen at least ``min_count`` times."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        for token in SPECIAL_TOKENS:
            counts.pop(token, None)
        # frequency first, then alphabetical: the same data always gives the same ids
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        if num_words is not None:
            ranked = ranked[: max(0, num_words)]
        return cls([*SPECIAL_TOKENS, *ranked])

    def encode(self, caption: str, add_special: bool = True) -> list[int]:
        ids = [self.stoi.get(word, self.unk_id) for word in tokenize(caption)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode_ids(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<end>``, without ``<start>``/``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise VocabularyError(
                    f"token id {i} is out of range for a vocabulary of {len(self)}"
                )
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i])
        return words

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.decode_ids(ids))

    def to_json(self) -> dict:
        return {"special_tokens": list(SPECIAL_TOKENS), "itos": self.itos}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"vocabulary file not found: {path}")
        try:
            data = read_json(path)
            return cls(data["itos"])
        except VocabularyError as exc:
            raise VocabularyError(f"{path}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise VocabularyError(f"{path}: not a captioner vocabulary ({exc})") from exc
