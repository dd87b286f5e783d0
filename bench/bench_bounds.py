"""What limits a model on the out-of-domain check sets: the vocabulary, the concepts, or the
training data? Each line is a ceiling that no decoding change can lift.

For each check set (bench/ood/*.json, see bench_ood.py):
- vocabulary: photos whose subject words include one in the model's vocabulary (the rest can
  never be named by this model, whatever it sees);
- concepts: photos whose top 3 concept words name the subject, for every ImageNet head that
  ships as a registry package (EfficientNet-Lite0/1/2, each at its own input size), each also
  averaged over a horizontal flip, and the three heads averaged (flip included): whether a
  bigger or ensembled concept source would name more;
- with ``--captions`` (bench_ood.py ``--json`` outputs, one per set, in the same order): the
  union of the photos the captions name and the photos the bundled head's concepts name, the
  most a decoder could name that adds every concept-named subject and keeps every one its prior
  already names.

With the Flickr8k data (``--data-dir``), also the training prior: how many training photos have
references that name neither a person nor a dog (word lists in
captioner.evaluation.hallucination). A detector learns "no person here" only from those.

    python bench/bench_ood.py --json /tmp/ood1.json      # then, per set:
    python bench/bench_bounds.py --photos bench/ood/photos.json --captions /tmp/ood1.json
    python bench/bench_bounds.py --photos bench/ood/photos.json bench/ood/photos_heldout.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import bench_ood  # noqa: E402

HEADS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def vocabulary_named(photos: Sequence[bench_ood.Photo], vocabulary: Iterable[str]) -> list[bool]:
    """Per photo: one of its subject words is in the vocabulary."""
    words = set(vocabulary)
    return [any(w.lower() in words for w in p.subject_words) for p in photos]


def concepts_named(
    photos: Sequence[bench_ood.Photo], probs, concepts, top_k: int, min_prob: float
) -> list[bool]:
    """Per photo: the top concept words of its (1000,) class probabilities, listed as a
    grounded caption lists them (``top_k``, ``min_prob``), name the subject."""
    top = concepts.top(probs, top_k, min_prob)
    return [bench_ood.concepts_name_subject(p, t) for p, t in zip(photos, top, strict=True)]


def union_named(caption_rows: Sequence[dict], concept_flags: Sequence[bool]) -> list[bool]:
    """Per photo: the caption names the subject or the concepts do (rows from bench_ood --json)."""
    return [
        bool(r["subject_named"]) or bool(c)
        for r, c in zip(caption_rows, concept_flags, strict=True)
    ]


def training_prior(names: Sequence[str], references: dict[str, list[str]]) -> dict[str, int]:
    """How many photos' references name a person, a dog, neither (any of each photo's captions)."""
    from captioner.evaluation.hallucination import DOG_WORDS, PERSON_WORDS, mentions

    counts = {"photos": 0, "person": 0, "dog": 0, "neither": 0}
    for name in names:
        refs = references[name]
        person = any(mentions(r, PERSON_WORDS) for r in refs)
        dog = any(mentions(r, DOG_WORDS) for r in refs)
        counts["photos"] += 1
        counts["person"] += person
        counts["dog"] += dog
        counts["neither"] += not person and not dog
    return counts


def load_heads() -> dict[str, tuple]:
    """Every ImageNet head we can install: name -> (frozen encoder, its spec)."""
    from captioner.features.encoders import build_encoder, get_spec

    return {name: (build_encoder(name), get_spec(name)) for name in HEADS}


def head_probabilities(files: Sequence[Path], heads: dict[str, tuple]) -> dict[str, object]:
    """(N, 1000) class probabilities per head and variant ("<head>", "<head> + flip", and the
    heads with flips averaged, "all 3 + flip")."""
    import numpy as np
    import torch
    from PIL import Image

    from captioner.features.encoders import preprocess
    from captioner.grounding.word_model import softmax

    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    out: dict[str, object] = {}
    ensemble = []
    for name, (encoder, spec) in heads.items():
        views = []
        for flip in (False, True):
            batch = preprocess([im[:, ::-1] if flip else im for im in images], spec)
            with torch.inference_mode():
                grid = encoder(torch.from_numpy(batch))  # (N, P, C)
                views.append(softmax(encoder.concept_logits(grid).numpy()))  # (N, 1000)
        out[name] = views[0]
        out[f"{name} + flip"] = (views[0] + views[1]) / 2
        ensemble.extend(views)
    out["all 3 + flip"] = sum(ensemble) / len(ensemble)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = common.new_parser(__doc__)
    parser.add_argument("--photos", type=Path, nargs="+", default=[bench_ood.PHOTOS_JSON])
    parser.add_argument(
        "--captions", type=Path, nargs="*", default=[], help="bench_ood.py --json, one per set"
    )
    parser.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    parser.add_argument("--data-dir", type=Path, default=common.DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.captions and len(args.captions) != len(args.photos):
        sys.exit("error: give one --captions file per --photos file, in the same order")

    common.use_src()
    from captioner.api import Captioner
    from captioner.errors import CaptionerError
    from captioner.evaluation.hallucination import share
    from captioner.features.concepts import ImageNetConcepts
    from captioner.grounding.grounder import GroundingConfig
    from captioner.io import atomic_write_json

    try:
        captioner = Captioner.from_pretrained(args.model)
    except CaptionerError as exc:
        sys.exit(f"error: {exc}")
    vocabulary = captioner.vocab.itos
    listed = captioner.grounder.config if captioner.grounder else GroundingConfig()
    concepts = ImageNetConcepts.load()
    heads = load_heads()
    report: dict[str, dict] = {}
    for i, path in enumerate(args.photos):
        photos = bench_ood.load_photos(path)
        problems = bench_ood.resolve(photos)
        if problems:
            sys.exit("error: " + "\n".join(problems))
        n = len(photos)
        lines = {"vocabulary": sum(vocabulary_named(photos, vocabulary))}
        flags = {}
        for variant, probs in head_probabilities([p.file for p in photos], heads).items():
            flags[variant] = concepts_named(photos, probs, concepts, listed.top_k, listed.min_prob)
            lines[f"concepts: {variant}"] = sum(flags[variant])
        if args.captions:
            try:
                rows = json.loads(args.captions[i].read_text(encoding="utf-8"))["photos"]
            except (OSError, ValueError, KeyError) as exc:
                sys.exit(f"error: cannot read {args.captions[i]}: {exc}")
            if [r["id"] for r in rows] != [p.id for p in photos]:
                sys.exit(f"error: {args.captions[i]} is not bench_ood's output for {path}")
            lines["captions"] = sum(r["subject_named"] for r in rows)
            lines["captions or lite0's concepts"] = sum(union_named(rows, flags[HEADS[0]]))
        print(f"\n{path.name} ({n} photos): subject named at most by")
        print(
            common.markdown_table(
                ["ceiling", "photos"], [[k, share(v, n)] for k, v in lines.items()]
            )
        )
        report[path.name] = {"photos": n, **lines}

    from captioner.data.captions import find_caption_file_or_none, read_captions
    from captioner.data.splits import read_official_lists
    from captioner.errors import DataError

    lists = read_official_lists(args.data_dir) if args.data_dir.is_dir() else None
    caption_file = find_caption_file_or_none(args.data_dir) if lists else None
    if caption_file is not None:
        try:
            references = read_captions(caption_file).captions
            prior = training_prior(lists["train"], references)
        except (DataError, KeyError) as exc:
            sys.exit(f"error: cannot read the Flickr8k training references: {exc}")
        print(
            f"\nFlickr8k train: {prior['photos']} photos; references name a person in "
            f"{prior['person']}, a dog in {prior['dog']}, neither in {prior['neither']} "
            f"({share(prior['neither'], prior['photos'])})"
        )
        report["train_prior"] = prior
    else:
        print(
            f"\n(no Flickr8k split lists and captions in {args.data_dir}: training prior skipped)"
        )
    if args.json is not None:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
