"""Encoder latency, fp32 vs int8 (ONNX Runtime static quantisation), in the same run.

What is measured: the encoder call alone (``FeatureExtractor.__call__`` on already preprocessed
(B, 3, 224, 224) batches), for one image (the latency a single caption waits for) and for a
batch (``--batch-size``, the throughput of bulk captioning and evaluation). JPEG decoding and
preprocessing are the same for both precisions and are left out. The two precisions are
interleaved call by call (which goes first alternates), so background load hits both alike;
``--repeats`` calls each, after one warm-up call each. Reported: p50 and mean ms per call,
ms per image and img/s.

Also printed: how close int8 is to fp32 on the timed images (correlation and relative L2 error
of the grids, same ImageNet top-1 concept) and, with ``--decoder``, one beam-3 decoder step
with the step graph's MatMuls dynamically quantised to int8 against the fp32 graph (whether an
int8 decoder pays).

The int8 encoder is the default one (``captioner export --precision int8 --calibration-dir
DIR``); without one the script calibrates on ``--calibration`` training photos of the Flickr8k
work dir first (a few minutes on 2 cores).

    python bench/bench_int8.py                  # 64 images, batch 16, 2 threads
    python bench/bench_int8.py --quick          # 16 images: checks the script end to end
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def timed_calls(runs: dict, inputs: list, repeats: int) -> dict[str, list[float]]:
    """Interleave the callables in ``runs``, call r on ``inputs[r % len]`` for all of them;
    seconds per call for each (after one untimed warm-up call each)."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for label in labels:
        runs[label](inputs[0])
    for r in range(repeats):
        for label in labels if r % 2 == 0 else labels[::-1]:
            t0 = time.perf_counter()
            runs[label](inputs[r % len(inputs)])
            times[label].append(time.perf_counter() - t0)
    return times


def rows_for(times: dict[str, list[float]], batch: int) -> list[list[str]]:
    rows = []
    for label, seconds in times.items():
        p50, mean = statistics.median(seconds) * 1e3, statistics.fmean(seconds) * 1e3
        rows.append(
            [label, str(batch), f"{p50:.1f}", f"{mean:.1f}", f"{p50 / batch:.1f}",
             f"{batch * 1e3 / p50:.1f}"]
        )  # fmt: skip
    return rows


def int8_encoder(encoder: str, work_dir: Path, count: int) -> Path:
    from captioner.features.quantize import (
        calibration_from_prepared,
        default_int8_encoder,
        quantize_encoder,
    )

    path = default_int8_encoder(encoder)
    if path is None:
        print(f"no int8 encoder yet: calibrating on {count} train photos of {work_dir}", flush=True)
        path = quantize_encoder(encoder, calibration_from_prepared(work_dir, "train", count))
    return path


def decoder_step(threads: int, repeats: int) -> list[list[str]]:
    """One beam-3 step of the bundled model's step graph, fp32 vs MatMuls dynamically int8."""
    import tempfile

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from captioner.api import bundled_model_dir
    from captioner.features.onnx import ort_session
    from captioner.model.captioning_model import CaptioningModel
    from captioner.model.onnx_decoder import exported_decoder_dir

    model = CaptioningModel.from_pretrained(bundled_model_dir())
    onnx_dir = exported_decoder_dir(model.decoder)
    cfg = model.decoder.config
    with torch.no_grad():
        (feats, keys), state = model.decoder.prepare(torch.zeros(3, cfg.num_pixels, 1280))
    feed = {
        "tokens": torch.ones(3, dtype=torch.long).numpy(),
        "feats": feats.numpy(),
        "keys": keys.numpy(),
        **{f"{n}_in": s.numpy() for n, s in zip(["h", "c"], state)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / "step_int8.onnx"
        quantize_dynamic(
            onnx_dir / "decoder_step.onnx", q, op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8, per_channel=False,
        )  # fmt: skip
        sessions = {
            "decoder step fp32": ort_session(onnx_dir / "decoder_step.onnx", 1),
            "decoder step int8 (dynamic)": ort_session(q, 1),
        }
        runs = {k: (lambda x, s=s: s.run(None, x)) for k, s in sessions.items()}
        times = timed_calls(runs, [feed], repeats * 10)
        out32, out8 = (s.run(None, feed)[0] for s in sessions.values())
    rows = rows_for(times, 3)
    same = (out32.argmax(1) == out8.argmax(1)).mean()
    print(f"decoder step: same argmax word {same:.0%} of 3 rows (zero grid, start token)")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = common.new_parser(__doc__)
    common.add_dir_args(p, work_help="prepared Flickr8k work dir (calibration, if needed)")
    p.add_argument("--encoder", default="efficientnet-lite0", help="encoder name")
    p.add_argument("--images", type=int, default=64, help="distinct images timed (64)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batched call (16)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per precision (20)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (2)")
    p.add_argument("--calibration", type=int, default=300, help="photos, if calibrating (300)")
    p.add_argument("--decoder", action="store_true", help="also time an int8 decoder step")
    p.add_argument("--quick", action="store_true", help="16 images, 4 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = min(args.images, 16), min(args.repeats, 4)
    if min(args.images, args.batch_size, args.repeats, args.threads) < 1:
        p.error("--images, --batch-size, --repeats and --threads must be positive")

    common.use_src()
    from captioner.data.images import load_image
    from captioner.features.encoders import preprocess
    from captioner.features.onnx import FeatureExtractor
    from captioner.features.quantize import agreement

    common.print_header("Encoder latency: fp32 vs int8 (ONNX Runtime)", args.threads)
    images_dir = common.dataset_images_dir(args.data_dir)
    paths = common.jpegs(images_dir)[: args.images]
    int8_file = int8_encoder(args.encoder, args.work_dir, args.calibration)
    extractors = {
        "fp32": FeatureExtractor(args.encoder, "onnx", args.threads),
        "int8": FeatureExtractor(args.encoder, "onnx", args.threads, precision="int8"),
    }
    print(
        f"fp32 {extractors['fp32'].encoder_file.name} "
        f"({extractors['fp32'].encoder_file.stat().st_size / 2**20:.1f} MiB)  \n"
        f"int8 {int8_file.name} ({int8_file.stat().st_size / 2**20:.1f} MiB)\n",
        flush=True,
    )
    spec = extractors["fp32"].spec
    batch = preprocess([load_image(p) for p in paths], spec)  # (N, 3, S, S)
    runs = {f"encoder {k}": (lambda x, e=e: e(x)) for k, e in extractors.items()}

    rows = []
    for size in (1, args.batch_size):
        chunks = [batch[i : i + size] for i in range(0, len(batch) - size + 1, size)]
        rows += rows_for(timed_calls(runs, chunks, args.repeats), size)
    if args.decoder:
        rows += decoder_step(args.threads, args.repeats)
    print(
        common.markdown_table(
            ["graph", "batch", "p50 ms/call", "mean ms/call", "p50 ms/img", "img/s"], rows
        )
    )
    check = agreement(args.encoder, int8_file, paths)
    print(
        f"\nint8 vs fp32 on these {len(paths)} images: grid correlation "
        f"{check['correlation']:.4f}, relative error {check['relative_error']:.3f}, "
        f"same top-1 concept {check['top1_agreement']:.0%}; load average now "
        f"{common.load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
