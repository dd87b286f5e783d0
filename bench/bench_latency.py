"""End-to-end captioning latency and batched throughput: ONNX Runtime path vs PyTorch eager path.

One request = read the JPEG's bytes from disk + ``Captioner.caption(bytes, beam_size=3,
max_length=20)``, which decodes the JPEG, preprocesses it, runs the encoder and beam-searches the
caption (attention maps included, as the CLI and the web app ask for them).

- ours:     ``Captioner(model, backend="onnx")``: encoder and decoder steps in ONNX Runtime;
- baseline: ``Captioner(model, backend="torch")``: the same model in PyTorch eager;
- with ``--compare-plain``, also "ONNX Runtime, plain step": the ONNX path with the fused
  search step (decoder_search.onnx) hidden, so beam search drives the plain step graph and
  does the log-softmax, bias and top-k in torch, with the memory expanded to the beams (the
  path before the fused step), interleaved with the others in the same run;
- with ``--compare-detector`` (a grounded model), also the grounded path twice, interleaved
  with the others: "grounded, no detector" (the grounding without the person/animal detector's
  gate and short descriptions: the path before the detector) and "grounded + detector" (what
  ``Captioner.from_pretrained`` runs now);
- with ``--compare-sentences``, also "ONNX Runtime, no sentence check": ours with
  ``prefer_sentences`` off (no link-grammar parse of the finished beams), interleaved;
- with ``--compare-int8-decoder``, also "ONNX Runtime, fp32 decoder": the ONNX path with the
  fp32 decoder graphs beside the same encoder, against ours with the int8 ones (ours is
  then built with ``precision="int8"``: the int8 encoder must exist), interleaved likewise.

Both are built from the same loaded model, with the same ``--threads`` (ORT intra-op threads and
``torch.set_num_threads``; beam bookkeeping runs in torch on both paths). For each of
``--images`` Flickr8k test images (the work dir's test split, else the first images by name) both
backends caption it one after the other, the order alternating per image, so background load
hits both alike; an untimed ``--pause`` before each call lets the other backend's spinning worker
threads go to sleep. ``--warmup`` images per backend are excluded. Reported: p50 / p95 / mean
latency per image, and batched throughput (``caption`` on lists of ``--batch-size`` images, read
from disk inside the timing, interleaved the same way). A per-stage breakdown (median over a few
images: read+decode+preprocess, encoder, beam search) follows.

A model with a random decoder never emits <end>, so every caption runs to max_length (20 steps):
the worst case for decoding. The output says which model was used and whether it looks trained.

    python bench/bench_latency.py                               # the bundled model
    python bench/bench_latency.py --model runs/exp1/best        # a saved model directory
    python bench/bench_latency.py --random-model /tmp/bench_model --quick   # no trained model yet

Reference target (quiet 2-core machine): ORT p50 <= 60 ms at beam 3, and >= 3x eager.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def find_images(data_dir: Path, work_dir: Path, count: int) -> tuple[list[Path], str]:
    """``count`` JPEGs: the prepared test split if there is one, else the first by name."""
    images_dir = common.dataset_images_dir(data_dir)
    from captioner.data.prepare import PreparedData

    source = f"first {count} images by name in {images_dir}"
    names: list[str] = []
    if (work_dir / "dataset.json").is_file():
        names = [n for n in PreparedData.load(work_dir).splits.test if (images_dir / n).is_file()]
        source = f"first {count} test-split images of {work_dir}, from {images_dir}"
    if len(names) < count:
        names = [p.name for p in common.jpegs(images_dir)]
        source = f"first {count} images by name in {images_dir}"
    if len(names) < count:
        sys.exit(f"error: {images_dir} has {len(names)} JPEGs, {count} are needed")
    return [images_dir / n for n in names[:count]], source


def make_random_model(path: Path, work_dir: Path, encoder: str) -> Path:
    """A model directory with a random decoder and the work dir's vocabulary."""
    import torch

    from captioner.data.prepare import PreparedData
    from captioner.errors import DataError
    from captioner.features.encoders import get_spec
    from captioner.model.captioning_model import CaptioningModel
    from captioner.model.config import DecoderConfig
    from captioner.model.decoder import ShowAttendTellDecoder

    try:
        vocab = PreparedData.load(work_dir).vocab
    except DataError as exc:
        sys.exit(f"error: --random-model needs a prepared --work-dir for its vocabulary: {exc}")
    torch.manual_seed(0)
    spec = get_spec(encoder)
    decoder = ShowAttendTellDecoder(
        DecoderConfig(vocab_size=len(vocab), feature_dim=spec.channels, num_pixels=spec.num_pixels)
    )
    CaptioningModel(decoder.eval(), vocab, spec).save_pretrained(path)
    return path


def describe_model(path: Path, model) -> str:
    d = model.decoder.config
    # training's best/ records its dev scores; bundle_model.py records the dev sweep's
    dev = model.extra.get("dev") or model.extra.get("dev_selection", {}).get("dev_scores")
    trained = (
        "trained (dev "
        + ", ".join(f"{k} {v:.2f}" for k, v in dev.items() if isinstance(v, float))
        + ")"
        if isinstance(dev, dict)
        else "no dev scores in config.json: possibly untrained (a random decoder never emits "
        "<end>, so every caption runs to max_length)"
    )
    return (
        f"{path} - {model.encoder.name} + {d.cell.upper()} decoder (hidden {d.hidden_dim}, "
        f"vocabulary {d.vocab_size}); {trained}"
    )


def grounded_pair(model_path: Path) -> list[tuple[str, object]]:
    """The model's grounding as saved ("grounded + detector") and the same grounding with the
    detector's gate and the short descriptions off ("grounded, no detector")."""
    import copy
    import dataclasses

    from captioner.grounding.grounder import Grounder

    with_detector = Grounder.from_pretrained(model_path)
    if with_detector is None:
        sys.exit(f"error: --compare-detector needs a grounded model; {model_path} has none")
    without = copy.copy(with_detector)
    without.config = dataclasses.replace(
        with_detector.config, gate_strength=0.0, short_out_of_domain=False
    )
    return [("grounded + detector", with_detector), ("grounded, no detector", without)]


class PlainStepper:
    """An OrtStepper through the Stepper protocol only: decoding takes the plain path."""

    def __init__(self, stepper) -> None:
        self.stepper = stepper

    def start(self, features):
        return self.stepper.start(features)

    def step(self, tokens, state, memory):
        return self.stepper.step(tokens, state, memory)


class Backend:
    """One backend's captioner and its timings."""

    def __init__(self, label: str, captioner) -> None:
        self.label = label
        self.captioner = captioner
        self.latencies: list[float] = []
        self.tokens: list[int] = []
        self.captions: list[str] = []
        self.batch_images = 0
        self.batch_seconds = 0.0

    def one(self, path: Path, beam: int, max_length: int, record: bool = True) -> None:
        t0 = time.perf_counter()
        result = self.captioner.caption(path.read_bytes(), beam_size=beam, max_length=max_length)
        elapsed = time.perf_counter() - t0
        if record:
            self.latencies.append(elapsed)
            self.tokens.append(len(result[0].tokens))
            self.captions.append(result[0].caption)

    def batch(self, paths: list[Path], beam: int, max_length: int) -> None:
        t0 = time.perf_counter()
        self.captioner.caption(
            [p.read_bytes() for p in paths], beam_size=beam, max_length=max_length
        )
        self.batch_seconds += time.perf_counter() - t0
        self.batch_images += len(paths)

    def stages(self, path: Path, beam: int, max_length: int) -> tuple[float, float, float]:
        """(read+decode+preprocess, encoder, beam search) seconds for one image, by the same
        calls ``Captioner.caption`` makes."""
        import torch

        from captioner.data.images import load_image
        from captioner.features.encoders import preprocess

        c = self.captioner
        t0 = time.perf_counter()
        batch = preprocess([load_image(path.read_bytes())], c.spec)
        t1 = time.perf_counter()
        features = torch.from_numpy(c.extractor(batch))
        t2 = time.perf_counter()
        c.caption_features(features, beam_size=beam, max_length=max_length)
        return t1 - t0, t2 - t1, time.perf_counter() - t2


def main(argv: list[str] | None = None) -> int:
    p = common.new_parser(__doc__)
    common.add_dir_args(
        p,
        work_help="prepared work dir: its test split picks the images, its vocabulary "
        "makes --random-model",
    )
    p.add_argument(
        "--model", default=None, help="saved model directory (default: the bundled model)"
    )
    p.add_argument(
        "--random-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a model with a random decoder to DIR and use it (to check the "
        "script before a trained model exists)",
    )
    p.add_argument("--images", type=int, default=100, help="timed images per backend (100)")
    p.add_argument("--warmup", type=int, default=3, help="untimed images per backend first (3)")
    p.add_argument("--beam", type=int, default=3, help="beam size (3)")
    p.add_argument("--max-length", type=int, default=20, help="longest caption (20)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batched call (16)")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="timed batched calls per backend (default: images // batch size, >= 1)",
    )
    p.add_argument(
        "--breakdown",
        type=int,
        default=10,
        help="images for the per-stage breakdown (10; 0 = skip)",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for both paths (2)")
    p.add_argument(
        "--pause",
        type=float,
        default=0.02,
        help="untimed pause in seconds before each timed call (0.02)",
    )
    p.add_argument(
        "--compare-plain",
        action="store_true",
        help="also time the ONNX path without its fused search step (interleaved)",
    )
    p.add_argument(
        "--compare-detector",
        action="store_true",
        help="also time the grounded path with and without the person/animal detector",
    )
    p.add_argument(
        "--compare-sentences",
        action="store_true",
        help="also time the same model without the check that prefers a beam that is a "
        "sentence (link-grammar), interleaved",
    )
    p.add_argument(
        "--compare-int8-decoder",
        action="store_true",
        help="ours with int8 decoder graphs, also timed with the fp32 ones (interleaved)",
    )
    p.add_argument(
        "--compare-model",
        type=Path,
        default=None,
        help="also time both models as Captioner.from_pretrained loads them (grounding and "
        "detector included): this one and --model's, interleaved (e.g. the single-decoder "
        "bundle beside an ensemble)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="10 images, 1 batch, 3-image breakdown: a fast end-to-end check",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batches = min(args.images, 10), 1
        args.warmup, args.breakdown = min(args.warmup, 2), min(args.breakdown, 3)
    if min(args.images, args.batch_size, args.threads, args.beam) < 1:
        p.error("--images, --batch-size, --threads and --beam must be positive")
    batches = args.batches or max(1, args.images // args.batch_size)

    common.use_src()
    import numpy as np
    import torch

    from captioner.api import Captioner, resolve_model_path
    from captioner.errors import CaptionerError
    from captioner.io import read_json
    from captioner.model.captioning_model import CaptioningModel

    torch.set_num_threads(args.threads)
    common.print_header("Captioning latency: ONNX Runtime path vs PyTorch eager path", args.threads)
    if args.random_model is not None and args.model is not None:
        p.error("pass --model or --random-model, not both")
    try:
        if args.random_model is not None:
            model_path = make_random_model(args.random_model, args.work_dir, "efficientnet-lite0")
        else:
            model_path = resolve_model_path(args.model)
        model = CaptioningModel.from_pretrained(model_path)
    except CaptionerError as exc:
        sys.exit(f"error: {exc}\n(no trained model yet? try --random-model /tmp/bench_model)")
    need = max(args.images + args.warmup, batches * args.batch_size, args.breakdown)
    paths, source = find_images(args.data_dir, args.work_dir, need)
    print(f"model: {describe_model(Path(model_path), model)}  ")
    print(f"images: {source}  ")
    print(
        f"settings: beam {args.beam}, max_length {args.max_length}, attention returned, "
        f"{args.images} timed + {args.warmup} warm-up images per backend, "
        f"{batches} batches of {args.batch_size}\n",
        flush=True,
    )

    t0 = time.perf_counter()
    precision = "int8" if args.compare_int8_decoder else "auto"
    try:
        onnx_path = Captioner(model, backend="onnx", threads=args.threads, precision=precision)
    except CaptionerError as exc:
        sys.exit(f"error: {exc}")
    ours = Backend("ONNX Runtime (ours)", onnx_path)
    eager = Backend("PyTorch eager", Captioner(model, backend="torch", threads=args.threads))
    backends = [ours, eager]
    if args.compare_plain:
        plain = Captioner(model, backend="onnx", threads=args.threads)
        plain.stepper = PlainStepper(plain.stepper)
        backends.insert(1, Backend("ONNX Runtime, plain step", plain))
    if args.compare_detector:
        for label, grounder in grounded_pair(model_path):
            grounded = Captioner(model, backend="onnx", threads=args.threads, grounder=grounder)
            backends.insert(1, Backend(label, grounded))
    if args.compare_sentences:
        # the same model, reloaded so that its decoding defaults can differ in one setting
        unchecked = CaptioningModel.from_pretrained(model_path)
        unchecked.generation["prefer_sentences"] = False
        backends.insert(
            1,
            Backend(
                "ONNX Runtime, no sentence check",
                Captioner(unchecked, backend="onnx", threads=args.threads),
            ),
        )
    if args.compare_int8_decoder:
        from captioner.model.onnx_decoder import OrtStepper, exported_decoder_dir

        fp32_decoder = Captioner(model, backend="onnx", threads=args.threads, precision="int8")
        fp32_decoder.stepper = OrtStepper(
            exported_decoder_dir(model.decoder, "fp32"), model.decoder.config.cell, threads=1
        )
        backends.insert(1, Backend("ONNX Runtime, fp32 decoder", fp32_decoder))
    if args.compare_model is not None:
        pair = (("--model as loaded", model_path), ("--compare-model", args.compare_model))
        for label, path in pair:
            path = resolve_model_path(path)
            loaded = Captioner.from_pretrained(path, backend="onnx", threads=args.threads)
            backends.insert(1, Backend(label, loaded))
    torch.set_num_threads(args.threads)  # the torch extractor sets it too; keep it explicit
    print(
        f"setup: {time.perf_counter() - t0:.1f} s (backends {ours.captioner.backend!r} and "
        f"{eager.captioner.backend!r}; ours: {ours.captioner.precision} encoder, "
        f"{ours.captioner.decoder_precision} decoder)",
        flush=True,
    )

    warm, timed = paths[: args.warmup], paths[args.warmup : args.warmup + args.images]
    for path in warm:
        for backend in backends:
            time.sleep(args.pause)
            backend.one(path, args.beam, args.max_length, record=False)
    t0 = time.perf_counter()
    for i, path in enumerate(timed):
        for backend in backends if i % 2 == 0 else backends[::-1]:
            time.sleep(args.pause)
            backend.one(path, args.beam, args.max_length)
    for b in range(batches):
        chunk = [paths[(b * args.batch_size + j) % len(paths)] for j in range(args.batch_size)]
        for backend in backends if b % 2 == 0 else backends[::-1]:
            time.sleep(args.pause)
            backend.batch(chunk, args.beam, args.max_length)
    print(f"timed: {time.perf_counter() - t0:.1f} s\n", flush=True)

    rows = []
    for backend in backends:
        ms = np.asarray(backend.latencies) * 1000
        p50, p95 = np.percentile(ms, [50, 95])
        rows.append(
            [
                backend.label,
                str(len(ms)),
                f"**{p50:.1f}**",
                f"{p95:.1f}",
                f"{ms.mean():.1f}",
                f"{1000 / ms.mean():.1f}",
                f"{backend.batch_images / backend.batch_seconds:.1f}",
                f"{np.mean(backend.tokens):.1f}",
            ]
        )
    print(
        common.markdown_table(
            [
                "path",
                "images",
                "p50 ms",
                "p95 ms",
                "mean ms",
                "img/s (1 at a time)",
                f"img/s (batch {args.batch_size})",
                "mean words",
            ],
            rows,
        )
    )

    def against(other, label: str, bold: bool = False) -> int:
        """Print other's p50 over ours and our batched throughput over other's, interleaved in
        this run; return how many captions both gave alike."""
        p50_ratio = np.percentile(other.latencies, 50) / np.percentile(ours.latencies, 50)
        thr_ratio = (ours.batch_images / ours.batch_seconds) / (
            other.batch_images / other.batch_seconds
        )
        same = sum(a == b for a, b in zip(ours.captions, other.captions, strict=True))
        shown = f"**{p50_ratio:.2f}x**" if bold else f"{p50_ratio:.2f}x"
        print(
            f"{label}: {shown} at p50, {thr_ratio:.2f}x batched throughput; identical captions "
            f"{same}/{len(ours.captions)}"
        )
        return same

    print()
    same = against(eager, "eager / ORT", bold=True)
    if args.compare_plain:
        against(
            next(b for b in backends if b.label == "ONNX Runtime, plain step"),
            "plain step / fused step",
        )
    if args.compare_sentences:
        against(
            next(b for b in backends if b.label == "ONNX Runtime, no sentence check"),
            "no sentence check / sentence check",
        )
    if args.compare_int8_decoder:
        against(
            next(b for b in backends if b.label == "ONNX Runtime, fp32 decoder"),
            "fp32 decoder / int8 decoder",
        )
    if args.compare_model is not None:
        pair = {b.label: b for b in backends}
        ratio = np.percentile(pair["--model as loaded"].latencies, 50) / np.percentile(
            pair["--compare-model"].latencies, 50
        )
        thr = (pair["--model as loaded"].batch_images / pair["--model as loaded"].batch_seconds) / (
            pair["--compare-model"].batch_images / pair["--compare-model"].batch_seconds
        )
        print(
            f"--model / --compare-model ({args.compare_model}), both as loaded: **{ratio:.2f}x** "
            f"at p50, {thr:.2f}x batched throughput"
        )
    p50 = [np.percentile(b.latencies, 50) for b in (ours, eager)]
    untrained = not isinstance(read_json(Path(model_path) / "config.json").get("extra"), dict)
    if untrained and same < len(ours.captions):
        print(
            "(an untrained decoder's near-uniform logits let tiny numeric differences between "
            "the backends change words; a trained model gives (nearly) identical captions)"
        )

    if args.breakdown:
        stage_rows = []
        for backend in backends:
            stages = []
            for path in paths[: args.breakdown]:
                time.sleep(args.pause)
                stages.append(backend.stages(path, args.beam, args.max_length))
            med = np.median(np.asarray(stages), axis=0) * 1000
            stage_rows.append([backend.label, *(f"{x:.1f}" for x in med), f"{med.sum():.1f}"])
        print(f"\nper stage, median over {args.breakdown} images (ms):\n")
        print(
            common.markdown_table(
                [
                    "path",
                    "read+decode+preprocess",
                    "encoder",
                    f"beam search (beam {args.beam})",
                    "sum",
                ],
                stage_rows,
            )
        )

    print(f"\nload average now {common.load_average()}")
    met = p50[0] * 1000 <= 60 and p50[1] / p50[0] >= 3
    print(
        f"target ORT p50 <= 60 ms at beam {args.beam} and >= 3x eager: "
        f"{'met' if met else 'not met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
