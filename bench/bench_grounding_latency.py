"""What grounding costs per caption: one image end to end, grounded vs the same model without.

Both captioners are built from the same loaded model; one has the model's grounding (concepts
from the encoder's second output, the in-domain score, the word bias in beam search), the other
none, so it runs the encoder's grid output alone and plain beam search: the path before
grounding existed. Each of ``--images`` Flickr8k test JPEGs is captioned by both, the order
alternating per image, so background load hits both alike. Reported: p50 / p95 / mean latency.

    python bench/bench_grounding_latency.py                  # the bundled model, 100 images
    python bench/bench_grounding_latency.py --model runs/x/grounded --images 50
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from bench_latency import find_images  # noqa: E402


def main() -> None:
    p = common.new_parser(__doc__)
    common.add_dir_args(p, "prepared work dir (its test split picks the images)")
    p.add_argument("--model", default=None, help="a grounded model directory (bundled)")
    p.add_argument("--images", type=int, default=100, help="timed images (100)")
    p.add_argument("--warmup", type=int, default=3, help="untimed images first (3)")
    p.add_argument("--beam", type=int, default=3, help="beam size (3)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (2)")
    args = p.parse_args()
    if args.images < 1 or args.warmup < 0 or args.beam < 1 or args.threads < 1:
        sys.exit("error: --images, --beam and --threads must be positive, --warmup >= 0")
    common.use_src()
    from captioner.api import Captioner, resolve_model_path
    from captioner.grounding.grounder import Grounder
    from captioner.model.captioning_model import CaptioningModel

    path = resolve_model_path(args.model)
    grounder = Grounder.from_pretrained(path)
    if grounder is None:
        sys.exit(f"error: {path} has no grounding (run `captioner ground` first)")
    model = CaptioningModel.from_pretrained(path)
    common.print_header("grounding latency", args.threads)
    paths, source = find_images(args.data_dir, args.work_dir, args.images + args.warmup)
    print(f"model: {path}\nimages: {source}\n")
    runs = {
        "grounded (ours)": Captioner(model, "onnx", args.threads, grounder),
        "no grounding (baseline)": Captioner(model, "onnx", args.threads, None),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i, image in enumerate(paths):
        data = image.read_bytes()
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            runs[name].caption(data, beam_size=args.beam)
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed * 1000)
    rows = []
    for name, ms in times.items():
        ms.sort()
        p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
        rows.append(
            [name, f"{statistics.median(ms):.1f}", f"{p95:.1f}", f"{statistics.mean(ms):.1f}"]
        )
    print(common.markdown_table(["path", "p50 ms", "p95 ms", "mean ms"], rows))
    ours, base = (statistics.median(t) for t in times.values())
    print(f"\np50 grounded / baseline: {ours / base:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
