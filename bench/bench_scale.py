"""Training at scale: peak resident memory and captions/s of the out-of-core feature store
(training/feature_store.py) on synthetic caches of 1x, 4x and 16x Flickr8k's 6,000 training
images, against the old in-RAM loader (every view loaded, stacked) at 1x, in the same run.

Each cache has ``--views`` views (view 0 plus augmented ones) of random fp16 (49, 1280) grids
in 512-image safetensors shards, exactly as ``captioner features`` writes them (125 KB an
image: 2.3 GB at 1x with three views, 9 GB at 4x, 36 GB at 16x). Every synthetic image gets the
five captions of a random Flickr8k training image (``--work-dir``'s captions and vocabulary;
a built-in word list when that is missing). Each measurement runs in its own process (so its
peak RSS, ``ru_maxrss``, is its own) and trains ``--steps`` steps of the default recipe's
decoder (512 wide, batches of 100 captions = 20 images, AdamW) with ``loop.train_step``, after
one untimed warm-up step; captions/s counts the timed steps, batch reading included.

    python bench/bench_scale.py --scales 1,4 --steps 40          # ~12 GB of disk
    python bench/bench_scale.py --scales 1,4,16 --steps 40       # ~48 GB: check df -h first

Caches go to a temporary folder under ``--tmp`` (default /tmp) and are deleted afterwards
(``--keep`` keeps them). The goal: at 16x, peak RSS <= 3 GB and within 20% of the store's 1x
run, and captions/s >= 90% of the in-RAM loader at 1x. Both loaders train on the same batches
from the same initial weights, so their per-step losses must be identical (checked at 1x).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLICKR_TRAIN = 6000
P, C = 49, 1280  # efficientnet-lite0 at 224: a 7x7 grid of 1280 channels
SHARD = 512


def make_captions(work_dir: Path, num_images: int, seed: int) -> tuple[list[str], dict, object]:
    """Synthetic image names, each with the captions of a random Flickr8k training image."""
    from captioner.data.vocab import Vocabulary

    rng = np.random.default_rng(seed)
    if (work_dir / "captions.json").is_file():
        from captioner.data.prepare import PreparedData

        prepared = PreparedData.load(work_dir)
        pool = [prepared.captions[n] for n in prepared.splits.train]
        vocab = prepared.vocab
    else:  # no Flickr8k here: a small fixed vocabulary and random sentences
        words = "a dog man woman runs jumps on the in grass water red blue ball child".split()
        pool = [
            [" ".join(rng.choice(words, size=rng.integers(5, 14))) for _ in range(5)]
            for _ in range(500)
        ]
        vocab = Vocabulary.build([c for caps in pool for c in caps], min_count=1)
    names = [f"synthetic_{i:06d}.jpg" for i in range(num_images)]
    picks = rng.integers(0, len(pool), size=num_images)
    return names, {n: pool[int(k)] for n, k in zip(names, picks, strict=True)}, vocab


def write_cache(folder: Path, names: list[str], seed: int) -> None:
    """Random fp16 grids in 512-image shards with a complete manifest (cache.py's layout)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((SHARD, P, C), dtype=np.float32).astype(np.float16)
    shards = {}
    for k, start in enumerate(range(0, len(names), SHARD)):
        part = names[start : start + SHARD]
        grids = np.roll(base, k * 7 + seed, axis=0)[: len(part)]  # distinct per shard, cheaply
        save_file(
            {"features": grids},
            str(folder / f"shard_{k:05d}.safetensors"),
            metadata={"images": json.dumps(part)},
        )
        shards[f"{k:05d}"] = len(part)
    manifest = {"complete": True, "shards": shards, "dataset": {"count": len(names)}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def make_scale(root: Path, scale: int, views: int, work_dir: Path, base: int) -> Path:
    folder = root / f"x{scale}"
    names, captions, vocab = make_captions(work_dir, base * scale, seed=scale)
    for view in range(views):
        write_cache(folder / f"view{view}", names, seed=view)
    val = names[:200]  # dev grids are read from view 0, like the real caches' dev images
    (folder / "data.json").write_text(
        json.dumps({"names": names, "val": val, "captions": captions, "vocab": vocab.to_json()})
    )
    return folder


def child(folder: Path, loader: str, steps: int, threads: int, seed: int) -> dict:
    """One measurement (run in its own process): train ``steps`` steps, report RSS and speed."""
    import torch

    from captioner.data.vocab import Vocabulary
    from captioner.features.cache import load_cache
    from captioner.model.config import DecoderConfig
    from captioner.model.decoder import ShowAttendTellDecoder
    from captioner.training.batching import build_samples, image_batches
    from captioner.training.config import TrainConfig
    from captioner.training.feature_store import TrainingFeatures
    from captioner.training.loop import train_step

    torch.set_num_threads(threads)
    data = json.loads((folder / "data.json").read_text())
    names, vocab = data["names"], Vocabulary(data["vocab"]["itos"])
    dirs = {int(p.name[4:]): p for p in sorted(folder.glob("view*"))}
    t_load = time.perf_counter()
    if loader == "ram":  # the old loader, as training/loop.py had it
        views = {v: load_cache(d) for v, d in dirs.items()}
        names0, feats0 = views[0]
        row0 = {n: i for i, n in enumerate(names0)}
        train = [feats0[torch.tensor([row0[n] for n in names])]]
        train += [views[v][1] for v in sorted(dirs) if v > 0]
        stacked = torch.stack(train)  # (V, N, P, C)
        del views, train, feats0
        num_views = stacked.size(0)
    else:
        store = TrainingFeatures(dirs, names, data["val"])
        num_views = store.num_views
    load_s = time.perf_counter() - t_load
    cfg = TrainConfig()
    samples = build_samples(names, data["captions"], vocab, cfg.max_caption_length)
    torch.manual_seed(seed)
    decoder = ShowAttendTellDecoder(
        DecoderConfig(vocab_size=len(vocab), feature_dim=C, num_pixels=P, dropout=cfg.dropout)
    )
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr)
    batches = image_batches(len(names), cfg.batch_size // 5, seed, 0)[: steps + 1]
    generator = torch.Generator().manual_seed(seed * 7)
    choice = torch.randint(0, num_views, (len(names),), generator=generator)
    if loader == "ram":
        reader = ((b, stacked[choice[images], images]) for b, images in enumerate(batches))
    else:
        reader = store.prefetch(choice, batches)
    losses, captions, t0 = [], 0, None
    for b, grids in reader:
        ce, idx = train_step(decoder, optimizer, grids.float(), samples, batches[b], cfg)
        losses.append(ce)
        if b == 0:
            t0 = time.perf_counter()  # after the warm-up step
        else:
            captions += len(idx)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "loader": loader,
        "images": len(names),
        "views": num_views,
        "load_s": round(load_s, 1),
        "peak_rss_gb": round(peak_kb / 2**20, 2),
        "captions_per_s": round(captions / seconds, 1),
        "steps": len(losses) - 1,
        "losses": losses,
    }


def compare(a: dict, b: dict) -> str:
    pairs = list(zip(a["losses"], b["losses"], strict=True))
    differ = [i for i, (x, y) in enumerate(pairs) if x != y]
    if not differ:
        return f"identical over {len(pairs)} steps"
    worst = max(abs(x - y) for x, y in pairs)
    return f"first differ at step {differ[0]} of {len(pairs)}, max |diff| {worst:.2e}"


def run_child(folder: Path, loader: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, "--folder", str(folder)]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {loader} at {folder.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,4,16", help="multiples of 6,000 images")
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--base", type=int, default=FLICKR_TRAIN, help="images at 1x")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("work/flickr8k"))
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic caches")
    parser.add_argument("--child", choices=["ram", "store"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.folder, args.child, args.steps, args.threads, args.seed)))
        return

    scales = [int(s) for s in args.scales.split(",")]
    need = sum(args.base * s * P * C * 2 * args.views for s in scales) / 1e9
    free = shutil.disk_usage(args.tmp).free / 1e9
    print(f"synthetic caches: {need:.1f} GB needed, {free:.1f} GB free in {args.tmp}")
    if need > free * 0.9:
        sys.exit(f"error: not enough disk in {args.tmp}; try --scales 1,4")
    root = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.tmp))
    rows = []
    try:
        for scale in scales:
            t0 = time.perf_counter()
            folder = make_scale(root, scale, args.views, args.work_dir, args.base)
            print(f"x{scale}: wrote {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
            # the baseline twice at 1x: its spread is the noise floor of captions/s and losses
            loaders = ["ram", "store", "ram"] if scale == 1 else ["store"]
            for loader in loaders:
                row = run_child(folder, loader, args)
                row["scale"] = scale
                rows.append(row)
                print(
                    f"  {loader:5s} x{scale:<2d} {row['images']:>6,} images x {row['views']} "
                    f"views: peak RSS {row['peak_rss_gb']:.2f} GB, "
                    f"{row['captions_per_s']:.1f} captions/s (load {row['load_s']} s)",
                    flush=True,
                )
            if scale == 1:
                for label, (a_row, b_row) in (
                    ("ram vs store", rows[-3:-1]),
                    ("ram vs ram", (rows[-3], rows[-1])),
                ):
                    print(f"  per-step losses, {label}: {compare(a_row, b_row)}", flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ram = next(r for r in rows if r["loader"] == "ram")  # the first baseline run
    store1 = next(r for r in rows if r["loader"] == "store" and r["scale"] == 1)
    print("\n| loader | scale | images | peak RSS GB | captions/s | vs in-RAM 1x |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["captions_per_s"] / ram["captions_per_s"]
        print(
            f"| {r['loader']} | {r['scale']}x | {r['images']:,} | {r['peak_rss_gb']:.2f} "
            f"| {r['captions_per_s']:.1f} | {ratio:.0%} |"
        )
    top = max((r for r in rows if r["loader"] == "store"), key=lambda r: r["scale"])
    print(
        f"\nlargest ({top['scale']}x): RSS {top['peak_rss_gb']:.2f} GB "
        f"({top['peak_rss_gb'] / store1['peak_rss_gb'] - 1:+.0%} vs store 1x; goal <= 3 GB, "
        f"within 20%), speed {top['captions_per_s'] / ram['captions_per_s']:.0%} of in-RAM 1x "
        "(goal >= 90%)"
    )


if __name__ == "__main__":
    main()
