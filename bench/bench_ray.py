"""Ray Data scaling on one machine: `caption --ray` with 1 vs 2 captioning actors, images/s.

Each run starts a fresh local Ray cluster (loopback only) of --cpus CPUs, captions the first
--limit images of a folder into a throwaway JSONL, and times the whole run (actor start and
model load included: what a user waits for). Runs alternate 1, 2, 1, 2, ... so a shared
machine's load hits both sides alike. Prints one line per run and the load average.

    .venv/bin/python bench/bench_ray.py ../shared/data/flickr8k/images --limit 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import ray

    from captioner.bulk.inputs import walk_images
    from captioner.distributed.ray_data import caption_dataset

    files = [str(p) for _, p in zip(range(args.limit), walk_images(args.images))]
    with tempfile.TemporaryDirectory() as tmp:
        list_file = Path(tmp) / "files.txt"
        list_file.write_text("\n".join(files) + "\n")
        results: dict[int, list[float]] = {w: [] for w in args.workers}
        for repeat in range(args.repeats):
            for workers in args.workers:
                out = Path(tmp) / f"run{repeat}-{workers}.jsonl"
                ray.init(
                    num_cpus=args.cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    configure_logging=False,
                    log_to_driver=False,
                )
                try:
                    started = time.perf_counter()
                    stats = caption_dataset(
                        [f"@{list_file}"],
                        out,
                        concurrency=workers,
                        batch_size=args.batch_size,
                        progress=False,
                    )
                    wall = time.perf_counter() - started
                finally:
                    ray.shutdown()
                rate = stats.captioned / wall
                results[workers].append(rate)
                print(
                    f"run {repeat} workers {workers}: {stats.captioned} images in {wall:.1f} s "
                    f"= {rate:.2f} images/s (load average {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    for workers, rates in results.items():
        best = max(rates)
        print(f"workers {workers}: best {best:.2f} images/s, runs {[round(r, 2) for r in rates]}")


if __name__ == "__main__":
    main()
