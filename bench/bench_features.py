"""Feature extraction throughput: ONNX Runtime vs PyTorch eager, in the same run.

What is measured, per backend, on the same ``--images`` Flickr8k JPEGs (sorted by name, first N):
read + decode the JPEG (``captioner.data.images.load_image``), preprocess
(``captioner.features.encoders.preprocess``: resize + normalise + NCHW) and run the encoder
(``captioner.features.onnx.FeatureExtractor``) on batches of ``--batch-size`` images, one after
the other in this process (no decode/encode overlap, unlike ``captioner features`` which decodes
the next batch in a thread).

- ours:     ``FeatureExtractor(encoder, "onnx", threads)``, ONNX Runtime on the exported encoder;
- baseline: ``FeatureExtractor(encoder, "torch", threads)``, the same pretrained network run by
            PyTorch eager under ``torch.inference_mode()``.

Both get the same thread count (``--threads``: ORT intra-op threads and ``torch.set_num_threads``).
The backends are interleaved batch by batch (which one goes first alternates every batch), so
background load hits both alike; a short untimed pause (``--pause``) between switching lets the
idle backend's spinning worker threads go to sleep before the other one is timed. One warm-up
batch per backend is excluded from the timings (it also checks that both give the same
features). Session creation / ONNX export happen before any timing.

    python bench/bench_features.py                  # 512 images, batch 16, 2 threads
    python bench/bench_features.py --quick          # 64 images: checks the script end to end
    python bench/bench_features.py --threads 4 --images 1024

Reference target (quiet 2-core machine): ORT >= 40 img/s and >= 5x eager.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def find_images(data_dir: Path, count: int) -> list[Path]:
    """The first ``count`` JPEGs of the dataset (sorted by name); exits with a message if none."""
    images_dir = common.dataset_images_dir(data_dir)
    paths = common.jpegs(images_dir)
    if len(paths) < count:
        sys.exit(f"error: {images_dir} has {len(paths)} JPEGs, --images asks for {count}")
    return paths[:count]


class Backend:
    """One extractor plus its accumulated timings (decode+preprocess and encoder apart)."""

    def __init__(self, label: str, extractor) -> None:
        self.label = label
        self.extractor = extractor
        self.images = 0
        self.load_s = 0.0
        self.encode_s = 0.0

    def run(self, paths: list[Path]):
        """Read + decode + preprocess + encode one batch; returns (load s, encode s, features)."""
        from captioner.data.images import load_image
        from captioner.features.encoders import preprocess

        t0 = time.perf_counter()
        batch = preprocess([load_image(p) for p in paths], self.extractor.spec)
        t1 = time.perf_counter()
        features = self.extractor(batch)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, features

    def timed(self, paths: list[Path]) -> None:
        load_s, encode_s, _ = self.run(paths)
        self.images += len(paths)
        self.load_s += load_s
        self.encode_s += encode_s

    @property
    def seconds(self) -> float:
        return self.load_s + self.encode_s

    def row(self) -> list[str]:
        return [
            self.label,
            str(self.images),
            f"{self.seconds:.2f}",
            f"{self.load_s:.2f}",
            f"{self.encode_s:.2f}",
            f"{self.images / self.seconds:.1f}" if self.seconds else "-",
        ]


def main(argv: list[str] | None = None) -> int:
    p = common.new_parser(__doc__)
    common.add_dir_args(
        p,
        work_help="prepared work dir; not needed here, accepted so every bench script "
        "takes the same flags",
    )
    p.add_argument("--encoder", default="efficientnet-lite0", help="encoder name")
    p.add_argument("--images", type=int, default=512, help="timed images per backend (512)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call (16)")
    p.add_argument("--threads", type=int, default=2, help="threads for both backends (2)")
    p.add_argument(
        "--pause",
        type=float,
        default=0.05,
        help="untimed pause in seconds when switching backend (0.05)",
    )
    p.add_argument("--quick", action="store_true", help="64 images: a fast end-to-end check")
    args = p.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 64)
    if args.images < 1 or args.batch_size < 1 or args.threads < 1:
        p.error("--images, --batch-size and --threads must be positive")

    common.use_src()
    import numpy as np
    import torch

    from captioner.features.onnx import FeatureExtractor

    torch.set_num_threads(args.threads)
    common.print_header("Feature extraction: ONNX Runtime vs PyTorch eager", args.threads)
    warm = find_images(args.data_dir, args.images + args.batch_size)
    warmup, paths = warm[: args.batch_size], warm[args.batch_size :]
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]

    t0 = time.perf_counter()
    ort = Backend("ONNX Runtime (ours)", FeatureExtractor(args.encoder, "onnx", args.threads))
    eager = Backend("PyTorch eager", FeatureExtractor(args.encoder, "torch", args.threads))
    torch.set_num_threads(args.threads)
    print(
        f"setup (export / session / model load): {time.perf_counter() - t0:.1f} s; "
        f"encoder {args.encoder}, {len(paths)} images from {paths[0].parent}, "
        f"batch {args.batch_size}, {len(batches)} timed batches per backend, "
        f"1 warm-up batch each\n",
        flush=True,
    )

    _, _, f_ort = ort.run(warmup)
    time.sleep(args.pause)
    _, _, f_eager = eager.run(warmup)
    diff = float(np.abs(f_ort - f_eager).max())
    print(
        f"warm-up check: features {tuple(f_ort.shape)}, max |ORT - eager| = {diff:.2e}"
        + ("" if diff < 1e-2 else "  (WARNING: the backends disagree)")
        + "\n",
        flush=True,
    )

    for b, batch in enumerate(batches):
        order = (ort, eager) if b % 2 == 0 else (eager, ort)
        for backend in order:
            time.sleep(args.pause)
            backend.timed(batch)

    print(
        common.markdown_table(
            ["backend", "images", "seconds", "decode+preprocess s", "encoder s", "img/s"],
            [ort.row(), eager.row()],
        )
    )
    speed = eager.seconds / ort.seconds
    enc = eager.encode_s / ort.encode_s
    print(
        f"\nORT / eager: **{speed:.2f}x** img/s end to end ({enc:.2f}x on the encoder alone); "
        f"load average now {common.load_average()}"
    )
    target = ort.images / ort.seconds >= 40 and speed >= 5
    print(f"target ORT >= 40 img/s and >= 5x eager: {'met' if target else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
