"""Load benchmark for ``captioner serve``: throughput and latency, micro-batching on vs off.

Starts the web app under uvicorn on a free loopback port (never another interface), once per
batching setting, and sends a bounded number of requests (``--requests``, and at most
``--max-seconds`` per scenario) at each concurrency level. Prints one table row per scenario:
req/s, p50/p95/p99 latency, errors, and the mean batch size the server actually formed.

    python bench/load_web.py --fake                      # no model: FakeCaptioner (tests/)
    python bench/load_web.py --model runs/lite0/model    # a saved model directory
    python bench/load_web.py --fake --concurrency 1,4,16 --batch-sizes 1,8 --requests 300
"""

from __future__ import annotations

import io
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

from captioner.web.background import BackgroundServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


@dataclass
class Row:
    batch: int
    concurrency: int
    sent: int
    ok: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    mean_batch: float
    error_kinds: dict[str, int]

    def cells(self) -> list[str]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        return [
            "off" if self.batch == 1 else f"on ({self.batch})",
            str(self.concurrency),
            str(self.sent),
            f"{self.ok / self.seconds:.1f}" if self.seconds > 0 else "-",
            f"{p50:.1f}",
            f"{p95:.1f}",
            f"{p99:.1f}",
            str(self.errors),
            f"{self.mean_batch:.2f}",
        ]


HEADER = ["batching", "conc", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "batch"]


def synthetic_jpeg(size: int = 480) -> bytes:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    draw.ellipse([size // 4, size // 4, size // 2, size // 2], fill=(230, 40, 40))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Server(BackgroundServer):
    """The app on a given captioner, in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, captioner, settings) -> None:
        from captioner.web.app import create_app

        super().__init__(create_app(lambda: captioner, settings), log_level="error", backlog=1024)

    def batch_counts(self) -> tuple[int, int]:
        stats = self.app.state.batcher.stats()
        return stats.batches, stats.requests


def run_scenario(
    server: Server,
    image: bytes,
    params: dict,
    concurrency: int,
    total: int,
    max_seconds: float,
    batch: int,
) -> Row:
    lock = threading.Lock()
    counter = {"next": 0}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    url = server.url + "/v1/captions"
    deadline = time.monotonic() + max_seconds
    batches0, requests0 = server.batch_counts()

    def worker() -> None:
        with httpx.Client(timeout=60.0) as client:
            while True:
                with lock:
                    if counter["next"] >= total or time.monotonic() > deadline:
                        return
                    counter["next"] += 1
                start = time.perf_counter()
                try:
                    r = client.post(url, params=params, files={"image": ("b.jpg", image)})
                    kind = None if r.status_code == 200 else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    if kind is None:
                        latencies.append(elapsed)
                    else:
                        errors[kind] = errors.get(kind, 0) + 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    batches1, requests1 = server.batch_counts()
    n_batches = batches1 - batches0
    return Row(
        batch=batch,
        concurrency=concurrency,
        sent=counter["next"],
        ok=len(latencies),
        errors=sum(errors.values()),
        seconds=seconds,
        latencies_ms=latencies,
        mean_batch=(requests1 - requests0) / n_batches if n_batches else 0.0,
        error_kinds=errors,
    )


def print_table(rows: list[Row]) -> None:
    table = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for i, line in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        if r.error_kinds:
            print(f"errors at batching={r.batch} conc={r.concurrency}: {r.error_kinds}")


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = common.new_parser(__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved model directory for Captioner.from_pretrained")
    source.add_argument("--default-model", action="store_true", help="the bundled model")
    source.add_argument("--fake", action="store_true", help="FakeCaptioner from tests/")
    p.add_argument("--backend", default="auto", help="from_pretrained backend (auto/onnx/torch)")
    p.add_argument("--fake-call-ms", type=float, default=20.0, help="fake: cost per call")
    p.add_argument("--fake-image-ms", type=float, default=2.0, help="fake: cost per image")
    p.add_argument("--image", type=Path, help="picture to send (default: a synthetic JPEG)")
    p.add_argument("--concurrency", type=ints, default=[1, 4, 16], help="e.g. 1,4,16")
    p.add_argument("--batch-sizes", type=ints, default=[1, 8], help="max_batch_size; 1 = off")
    p.add_argument("--window-ms", type=float, default=10.0, help="batch window")
    p.add_argument("--workers", type=int, default=1, help="inference threads")
    p.add_argument("--requests", type=int, default=200, help="requests per scenario (max)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time per scenario (max)")
    p.add_argument("--warmup", type=int, default=5, help="requests before each server's runs")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--attention", action="store_true", help="ask for attention grids too")
    args = p.parse_args(argv)

    common.use_src()
    from captioner.web.app import ServeSettings

    if args.fake:
        sys.path.insert(0, str(common.REPO / "tests"))
        from web_fakes import FakeCaptioner

        captioner = FakeCaptioner(
            delay_s=args.fake_call_ms / 1000, per_image_s=args.fake_image_ms / 1000
        )
        what = f"FakeCaptioner ({args.fake_call_ms:g} ms/call + {args.fake_image_ms:g} ms/image)"
    else:
        from captioner.api import Captioner

        t0 = time.perf_counter()
        captioner = Captioner.from_pretrained(args.model, backend=args.backend)
        what = f"{args.model or 'bundled model'} (loaded in {time.perf_counter() - t0:.1f}s)"

    image = args.image.read_bytes() if args.image else synthetic_jpeg()
    params = {
        "beam_size": args.beam_size,
        "max_length": args.max_length,
        "attention": str(args.attention).lower(),
    }
    print(f"captioner: {what}")
    print(
        f"image: {len(image) / 1024:.0f} KiB, beam_size={args.beam_size}, "
        f"window={args.window_ms:g} ms, workers={args.workers}, "
        f"at most {args.requests} requests / {args.max_seconds:g} s per scenario\n"
    )
    rows: list[Row] = []
    for batch in args.batch_sizes:
        settings = ServeSettings(
            max_batch_size=batch,
            batch_window_ms=args.window_ms,
            max_queue=max(64, 4 * max(args.concurrency)),
            workers=args.workers,
        )
        with Server(captioner, settings) as server:
            with httpx.Client(timeout=120.0) as client:
                for _ in range(args.warmup):
                    client.post(server.url + "/v1/captions", params=params, files={"image": image})
            for conc in args.concurrency:
                row = run_scenario(
                    server, image, params, conc, args.requests, args.max_seconds, batch
                )
                rows.append(row)
                print(
                    f"  batching={'off' if batch == 1 else batch} conc={conc}: "
                    f"{row.ok} ok in {row.seconds:.1f}s",
                    file=sys.stderr,
                )
    print()
    print_table(rows)
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
