"""`captioner train`: one straight loop over cached features, resumable at any step."""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch

from captioner.data.prepare import PreparedData, PrepareSettings, prepare
from captioner.devices import autocast, grad_scaler, resolve_device, resolve_precision
from captioner.errors import ConfigError, DataError
from captioner.features.encoders import get_spec, trunk_name
from captioner.features.pipeline import ensure_features
from captioner.io import atomic_write_json, read_json
from captioner.model.config import DecoderConfig
from captioner.model.decoder import ShowAttendTellDecoder, masked_caption_loss
from captioner.progress import progress_bar as tqdm  # no bars when stderr is not a TTY
from captioner.settings import cap_threads, check_folder_option
from captioner.training.averaging import set_aside_epoch_weights
from captioner.training.batching import CaptionSamples, build_samples, image_batches
from captioner.training.checkpoint import resume_latest, save_checkpoint, start_over
from captioner.training.config import TrainConfig, _Settings
from captioner.training.distributed import DistContext, broadcast_flag, init_distributed, shutdown
from captioner.training.epochs import EpochLines, EpochRecorder, new_progress
from captioner.training.feature_store import TrainingFeatures
from captioner.training.guards import check_finite_loss
from captioner.training.run_identity import (
    check_vocabulary,
    note_extension,
    record_vocabulary,
    saved_epochs,
)
from captioner.training.schedule import get_lr, param_groups, set_lr, warmup_steps


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    feats: torch.Tensor,
    samples: CaptionSamples,
    images: torch.Tensor,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, torch.Tensor]:
    """One optimizer step on every caption of ``images`` (rows of ``feats`` (I, P, C), on the
    model's device). ``amp_dtype`` autocasts the forward pass and the loss (bf16/fp16; None:
    fp32), ``scaler`` scales an fp16 loss. Returns (cross-entropy, the caption rows used).
    The benchmark times exactly this."""
    idx, image_pos = samples.for_images(images)  # (B,), (B,)
    lengths = samples.lengths[idx]  # (B,) stays on the CPU: the decoder plans its steps from it
    tokens = samples.tokens[idx, : int(lengths.max())].to(feats.device)  # (B, L)
    with autocast(feats.device, amp_dtype):
        out = model(feats, tokens, lengths, image_pos)
        loss, ce = masked_caption_loss(out, cfg.alpha_c, cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
        return float(ce), idx
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(ce), idx


def prepare_data(
    work_dir: str | Path,
    data_dir: str | None,
    settings: PrepareSettings | None = None,
    log=print,
) -> PreparedData:
    """Run `prepare` when its outputs are missing (or a data dir is given), as the original
    train.py did; otherwise load what it wrote."""
    work = Path(work_dir)
    if (work / "dataset.json").is_file() and data_dir is None:
        return PreparedData.load(work)
    if data_dir is None:
        raise DataError(f"{work} is not prepared yet: pass --data-dir with the raw dataset")
    return prepare(data_dir, work, settings or PrepareSettings(), log=log)


def _as_spelled_now(saved: dict, cfg: _Settings) -> dict:
    """The saved settings with the paths that name the same place as ``cfg``'s spelled like
    them: the run dir is wherever the settings file lies now (a moved run dir resumes), and
    ``./work`` is ``work``."""
    saved = {**saved, "run_dir": getattr(cfg, "run_dir", saved.get("run_dir"))}
    for key in ("work_dir", "init_model"):
        old, new = saved.get(key), getattr(cfg, key, None)
        if old is not None and new is not None and Path(old).resolve() == Path(new).resolve():
            saved[key] = new
    return saved


def save_settings(path: Path, cfg: _Settings, restart: bool) -> None:
    """Save the run's settings next to it; a resumed run must keep them (bar the resumable ones)."""
    if path.is_file() and not restart:
        saved = type(cfg).from_json(_as_spelled_now(read_json(path), cfg))
        changed = cfg.differences(saved)
        if changed:
            raise ConfigError(
                f"{path.parent} holds a run with other settings ({', '.join(changed)}); resume it "
                "with the same settings, pick another --run-dir, or pass --restart to start over"
            )
    atomic_write_json(path, cfg.to_json())


def load_training_features(
    prepared: PreparedData,
    encoder: str,
    *,
    backend: str = "auto",
    augment_views: int = 0,
    augment_strength: str = "medium",
    augment_seed: int = 0,
    val_images: int = 0,
    progress: bool = True,
    device: torch.device | None = None,
) -> TrainingFeatures:
    """Extract whatever caches are missing, then index the training views and the dev grids
    (the first ``val_images`` dev images, or all of them when 0) for reading on demand:
    resident memory does not grow with the dataset (training/feature_store.py)."""
    cache_dirs = ensure_features(
        prepared,
        encoder,
        backend=backend,
        augment_views=augment_views,
        augment_strength=augment_strength,
        augment_seed=augment_seed,
        progress=progress,
        device=device,  # a missing cache is extracted on the GPU when training on one
    )
    splits = prepared.splits
    val_names = splits.val[:val_images] if val_images else splits.val
    if not val_names:
        raise DataError("the dev split is empty: validation needs dev images")
    return TrainingFeatures(cache_dirs, list(splits.train), list(val_names))


def train(cfg: TrainConfig, restart: bool = False, log=print) -> Path:
    """Train (or resume) a run; return the directory of the best model."""
    ctx = init_distributed(resolve_device(cfg.device))
    try:
        return _train(cfg, ctx, restart, log if ctx.is_main else (lambda *a, **k: None))
    finally:
        shutdown(ctx)


def _train(cfg: TrainConfig, ctx: DistContext, restart: bool, log) -> Path:
    check_folder_option(cfg.work_dir, "--work-dir")
    check_folder_option(cfg.run_dir, "--run-dir")
    run_dir = Path(cfg.run_dir)
    if cfg.threads:
        torch.set_num_threads(cap_threads(cfg.threads, log=log))
    # data + features: rank 0 builds them, the others wait and then read them
    feature_settings = dict(
        backend=cfg.backend,
        augment_views=cfg.augment_views,
        augment_strength=cfg.augment_strength,
        augment_seed=cfg.seed,
        val_images=cfg.val_images,
        device=ctx.device,
    )
    # a fine-tuned top: the caches hold the trunk's grids, the top runs in the decoder
    feature_encoder = trunk_name(cfg.encoder, cfg.tune_encoder_blocks)
    spec = get_spec(feature_encoder)  # refuses a split the encoder cannot make, before any work
    previous_epochs = None  # --epochs of the run being resumed (main rank)
    if ctx.is_main:
        prepare_settings = PrepareSettings(
            num_words=cfg.num_words or None,
            min_count=cfg.min_count,
            max_images=cfg.max_images or None,
        )
        prepared = prepare_data(cfg.work_dir, cfg.data_dir, prepare_settings, log)
        features = load_training_features(prepared, feature_encoder, **feature_settings)
        check_vocabulary(run_dir, prepared.vocab, cfg.work_dir, restart)
        previous_epochs = saved_epochs(run_dir / "train_config.json")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_settings(run_dir / "train_config.json", cfg, restart)
        record_vocabulary(run_dir, prepared.vocab)
    ctx.barrier()
    if not ctx.is_main:
        prepared = PreparedData.load(cfg.work_dir)
        features = load_training_features(
            prepared, feature_encoder, **feature_settings, progress=False
        )
    vocab, captions, splits = prepared.vocab, prepared.captions, prepared.splits
    samples = build_samples(splits.train, captions, vocab, cfg.max_caption_length)
    captions_per_image = max(1, round(len(samples.lengths) / max(1, samples.num_images)))
    images_per_batch = max(1, cfg.batch_size // captions_per_image)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dcfg = DecoderConfig(
        vocab_size=len(vocab),
        feature_dim=spec.channels,
        num_pixels=spec.num_pixels,
        encoder_top=cfg.encoder if cfg.tune_encoder_blocks else "",
        encoder_top_blocks=cfg.tune_encoder_blocks,
        cell=cfg.cell,
        embed_dim=cfg.embed_dim,
        hidden_dim=cfg.hidden_dim,
        attention_dim=cfg.attention_dim,
        context_dim=cfg.context_dim,
        dropout=cfg.dropout,
    )
    device = ctx.device
    amp_dtype = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(device, amp_dtype)
    decoder = ShowAttendTellDecoder(dcfg, pretrained_top=True).to(device)
    model = decoder
    if ctx.enabled:
        ids = [device.index or 0] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(decoder, device_ids=ids)
    optimizer = torch.optim.AdamW(
        param_groups(decoder, cfg.encoder_lr / cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    batches_per_epoch = len(
        image_batches(samples.num_images, images_per_batch, cfg.seed, 0, ctx.rank, ctx.world_size)
    )
    total_steps = batches_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup = warmup_steps(cfg.warmup_steps, total_steps)
    if warmup < cfg.warmup_steps:
        log(
            f"warm-up: {warmup} step{'s' * (warmup != 1)} (--warmup-steps {cfg.warmup_steps} "
            f"is capped at a fifth of this run's {total_steps} steps)"
        )

    state = new_progress()
    ckpt_root = run_dir / "checkpoints"
    if restart and ctx.is_main:
        start_over(ckpt_root, log)
        set_aside_epoch_weights(run_dir, log)
    resumed = None if restart else resume_latest(ckpt_root, decoder, optimizer, log, ctx.is_main)
    if resumed:
        state.update(resumed)
        if ctx.is_main:
            note_extension(previous_epochs, state["epoch"], cfg.epochs, log)
    if ctx.enabled:  # every rank starts from rank 0's weights
        for p in decoder.state_dict().values():
            torch.distributed.broadcast(p, src=0)

    recorder = EpochRecorder(
        run_dir,
        decoder,
        vocab,
        spec,
        features,
        captions,
        select_metric=cfg.select_metric,
        keep_epochs=cfg.keep_epochs,
        val_max_length=cfg.val_max_length,
        extra={"train_config": cfg.to_json()},
        log=log,
        device=device,
    )

    def checkpoint():
        if ctx.is_main:
            save_checkpoint(
                ckpt_root,
                state["step"],
                decoder,
                optimizer,
                {k: v for k, v in state.items() if k != "step"},
                cfg.keep_last,
            )

    log(
        f"training {dcfg.cell.upper()} decoder: {sum(p.numel() for p in decoder.parameters()):,} "
        f"parameters, {len(samples.lengths):,} captions, {batches_per_epoch} batches/epoch"
        + (f", {ctx.world_size} processes" if ctx.enabled else "")
        + (
            f", {device}" + (f" {str(amp_dtype)[6:]} autocast" if amp_dtype else "")
            if device.type != "cpu"
            else ""
        )
    )
    stop = state["epoch"] >= cfg.epochs or (cfg.max_steps and state["step"] >= cfg.max_steps)
    decoder.train()
    while not stop:
        epoch = state["epoch"]
        batches = image_batches(
            samples.num_images, images_per_batch, cfg.seed, epoch, ctx.rank, ctx.world_size
        )
        view_choice = features.view_choice(cfg.seed, epoch)
        bar = tqdm(
            total=len(batches),
            initial=state["batch"],
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not ctx.is_main,
        )
        if state["batch"] == 0:
            state["train_sum"], state["train_count"] = 0.0, 0
        # a few lines instead where no bar shows (a log file, a pipe); other ranks stay quiet
        lines = EpochLines(
            f"epoch {epoch + 1}/{cfg.epochs}", len(batches), not bar.disable or not ctx.is_main, log
        )
        seen, t0 = 0, time.perf_counter()
        reading = contextlib.closing(features.prefetch(view_choice, batches, state["batch"]))
        with reading as loader:
            for b, grids in loader:
                images = batches[b]  # (I,)
                feats = grids.to(device, non_blocking=True).float()  # (I, P, C)
                set_lr(optimizer, get_lr(state["step"], total_steps, cfg))
                ce, idx = train_step(
                    model, optimizer, feats, samples, images, cfg, amp_dtype, scaler
                )
                check_finite_loss(
                    ce,
                    "the training loss",
                    step=state["step"],
                    epoch=epoch,
                    batch=b,
                    feats=feats,
                    image_names=[splits.train[i] for i in images.tolist()],
                )
                state["step"] += 1
                state["batch"] = b + 1
                state["train_sum"] += float(ce) * len(idx)
                state["train_count"] += len(idx)
                seen += len(idx)
                elapsed = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(
                    loss=f"{state['train_sum'] / state['train_count']:.3f}",
                    caps_s=f"{seen * ctx.world_size / max(elapsed, 1e-9):.0f}",
                )
                lines.batch_done(b, f"loss {state['train_sum'] / state['train_count']:.3f}")
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    break
                if state["step"] % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                    state["seconds"] += time.perf_counter() - t0
                    t0, seen = time.perf_counter(), 0
                    checkpoint()
        bar.close()
        state["seconds"] += time.perf_counter() - t0
        epoch_done = state["batch"] >= len(batches)
        if not epoch_done:  # stopped by --max-steps inside an epoch
            checkpoint()
            break
        # end of epoch: free-running validation on rank 0, selection, early stopping
        if ctx.is_main:
            recorder.end_epoch(
                state,
                epoch,
                ("train_loss", state["train_sum"] / max(state["train_count"], 1)),
                get_lr(state["step"], total_steps, cfg),
            )
        state["epoch"] = epoch + 1
        state["batch"] = 0
        checkpoint()
        early = bool(cfg.patience) and state["bad_epochs"] >= cfg.patience
        if early and ctx.is_main:
            log(f"early stopping: no better dev {cfg.select_metric} for {cfg.patience} epochs")
        stop = broadcast_flag(
            early
            or state["epoch"] >= cfg.epochs
            or bool(cfg.max_steps and state["step"] >= cfg.max_steps),
            ctx,
        )
    if ctx.enabled:
        check_ranks_in_sync(decoder, ctx, run_dir)
    ctx.barrier()
    return run_dir / "best"


def check_ranks_in_sync(decoder: torch.nn.Module, ctx: DistContext, run_dir: Path) -> None:
    """Every rank's weights must be identical after DDP training; rank 0 records the proof."""
    checksum = torch.stack([p.detach().double().sum() for p in decoder.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(gathered, checksum)
    values = [float(v) for v in gathered]
    if ctx.is_main:
        atomic_write_json(
            run_dir / "ranks.json", {"world_size": ctx.world_size, "weight_checksums": values}
        )
    if len(set(values)) != 1:
        raise RuntimeError(f"DDP ranks diverged: weight checksums {values}")
