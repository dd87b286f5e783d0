"""Invented people and dogs on Flickr8k's test split: among the test images none of whose five
references mention a person (a dog), the share whose caption does.

Word lists and the definition are in captioner.evaluation.hallucination. The test split is the
official Flickr_8k.testImages.txt (1,000 images); references come from captions.txt (or
Flickr8k.token.txt). Captions are decoded here with ``--model`` at ``--beam-size``, or read from a
COCO results file (``--results``, e.g. runs/eval/<model>/results_test_beam3.json) so a finished
``captioner evaluate`` run can be scored without decoding again.

    python bench/bench_hallucination.py                        # the bundled model, beam 3
    python bench/bench_hallucination.py --model runs/exp1/best --json /tmp/halluc.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

TEST_LIST = "Flickr_8k.testImages.txt"


def read_test_split(data_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The official test image names and every image's reference captions."""
    from captioner.data.captions import read_flickr_csv, read_flickr_token
    from captioner.errors import DataError

    split_file = data_dir / TEST_LIST
    if not split_file.is_file():
        sys.exit(f"error: {split_file} not found; pass --data-dir pointing at Flickr8k")
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    try:
        if (data_dir / "captions.txt").is_file():
            references = read_flickr_csv(data_dir / "captions.txt").captions
        else:
            references = read_flickr_token(data_dir / "Flickr8k.token.txt").captions
    except (OSError, DataError) as exc:
        sys.exit(f"error: cannot read the Flickr8k captions in {data_dir}: {exc}")
    missing = [n for n in names if n not in references]
    if missing:
        sys.exit(f"error: {len(missing)} test images have no references, e.g. {missing[0]}")
    return names, references


def caption_images(
    captioner: Any, files: list[Path], beam_size: int, batch_size: int = 50, **options: Any
) -> list[str]:
    """The one place the model is asked for captions: extra decoding options pass through."""
    captions: list[str] = []
    for start in range(0, len(files), batch_size):
        batch = [str(f) for f in files[start : start + batch_size]]
        results = captioner.caption(batch, beam_size=beam_size, return_attention=False, **options)
        captions += [r.caption for r in results]
    return captions


def read_results(path: Path) -> dict[str, str]:
    """A COCO results file ``[{"image_id": name, "caption": ...}]`` as {image: caption}."""
    try:
        return {str(r["image_id"]): str(r["caption"]) for r in json.loads(path.read_text())}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"error: cannot read results file {path}: {exc}")


def main(argv: list[str] | None = None) -> None:
    parser = common.new_parser(__doc__)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=common.DEFAULT_DATA,
        help=f"Flickr8k folder (default: {common.DEFAULT_DATA})",
    )
    parser.add_argument("--results", type=Path, default=None, help="score this results file")
    parser.add_argument("--limit", type=int, default=0, help="only the first N test images")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    common.use_src()
    from captioner.evaluation.hallucination import DOG_WORDS, PERSON_WORDS, invented_rate, share
    from captioner.io import atomic_write_json

    names, references = read_test_split(args.data_dir)
    if args.limit > 0:
        names = names[: args.limit]
    if args.results is not None:
        decoded = read_results(args.results)
        missing = [n for n in names if n not in decoded]
        if missing:
            sys.exit(f"error: {args.results} has no caption for {len(missing)} test images")
        captions = {n: decoded[n] for n in names}
        source = str(args.results)
    else:
        from captioner.api import Captioner
        from captioner.errors import CaptionerError

        images_dir = common.dataset_images_dir(args.data_dir)
        try:
            captioner = Captioner.from_pretrained(args.model)
            decoded_list = caption_images(
                captioner, [images_dir / n for n in names], args.beam_size
            )
        except CaptionerError as exc:
            sys.exit(f"error: {exc}")
        captions = dict(zip(names, decoded_list))
        source = f"model {args.model or 'bundled'}, beam {args.beam_size}"

    test_refs = {n: references[n] for n in names}
    person = invented_rate(captions, test_refs, PERSON_WORDS)
    dog = invented_rate(captions, test_refs, DOG_WORDS)
    print(f"Flickr8k test, {len(names)} images, captions from {source}")
    print(f"invented person (caption names one, no reference does): {share(*person)}")
    print(f"invented dog (caption names one, no reference does): {share(*dog)}")
    if args.json is not None:
        atomic_write_json(
            args.json,
            {
                "source": source,
                "images": len(names),
                "invented_person": list(person),
                "invented_dog": list(dog),
                "captions": captions,
            },
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
