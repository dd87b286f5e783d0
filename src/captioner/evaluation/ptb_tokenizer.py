"""Caption tokenization as coco-caption does it: Stanford PTBTokenizer (Java) with punctuation
removed, and a pure-Python stand-in that mimics it where Java is missing.

Split out of metrics.py, which scores the tokens. The Java tokenizer runs with its input file in
a temp dir of ours (pycocoevalcap writes it inside the installed package, so a killed run left
captions there), under a timeout, and its output is checked line for line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from captioner.errors import CaptionerError

#: Seconds the Java tokenizer may take (plus a per-caption allowance) before it is stopped.
PTB_TIMEOUT_S = 600.0
PTB_TIMEOUT_PER_CAPTION_S = 0.05

_PTB_JAR = _ptb_module.STANFORD_CORENLP_3_4_1_JAR
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
_PUNCTUATION = frozenset(PUNCTUATIONS)  # the exact list coco-caption drops after PTB tokenizing


# PTB turns brackets into these codes; with -lowerCase they become lowercase and so survive
# coco-caption's punctuation filter (which lists the uppercase forms). Mimicked on purpose.
_BRACKETS = {
    "(": "-lrb-",
    ")": "-rrb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "{": "-lcb-",
    "}": "-rcb-",
}
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc prof gen capt lt sgt mt ft ave inc co ltd corp no".split()
)
_CLITIC_NT = re.compile(r"(\w)(n't)\b", re.IGNORECASE)
_CLITIC_OTHER = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b", re.IGNORECASE)
_SPLIT_WORDS = {  # PTB splits these fused forms in two
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
}
_TOKEN = re.compile(
    r"""
      \.\.\.+                                  # ellipsis
    | --+                                      # dashes
    | n't\b | '(?:s|re|ve|ll|d|m)\b | 'n'(?!\w) # clitics split off by the rules above
    | [^\W\d_](?:\.[^\W\d_])+\.                # acronyms: u.s.a. p.m.
    | \d+(?:[.,:/]\d+)+                        # numbers with separators: 3.5 1,000 10:30 1/2
    | <[^<>\s]+>                               # SGML-like tags stay whole: <unk>
    | (?-i:[A-Z]+&[A-Z]+)                      # AT&T (but "at&t" splits, as in PTB)
    | @?\w+(?:[-'/.]\w+)*\.?                   # words: black-and-white 3-year-old 4x4 dog.
    | \S                                       # any other symbol on its own
    """,
    re.VERBOSE | re.IGNORECASE,
)


def ptb_like_tokenize(text: str) -> str:
    """Tokenize one caption the way coco-caption's PTBTokenizer + punctuation filter would.

    Pure-Python stand-in used when Java is missing: splits clitics ("doesn't" -> "does n't"),
    keeps hyphenated words, numbers, acronyms and one-letter abbreviations whole, maps brackets
    to PTB codes, lowercases, and drops the same punctuation tokens coco-caption drops. It
    matched the Java tokenizer on all 40,460 Flickr8k captions when written; rarer text such
    as URLs can still differ slightly.
    """
    text = _CLITIC_NT.sub(r"\1 \2", " ".join(text.split()))
    text = _CLITIC_OTHER.sub(r"\1 \2", text)
    tokens: list[str] = []
    for raw in _TOKEN.findall(text):
        token = raw.lower()
        if token.endswith(".") and len(token) > 1 and not token.startswith("."):
            stem = token[:-1]
            # PTB keeps the period of acronyms, single letters and known abbreviations.
            if "." not in stem and len(stem) > 1 and stem.lstrip("@") not in _ABBREVIATIONS:
                token = stem
        token = _BRACKETS.get(token, token)
        if token in ('"', "'"):  # PTB rewrites quotes to `` / '' / ` / ', all dropped below
            continue
        if token in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[token].split())
        elif token not in _PUNCTUATION:
            tokens.append(token)
    return " ".join(tokens)


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (needed for PTBTokenizer and METEOR)."""
    return shutil.which("java") is not None


def sanitize(text: str) -> str:
    """Collapse all whitespace (incl. newlines) and drop '|||', which break the Java tools.

    PTBTokenizer is line-oriented and METEOR's stdio protocol uses newlines and ' ||| ' as
    separators: a caption containing either would desynchronise them (wrong scores or a hang).
    """
    while "|||" in text:
        text = text.replace("|||", " ")
    return " ".join(text.split())


def _ptb_tokenize(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """``PTBTokenizer().tokenize`` (same Java command and output), with its input file in a temp
    dir of ours: pycocoevalcap writes it inside the installed package, so a killed run left
    captions there."""
    keys = [key for key, caps in captions.items() for _ in caps]
    sentences = "\n".join(c.replace("\n", " ") for caps in captions.values() for c in caps)
    jar = os.path.join(os.path.dirname(os.path.abspath(_ptb_module.__file__)), _PTB_JAR)
    timeout = PTB_TIMEOUT_S + PTB_TIMEOUT_PER_CAPTION_S * len(keys)
    with tempfile.TemporaryDirectory(prefix="captioner-ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "wb") as handle:
            handle.write(sentences.encode())
        command = ["java", "-cp", jar, _PTB_CLASS, "-preserveLines", "-lowerCase", path]
        try:
            done = subprocess.run(
                command, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise CaptionerError(f"PTBTokenizer (Java) took over {timeout:.0f} s") from exc
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise CaptionerError(f"PTBTokenizer (Java) exited with {done.returncode}: {why[0]}")
    result: dict[Any, list[str]] = {}
    for key, line in zip(keys, done.stdout.decode().split("\n"), strict=False):
        words = [w for w in line.rstrip().split(" ") if w not in _PUNCTUATION]
        result.setdefault(key, []).append(" ".join(words))
    return result


def tokenize_java(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """Tokenize with coco-caption's Stanford PTBTokenizer; raise if its output is misaligned."""
    result = _ptb_tokenize(captions)
    # PTBTokenizer zips output lines with ids and silently truncates on failure (e.g. a broken
    # java, or a trailing empty caption): verify shape and pad trailing empties ourselves.
    out: dict[Any, list[str]] = {}
    for key, caps in captions.items():
        got = list(result.get(key, []))
        if len(got) < len(caps):
            missing = caps[len(got) :]
            if any(sanitize(c) for c in missing):
                raise CaptionerError("PTBTokenizer (Java) returned fewer lines than captions")
            got += [""] * len(missing)
        out[key] = got
    return out


def tokenize_python(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """``ptb_like_tokenize`` over every caption, in the shape ``tokenize_java`` returns."""
    return {key: [ptb_like_tokenize(c) for c in caps] for key, caps in captions.items()}
