"""Decoder training throughput on cached Flickr8k features: our trainer vs a naive tutorial loop.

Both train on the same cached EfficientNet-Lite features (``work/flickr8k``, view 0, training
split), with the same sizes (embedding, hidden and attention 512; vocabulary of the work dir),
the same optimizer (AdamW, lr 1e-3) and the same number of threads, in the same process.

ours (exactly what ``captioner.training.loop`` does per step)
    ``image_batches`` of ``batch_size // captions_per_image`` images (150 // 5 = 30 images,
    ~150 captions), ``CaptionSamples.for_images`` -> every caption of those images,
    ``ShowAttendTellDecoder.forward(feats, tokens, lengths, image_pos)`` (each image projected
    once, its keys computed once, captions sorted by length so finished ones drop out),
    ``masked_caption_loss`` (alpha_c 1.0), backward, ``clip_grad_norm_(5.0)``, ``AdamW.step``.

naive baseline (written here; the common tutorial loop, after the TensorFlow "Show, Attend and
Tell" tutorial)
    a padded batch of 64 random captions (not grouped by image, not sorted by length; padded to
    the longest caption of the batch, which is kinder than the tutorial's padding to the
    dataset's longest), each with its own copy of its image's features; an encoder
    ``Linear(1280 -> 512) + ReLU``; then a Python loop over time steps: Bahdanau attention
    ``V(tanh(W1(features) + W2(h)))`` (``W1(features)`` recomputed at every step), context =
    attention-weighted sum, ``GRUCell([embedding; context] -> 512)``, ``fc2(fc1(h))`` to the
    vocabulary, and a masked cross-entropy per step, summed. No dropout, no gradient clipping.

Both are interleaved batch by batch (whichever has done the smaller fraction of its batches goes
next), so background load hits both alike; one warm-up batch each is excluded. Throughput counts
captions (and predicted tokens, <end> included) over the timed batches; the timing covers
gathering the batch, forward, loss, backward, clipping and the optimizer step.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward of
every timed batch, replayed on the ``meta`` device after the timing (shapes only, no arithmetic,
so the count is exact for the shapes that ran and costs no real compute). It counts the matrix
products (mm, addmm, bmm, and their backward: roughly 3x the forward), not the elementwise ops,
the softmax or the optimizer; GFLOP/s = counted FLOPs / timed seconds. ``--no-flops`` skips it.

    python bench/bench_train.py                      # 3000 captions each, 2 threads
    python bench/bench_train.py --quick              # ~300 / 128 captions: end-to-end check
    python bench/bench_train.py --captions 6000 --naive-captions 1280 --threads 2

Reference (quiet 2-core machine): naive 10-18 captions/s; target ours >= 100 captions/s, >= 5x.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAIVE_BATCH = 64


# ---- the naive baseline ---------------------------------------------------------------------


def build_naive(vocab_size: int, feature_dim: int, embed: int = 512, units: int = 512):
    """The tutorial's CNN_Encoder + RNN_Decoder (BahdanauAttention, GRU) in PyTorch."""
    import torch
    from torch import nn

    class BahdanauAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.W1 = nn.Linear(embed, units)
            self.W2 = nn.Linear(units, units)
            self.V = nn.Linear(units, 1)

        def forward(self, features, hidden):  # (B, P, E), (B, H)
            # W1(features) does not change over time, yet is recomputed at every step
            score = self.V(torch.tanh(self.W1(features) + self.W2(hidden).unsqueeze(1)))
            weights = torch.softmax(score, dim=1)  # (B, P, 1)
            return (weights * features).sum(dim=1), weights  # (B, E)

    class NaiveDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder_fc = nn.Linear(feature_dim, embed)  # the tutorial's CNN_Encoder
            self.embedding = nn.Embedding(vocab_size, embed)
            self.attention = BahdanauAttention()
            self.gru = nn.GRUCell(embed + embed, units)  # input [context; embedding]
            self.fc1 = nn.Linear(units, units)
            self.fc2 = nn.Linear(units, vocab_size)

        def encode(self, feats):
            return torch.relu(self.encoder_fc(feats))

        def step(self, tokens, features, hidden):
            context, _ = self.attention(features, hidden)
            x = torch.cat([context, self.embedding(tokens)], dim=1)
            hidden = self.gru(x, hidden)
            return self.fc2(self.fc1(hidden)), hidden

    return NaiveDecoder()


def naive_loss(model, feats, tokens):
    """The tutorial's train_step: teacher forcing, one masked cross-entropy per time step."""
    import torch
    import torch.nn.functional as F

    features = model.encode(feats)  # (B, P, E)
    hidden = torch.zeros(tokens.size(0), model.gru.hidden_size, device=feats.device)
    loss, ce_sum = 0.0, 0.0
    for t in range(1, tokens.size(1)):
        logits, hidden = model.step(tokens[:, t - 1], features, hidden)
        target = tokens[:, t]
        per_token = F.cross_entropy(logits, target, reduction="none") * (target != 0)
        loss = loss + per_token.mean()
        ce_sum = ce_sum + per_token.detach().sum()
    return loss, ce_sum / (tokens[:, 1:] != 0).sum()  # (summed loss, mean CE per real token)


# ---- bookkeeping ----------------------------------------------------------------------------


@dataclass
class Runner:
    label: str
    batches: list  # whatever ``step`` takes
    step: object  # callable(batch) -> (captions, tokens, loss float)
    seconds: float = 0.0
    captions: int = 0
    tokens: int = 0
    done: int = 0
    losses: list[float] = field(default_factory=list)
    flops: int | None = None

    def run_next(self) -> None:
        t0 = time.perf_counter()
        captions, tokens, loss = self.step(self.batches[self.done])
        self.seconds += time.perf_counter() - t0
        self.captions += captions
        self.tokens += tokens
        self.losses.append(loss)
        self.done += 1

    @property
    def progress(self) -> float:
        return self.done / len(self.batches)

    @property
    def rate(self) -> float:
        return self.captions / self.seconds

    def row(self) -> list[str]:
        gflops = f"{self.flops / 1e9:.0f}" if self.flops is not None else "-"
        rate = f"{self.flops / 1e9 / self.seconds:.1f}" if self.flops is not None else "-"
        return [
            self.label,
            str(self.done),
            str(self.captions),
            str(self.tokens),
            f"{self.seconds:.1f}",
            f"**{self.rate:.1f}**",
            f"{self.tokens / self.seconds:.0f}",
            gflops,
            rate,
            f"{self.losses[0]:.2f} -> {self.losses[-1]:.2f}",
        ]


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def load_data(work_dir: Path, encoder: str, data_dir: Path):
    """Prepared work dir + view-0 features of the training images, or exit with a message."""
    from captioner.data.prepare import PreparedData
    from captioner.errors import CaptionerError
    from captioner.features.pipeline import ensure_features, load_features

    if not (work_dir / "dataset.json").is_file():
        sys.exit(
            f"error: {work_dir} is not a prepared work directory\n"
            f"prepare it first: captioner prepare --data-dir {data_dir} "
            f"--work-dir {work_dir}; then captioner features --work-dir {work_dir}"
        )
    try:
        prepared = PreparedData.load(work_dir)
        if not prepared.images_dir.is_dir():
            sys.exit(
                f"error: the images of {work_dir} are missing ({prepared.images_dir}); "
                f"is {data_dir} there?"
            )
        t0 = time.perf_counter()
        dirs = ensure_features(prepared, encoder, progress=True)
        names, feats = load_features({0: dirs[0]})[0]
    except CaptionerError as exc:
        sys.exit(f"error: {exc}")
    print(
        f"features: {dirs[0]} {tuple(feats.shape)} {feats.dtype}, "
        f"loaded in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return prepared, names, feats


def main(argv: list[str] | None = None) -> int:
    p = common.new_parser(__doc__)
    common.add_dir_args(
        p,
        data_help="raw Flickr8k (only checked, for messages)",
        work_help="prepared work dir with cached features",
    )
    p.add_argument("--encoder", default="efficientnet-lite0", help="feature cache to use")
    p.add_argument(
        "--captions",
        type=int,
        default=3000,
        help="captions to time for ours (whole batches; default 3000)",
    )
    p.add_argument(
        "--naive-captions",
        type=int,
        default=None,
        help="captions to time for the naive loop (default: --captions)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for both (2)")
    p.add_argument(
        "--cell",
        choices=["gru", "lstm"],
        default="gru",
        help="our decoder's cell (the naive baseline is always GRU)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="our captions per batch (default: TrainConfig.batch_size)",
    )
    p.add_argument("--seed", type=int, default=0, help="batch order and initial weights")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument(
        "--quick",
        action="store_true",
        help="~300 captions ours, 128 naive: a fast end-to-end check",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.captions = min(args.captions, 300)
        args.naive_captions = min(args.naive_captions or 128, 128)
    if args.naive_captions is None:
        args.naive_captions = args.captions
    if min(args.captions, args.naive_captions, args.threads) < 1:
        p.error("--captions, --naive-captions and --threads must be positive")

    common.use_src()
    import torch

    from captioner.model.config import DecoderConfig
    from captioner.model.decoder import ShowAttendTellDecoder, masked_caption_loss
    from captioner.training.batching import build_samples, image_batches
    from captioner.training.config import TrainConfig
    from captioner.training.loop import train_step

    torch.set_num_threads(args.threads)
    common.print_header(
        "Decoder training throughput: ours vs naive tutorial loop", args.threads, onnxruntime=False
    )
    cfg = TrainConfig(seed=args.seed, cell=args.cell)
    batch_size = args.batch_size or cfg.batch_size
    prepared, names, feats0 = load_data(args.work_dir, args.encoder, args.data_dir)
    row0 = {n: i for i, n in enumerate(names)}
    train_feats = feats0[torch.tensor([row0[n] for n in prepared.splits.train])]  # (I, P, C) fp16
    del feats0
    samples = build_samples(
        prepared.splits.train, prepared.captions, prepared.vocab, cfg.max_caption_length
    )
    vocab_size = len(prepared.vocab)
    feature_dim, num_pixels = train_feats.size(2), train_feats.size(1)

    # ---- ours: image-grouped batches, exactly as training/loop.py ---------------------------
    torch.manual_seed(args.seed)
    decoder = ShowAttendTellDecoder(
        DecoderConfig(
            vocab_size=vocab_size,
            feature_dim=feature_dim,
            num_pixels=num_pixels,
            cell=cfg.cell,
            embed_dim=cfg.embed_dim,
            hidden_dim=cfg.hidden_dim,
            attention_dim=cfg.attention_dim,
            context_dim=cfg.context_dim,
            dropout=cfg.dropout,
        )
    )
    decoder.train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_image = max(1, round(len(samples.lengths) / max(1, samples.num_images)))
    images_per_batch = max(1, batch_size // per_image)
    epoch_batches = image_batches(samples.num_images, images_per_batch, args.seed, 0)
    ours_batches, total = [], 0
    for images in epoch_batches[1:]:  # [0] is the warm-up batch
        if total >= args.captions:
            break
        ours_batches.append(images)
        total += int((samples.offsets[images + 1] - samples.offsets[images]).sum())

    def ours_step(images):
        # the trainer's own step (captioner.training.loop.train_step), plus gathering the batch's
        # features as the trainer does; only the counts are worked out here
        feats = train_feats[images].float()
        ce, rows = train_step(decoder, optimizer, feats, samples, images, cfg)
        return len(rows), int((samples.lengths[rows] - 1).sum()), ce

    # ---- naive: 64 random captions, padded, per-step loop --------------------------------------
    torch.manual_seed(args.seed)
    naive = build_naive(vocab_size, feature_dim)
    naive.train()
    naive_opt = torch.optim.AdamW(naive.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    caption_image = torch.repeat_interleave(
        torch.arange(samples.num_images), samples.offsets[1:] - samples.offsets[:-1]
    )
    shuffled = torch.randperm(
        len(samples.lengths), generator=torch.Generator().manual_seed(args.seed + 1)
    )
    n_naive = math.ceil(args.naive_captions / NAIVE_BATCH)
    naive_all = list(shuffled.split(NAIVE_BATCH))[: n_naive + 1]  # [0] is the warm-up batch

    def naive_inputs(rows):
        lengths = samples.lengths[rows]
        tokens = samples.tokens[rows, : int(lengths.max())]  # padded to the batch's longest
        return train_feats[caption_image[rows]].float(), tokens, lengths

    def naive_step(rows):
        feats, tokens, lengths = naive_inputs(rows)
        loss, ce = naive_loss(naive, feats, tokens)
        naive_opt.zero_grad(set_to_none=True)
        loss.backward()
        naive_opt.step()
        return len(rows), int((lengths - 1).sum()), float(ce)

    n_params = [sum(q.numel() for q in m.parameters()) for m in (decoder, naive)]
    print(
        f"data: {samples.num_images} training images, {len(samples.lengths)} captions, "
        f"vocabulary {vocab_size}; ours: {cfg.cell.upper()}, {n_params[0]:,} parameters, "
        f"{images_per_batch} images (~{images_per_batch * per_image} captions) per batch, "
        f"{len(ours_batches)} timed batches; naive: GRU, {n_params[1]:,} parameters, "
        f"{NAIVE_BATCH} captions per batch, {n_naive} timed batches; 1 warm-up batch each\n",
        flush=True,
    )

    ours = Runner("ours (image-grouped, sorted, hoisted)", ours_batches, ours_step)
    base = Runner("naive tutorial loop (baseline)", naive_all[1:], naive_step)
    t0 = time.perf_counter()
    ours_step(epoch_batches[0])
    naive_step(naive_all[0])
    print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    while ours.done < len(ours.batches) or base.done < len(base.batches):
        runner = ours if ours.progress <= base.progress else base
        if runner.done == len(runner.batches):
            runner = base if runner is ours else ours
        runner.run_next()
    print(f"timed: {ours.seconds + base.seconds:.1f} s\n", flush=True)

    if not args.no_flops:  # replay every timed batch on the meta device: shapes only
        t0 = time.perf_counter()
        meta_dec = copy.deepcopy(decoder).to("meta")
        meta_naive = copy.deepcopy(naive).to("meta")

        # train_step itself cannot run here: it returns float(ce), and .item() is refused on
        # meta tensors (its optimizer step would also be pure waste). So this replays its
        # forward + loss + backward on the same inputs, built as train_step builds them; the
        # clipping and AdamW step it leaves out are elementwise, which FlopCounterMode does not
        # count anyway, so the count is the same as for the whole step.
        def ours_meta(images):
            idx, image_pos = samples.for_images(images)
            lengths = samples.lengths[idx]
            tokens = samples.tokens[idx, : int(lengths.max())]
            feats = train_feats[images].float()
            out = meta_dec(feats.to("meta"), tokens.to("meta"), lengths, image_pos)
            masked_caption_loss(out, cfg.alpha_c, cfg.label_smoothing)[0].backward()

        def naive_meta(rows):
            feats, tokens, _ = naive_inputs(rows)
            naive_loss(meta_naive, feats.to("meta"), tokens.to("meta"))[0].backward()

        ours.flops = sum(count_flops(lambda b=b: ours_meta(b)) for b in ours.batches)
        base.flops = sum(count_flops(lambda b=b: naive_meta(b)) for b in base.batches)
        print(
            f"FLOP count (meta replay of {len(ours.batches) + len(base.batches)} batches): "
            f"{time.perf_counter() - t0:.1f} s\n",
            flush=True,
        )

    print(
        common.markdown_table(
            [
                "implementation",
                "batches",
                "captions",
                "tokens",
                "seconds",
                "captions/s",
                "tokens/s",
                "GFLOP (fwd+bwd)",
                "GFLOP/s",
                "CE first -> last",
            ],
            [ours.row(), base.row()],
        )
    )
    ratio = ours.rate / base.rate
    print(f"\nours / naive: **{ratio:.2f}x** captions/s", end="")
    if ours.flops is not None:
        print(
            f"; FLOPs per caption: ours {ours.flops / ours.captions / 1e6:.0f} M, naive "
            f"{base.flops / base.captions / 1e6:.0f} M",
            end="",
        )
    print(f"\nload average now {common.load_average()}")
    met = ours.rate >= 100 and ratio >= 5
    print(f"target ours >= 100 captions/s and >= 5x naive: {'met' if met else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
