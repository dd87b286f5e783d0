"""Standard caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) computed with pycocoevalcap.

Scores are returned on the 0-100 scale used in captioning papers. Tokenization follows the
coco-caption protocol (ptb_tokenizer.py): Stanford PTBTokenizer (Java) with punctuation
removed. When Java is not available a pure-Python tokenizer that mimics it is used instead
and METEOR (which is a Java program) is reported as ``None`` ("unavailable") rather than a
misleading 0.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import subprocess
import threading
from collections.abc import Mapping
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from captioner.errors import CaptionerError, DataError
from captioner.evaluation.ptb_tokenizer import (
    java_available,
    sanitize,
    tokenize_java,
    tokenize_python,
)

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
#: wedged subprocess can never hang an evaluation forever (ptb_tokenizer has the tokenizer's).
METEOR_TIMEOUT_S = 120.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.05


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
        preds[image] = sanitize(caption)
        refs[image] = [sanitize(r) for r in image_refs]
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
            tokenized = tokenize_java(combined)
        except (CaptionerError, OSError) as exc:
            if use_java:
                raise CaptionerError(f"PTBTokenizer (Java) failed: {exc}") from exc
            logger.warning("Java tokenizer failed (%s); using the Python tokenizer", exc)
            java = False
            tokenized = tokenize_python(combined)
    else:
        tokenized = tokenize_python(combined)

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
