"""Standard caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) computed with pycocoevalcap.

Scores are returned on the 0-100 scale used in captioning papers. Tokenization follows the
coco-caption protocol: Stanford PTBTokenizer (Java) with punctuation removed. When Java is not
available a pure-Python tokenizer that mimics it is used instead and METEOR (which is a Java
program) is reported as ``None`` ("unavailable") rather than a misleading 0.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from captioner.errors import CaptionerError, DataError

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "METEOR",
    "ROUGE-L",
    "CIDEr-D",
)

#: Seconds METEOR may take before its Java process is killed (plus a per-image allowance), so a
#: wedged subprocess can never hang an evaluation forever; PTB_TIMEOUT_S is the tokenizer's.
METEOR_TIMEOUT_S = 120.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.05
PTB_TIMEOUT_S = 600.0

_PTB_JAR = _ptb_module.STANFORD_CORENLP_3_4_1_JAR
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
_PUNCTUATION = frozenset(PUNCTUATIONS)  # the exact list coco-caption drops after PTB tokenizing


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------

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


def _sanitize(text: str) -> str:
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
    timeout = PTB_TIMEOUT_S + METEOR_TIMEOUT_PER_IMAGE_S * len(keys)
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


def _tokenize_java(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    """Tokenize with coco-caption's Stanford PTBTokenizer; raise if its output is misaligned."""
    result = _ptb_tokenize(captions)
    # PTBTokenizer zips output lines with ids and silently truncates on failure (e.g. a broken
    # java, or a trailing empty caption): verify shape and pad trailing empties ourselves.
    out: dict[Any, list[str]] = {}
    for key, caps in captions.items():
        got = list(result.get(key, []))
        if len(got) < len(caps):
            missing = caps[len(got) :]
            if any(_sanitize(c) for c in missing):
                raise CaptionerError("PTBTokenizer (Java) returned fewer lines than captions")
            got += [""] * len(missing)
        out[key] = got
    return out


def _tokenize_python(captions: dict[Any, list[str]]) -> dict[Any, list[str]]:
    return {key: [ptb_like_tokenize(c) for c in caps] for key, caps in captions.items()}


# --------------------------------------------------------------------------------------------
# METEOR process management
# --------------------------------------------------------------------------------------------


class _ManagedMeteor(Meteor):
    """pycocoevalcap's Meteor with a safe lifecycle.

    The upstream class leaves stderr as an unread pipe (a chatty JVM can fill it and block),
    and its ``__del__`` takes a lock that is never released if scoring raised midway, which
    deadlocks garbage collection. Here stderr goes to DEVNULL and ``close()`` (also used by
    ``__del__``) is idempotent and never touches the upstream lock.
    """

    def __init__(self) -> None:  # deliberately does not call Meteor.__init__ (see above)
        self.meteor_cmd = [
            "java",
            "-jar",
            "-Xmx2G",
            _meteor_module.METEOR_JAR,
            "-",
            "-",
            "-stdio",
            "-l",
            "en",
            "-norm",
        ]
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd,
            cwd=os.path.dirname(os.path.abspath(_meteor_module.__file__)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lock = threading.Lock()
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def closed(self) -> bool:
        """True once close() ran (explicitly, at exit, or from the timeout watchdog)."""
        return getattr(self, "_closed", True)

    def close(self) -> None:
        """Kill the Java process and release its pipes; safe to call more than once."""
        close_lock = getattr(self, "_close_lock", None)
        if close_lock is None:  # __init__ failed before the process existed
            return
        with close_lock:  # a concurrent caller (e.g. the watchdog) waits for the kill to finish
            if self._closed:
                return
            self._closed = True
            proc = self.meteor_p
            with contextlib.suppress(Exception):
                if proc.stdin:
                    proc.stdin.close()
            with contextlib.suppress(Exception):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            with contextlib.suppress(Exception):
                if proc.stdout:
                    proc.stdout.close()

    def __del__(self) -> None:
        self.close()


_meteor_lock = threading.Lock()  # one scoring at a time on the shared process
_meteor: _ManagedMeteor | None = None


def close_meteor() -> None:
    """Stop the shared METEOR Java process (also done automatically at interpreter exit)."""
    global _meteor
    with _meteor_lock:
        if _meteor is not None:
            _meteor.close()
            _meteor = None


atexit.register(close_meteor)


def _meteor_score(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float | None:
    """METEOR in [0, 1], or None (with a logged warning) if the Java process fails or stalls.

    The Java process loads a ~60 MB paraphrase table at start (seconds to tens of seconds),
    so it is started once and reused by later calls (e.g. evaluation every epoch). Any
    failure discards it; the next call starts a fresh one.
    """
    global _meteor
    # Meteor's stdio protocol cannot carry empty segments reliably; a lone space is harmless.
    gts = {k: [r or " " for r in refs] for k, refs in gts.items()}
    res = {k: [h or " " for h in hyps] for k, hyps in res.items()}
    with _meteor_lock:
        if _meteor is None or _meteor.closed or _meteor.meteor_p.poll() is not None:
            try:
                _meteor = _ManagedMeteor()
            except OSError as exc:
                _meteor = None
                logger.warning("METEOR unavailable: could not start java (%s)", exc)
                return None
        meteor = _meteor
        timeout = METEOR_TIMEOUT_S + METEOR_TIMEOUT_PER_IMAGE_S * len(res)
        watchdog = threading.Timer(timeout, meteor.close)  # killing java unblocks readline
        watchdog.daemon = True
        watchdog.start()
        try:
            score, _ = meteor.compute_score(gts, res)
            return float(score)
        except Exception as exc:  # any failure of the Java side means "unavailable"
            reason = "timed out" if meteor.closed else f"failed ({type(exc).__name__}: {exc})"
            logger.warning("METEOR unavailable: the Java scorer %s", reason)
            meteor.close()  # its protocol state (and upstream lock) is unknown now: discard
            _meteor = None
            return None
        finally:
            watchdog.cancel()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _validate(
    references: Mapping[str, list[str]], predictions: Mapping[str, str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Check shapes up front so pycocoevalcap's bare asserts never fire on user data."""
    if not predictions:
        raise DataError("no predictions to score (predictions is empty)")
    if not references:
        raise DataError("no references to score against (references is empty)")
    missing = [image for image in predictions if image not in references]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} prediction(s) have no reference captions: {shown}{more}")
    refs: dict[str, list[str]] = {}
    preds: dict[str, str] = {}
    for image, caption in predictions.items():
        if not isinstance(caption, str):
            raise DataError(
                f"prediction for {image!r} must be a string, got {type(caption).__name__}"
            )
        image_refs = references[image]
        if isinstance(image_refs, str) or not all(isinstance(r, str) for r in image_refs):
            raise DataError(f"references for {image!r} must be a list of strings")
        if len(image_refs) == 0:
            raise DataError(f"image {image!r} has an empty list of reference captions")
        preds[image] = _sanitize(caption)
        refs[image] = [_sanitize(r) for r in image_refs]
    return refs, preds


def score_captions(
    references: Mapping[str, list[str]],
    predictions: Mapping[str, str],
    use_java: bool | None = None,
) -> dict[str, float | None]:
    """Score predicted captions against references with the coco-caption metrics.

    Args:
        references: image id -> reference captions (raw text; tokenized here). Ids that have
            no prediction are ignored.
        predictions: image id -> one predicted caption. Every id must have references.
        use_java: None picks Java when ``java`` is on PATH; False forces the pure-Python
            tokenizer (and METEOR None); True requires Java and raises if it is missing.

    Returns:
        {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"} on a 0-100 scale. BLEU is corpus
        level; METEOR, ROUGE-L and CIDEr-D are means over images. METEOR is None when Java is
        unavailable or its scorer fails or times out (logged), never 0. "CIDEr-D" is
        pycocoevalcap's ``Cider`` class: despite the name it implements the CIDEr-D variant
        (clipped n-gram counts, Gaussian length penalty sigma=6, 1-4 grams, x10) with IDF
        taken from the references of the images being scored, so it needs several images:
        with a single image every IDF weight, hence the score, is 0.

    Raises:
        DataError: empty input, a prediction without references, or wrong value types.
        CaptionerError: use_java=True but Java is missing or its tokenizer fails.
    """
    refs, preds = _validate(references, predictions)

    have_java = java_available()
    if use_java and not have_java:
        raise CaptionerError("use_java=True but no 'java' executable was found on PATH")
    java = have_java and use_java is not False

    # One tokenizer run (one JVM start) for predictions and references together.
    combined: dict[tuple[str, str], list[str]] = {("ref", k): v for k, v in refs.items()}
    combined.update({("pred", k): [v] for k, v in preds.items()})
    if java:
        try:
            tokenized = _tokenize_java(combined)
        except (CaptionerError, OSError) as exc:
            if use_java:
                raise CaptionerError(f"PTBTokenizer (Java) failed: {exc}") from exc
            logger.warning("Java tokenizer failed (%s); using the Python tokenizer", exc)
            java = False
            tokenized = _tokenize_python(combined)
    else:
        tokenized = _tokenize_python(combined)

    gts = {k: tokenized[("ref", k)] for k in preds}
    res = {k: tokenized[("pred", k)] for k in preds}

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints {'testlen': ...} and ratio
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    meteor = _meteor_score(gts, res) if java else None

    scores: dict[str, float | None] = {
        f"BLEU-{n}": 100.0 * float(value) for n, value in enumerate(bleu, start=1)
    }
    scores["METEOR"] = None if meteor is None else 100.0 * meteor
    scores["ROUGE-L"] = 100.0 * float(rouge)
    scores["CIDEr-D"] = 100.0 * float(cider)
    return scores


def format_scores(scores: Mapping[str, float | None]) -> str:
    """Render scores as a small aligned two-column table for the CLI ("unavailable" for None)."""
    if not scores:
        return "(no scores)"
    cells = [
        (name, "unavailable" if value is None else f"{value:.2f}") for name, value in scores.items()
    ]
    name_w = max(len("metric"), *(len(n) for n, _ in cells))
    value_w = max(len("score"), *(len(v) for _, v in cells))
    lines = [f"{'metric':<{name_w}}  {'score':>{value_w}}"]
    lines.append(f"{'-' * name_w}  {'-' * value_w}")
    lines += [f"{name:<{name_w}}  {value:>{value_w}}" for name, value in cells]
    return "\n".join(lines)
