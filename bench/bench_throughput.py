"""Batched throughput, end to end from JPEG files: one call at a time vs pipelined.

What is measured: images per second to caption Flickr8k test images from their JPEG bytes
(decode, resize, encoder, grounding, beam search), ``--batch-size`` images per call, by

- ``caption(batch)`` batch after batch: today's path, every stage in turn, and
- ``caption_batches(batches)``: the next batch read and encoded in a background thread while
  this one is beam-searched (:mod:`captioner.overlap`; what ``captioner caption`` runs),

for each precision asked for (``--precisions fp32,int8``; int8 needs ``captioner export
--precision int8`` first and runs int8 decoder graphs too). Every path captions the same images
``--repeats`` times, the paths interleaved pass by pass (which goes first alternates), after
one untimed warm-up batch each; reported: the best and median pass. The captions of the two
ways are compared image by image (they should be identical: the same calls on the same
batches, only overlapped).

    python bench/bench_throughput.py                      # 400 test images, batch 50, fp32
    python bench/bench_throughput.py --precisions fp32,int8 --repeats 3
    python bench/bench_throughput.py --quick              # 60 images: checks the script
    python bench/bench_throughput.py --compare-detector   # + the pipelined path without the
                                                          #   person/animal detector's pass
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from bench_latency import find_images, grounded_pair  # noqa: E402


class Way:
    """One way of captioning (sequential or pipelined) at one precision, and its passes."""

    def __init__(self, label: str, captioner, pipelined: bool) -> None:
        self.label, self.captioner, self.pipelined = label, captioner, pipelined
        self.seconds: list[float] = []
        self.captions: list[str] = []

    def run(self, batches: list[list[bytes]], beam: int, record: bool = True) -> None:
        options = dict(beam_size=beam, return_attention=False)
        t0 = time.perf_counter()
        if self.pipelined:
            results = [r for b in self.captioner.caption_batches(batches, **options) for r in b]
        else:
            results = [r for b in batches for r in self.captioner.caption(b, **options)]
        elapsed = time.perf_counter() - t0
        if record:
            self.seconds.append(elapsed)
            self.captions = [r.caption for r in results]


def main(argv: list[str] | None = None) -> int:
    p = common.new_parser(__doc__)
    common.add_dir_args(p, "prepared Flickr8k work dir (its test split is used)")
    p.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    p.add_argument("--images", type=int, default=400, help="images per pass (400)")
    p.add_argument("--batch-size", type=int, default=50, help="images per call (50)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per path (3)")
    p.add_argument("--beam", type=int, default=3, help="beam size (3)")
    p.add_argument("--threads", type=int, default=2, help="encoder threads (2)")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32, int8 (fp32)")
    p.add_argument("--quick", action="store_true", help="60 images, 1 pass: a fast check")
    p.add_argument(
        "--compare-detector",
        action="store_true",
        help="also time the pipelined path without the person/animal detector's pass",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.batch_size = 60, 1, 20
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if min(args.images, args.batch_size, args.repeats, args.beam, args.threads) < 1:
        p.error("--images, --batch-size, --repeats, --beam and --threads must be positive")
    if not precisions or set(precisions) - {"fp32", "int8"}:
        p.error("--precisions takes fp32 and/or int8")

    common.use_src()
    from captioner.api import Captioner, resolve_model_path
    from captioner.errors import CaptionerError

    common.print_header("Batched throughput: sequential vs pipelined", args.threads)
    paths, source = find_images(args.data_dir, args.work_dir, args.images + args.batch_size)
    blobs = [path.read_bytes() for path in paths]  # files read once: decoding is timed
    warm, timed = blobs[: args.batch_size], blobs[args.batch_size :]
    batches = [timed[i : i + args.batch_size] for i in range(0, len(timed), args.batch_size)]
    ways: list[Way] = []
    no_detector: list[Way] = []  # --compare-detector: pipelined, detector pass off
    for precision in precisions:
        try:
            captioner = Captioner.from_pretrained(
                args.model, backend="onnx", threads=args.threads, precision=precision
            )
        except CaptionerError as exc:
            sys.exit(f"error: {exc}")
        what = f"{captioner.precision} encoder, {captioner.decoder_precision} decoder"
        ways.append(Way(f"caption(batch), {what}", captioner, pipelined=False))
        ways.append(Way(f"caption_batches, {what}", captioner, pipelined=True))
        if args.compare_detector:
            _, without = grounded_pair(resolve_model_path(args.model))[1]
            plain = Captioner.from_pretrained(
                args.model, backend="onnx", threads=args.threads, precision=precision
            )
            plain.grounder = without
            no_detector.append(Way(f"caption_batches, {what}, no detector", plain, True))
    print(f"images: {source}; {len(timed)} timed per pass in {len(batches)} batches  ")
    print(f"settings: beam {args.beam}, {args.repeats} passes per path, interleaved\n", flush=True)

    timed_ways = ways + no_detector
    for way in timed_ways:
        way.run([warm], args.beam, record=False)
    for r in range(args.repeats):
        for way in timed_ways if r % 2 == 0 else timed_ways[::-1]:
            way.run(batches, args.beam)

    rows = []
    for way in timed_ways:
        best, median = min(way.seconds), statistics.median(way.seconds)
        rows.append(
            [way.label, f"**{len(timed) / best:.1f}**", f"{len(timed) / median:.1f}",
             f"{1e3 * median / len(timed):.2f}"]
        )  # fmt: skip
    print(common.markdown_table(["path", "img/s (best)", "img/s (median)", "ms/img"], rows))
    print()
    baseline = ways[0]
    for i in range(0, len(ways), 2):
        seq, pipe = ways[i], ways[i + 1]
        same = sum(a == b for a, b in zip(seq.captions, pipe.captions, strict=True))
        print(
            f"{pipe.label} / {seq.label}: {min(seq.seconds) / min(pipe.seconds):.2f}x; "
            f"identical captions {same}/{len(seq.captions)}"
        )
    if len(ways) > 2:
        fastest = min(ways, key=lambda w: min(w.seconds))
        print(
            f"fastest ({fastest.label}) / today's fp32 path: "
            f"{min(baseline.seconds) / min(fastest.seconds):.2f}x"
        )
    for way in no_detector:
        pipe = next(w for w in ways if w.pipelined and way.label.startswith(w.label))
        same = sum(a == b for a, b in zip(way.captions, pipe.captions, strict=True))
        print(
            f"{pipe.label} (with the detector) / {way.label}: "
            f"{min(way.seconds) / min(pipe.seconds):.2f}x throughput; "
            f"identical captions {same}/{len(way.captions)}"
        )
    print(f"\nload average now {common.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
