"""Self-critical sequence training: fine-tune a cross-entropy model on its own samples, rewarded
by CIDEr-D (Rennie et al. 2017, with the mean of the other samples of the same image as the
baseline, as in Luo 2020 "A Better Variant of Self-Critical Sequence Training").

Teacher forcing only ever shows the decoder the human prefix; at test time it continues its own.
Sampling whole captions and reinforcing those that beat their siblings closes that gap and
optimises the metric the model is judged by. Runs resume from the latest checkpoint like
`captioner train`, and each epoch is validated (greedy, dev split) and kept for averaging.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.data.vocab import Vocabulary
from captioner.decoding.steps import banned_ids, masked_log_probs, select_rows
from captioner.devices import autocast, grad_scaler, resolve_device, resolve_precision
from captioner.errors import ConfigError
from captioner.model.captioning_model import CaptioningModel
from captioner.model.decoder import ShowAttendTellDecoder
from captioner.progress import progress_bar as tqdm  # no bars when stderr is not a TTY
from captioner.settings import cap_threads, check_folder_option
from captioner.training.averaging import set_aside_epoch_weights
from captioner.training.batching import CaptionSamples, build_samples, image_batches
from captioner.training.caption_reward import CaptionReward
from captioner.training.checkpoint import resume_latest, save_checkpoint, start_over
from captioner.training.config import ScstConfig
from captioner.training.epochs import EpochLines, EpochRecorder, new_progress
from captioner.training.guards import check_finite_loss
from captioner.training.loop import load_training_features, prepare_data, save_settings
from captioner.training.run_identity import note_extension, saved_epochs
from captioner.training.schedule import cosine_decay, param_groups, set_lr


@dataclass
class SampledCaptions:
    token_ids: list[list[int]]  # (N,) each without <end>; row n belongs to image n // K
    log_prob_sums: torch.Tensor  # (N,) sum of the sampled tokens' log-probs (<end> included)
    num_tokens: torch.Tensor  # (N,) tokens scored per row (<end> included)

    @property
    def finished(self) -> list[bool]:
        """(N,) whether each row ended with <end>: then one more token was scored than kept."""
        return [int(n) > len(ids) for n, ids in zip(self.num_tokens, self.token_ids, strict=True)]


def sample_captions(
    decoder: ShowAttendTellDecoder,
    features: torch.Tensor,
    num_samples: int,
    max_length: int,
    *,
    start_id: int,
    end_id: int,
    banned: torch.Tensor,
    generator: torch.Generator | None = None,
) -> SampledCaptions:
    """Sample ``num_samples`` captions per image of ``features`` (I, P, C), keeping the graph of
    their log-probabilities. Finished rows leave the batch, as in greedy decoding."""
    num_images, device = features.size(0), features.device
    n = num_images * num_samples
    memory, state = decoder.start(features)  # per image
    per_row = torch.arange(num_images, device=device).repeat_interleave(num_samples)  # (N,)
    memory, state = select_rows(memory, per_row), select_rows(state, per_row)
    active = torch.arange(n, device=device)  # (n,) the rows still going
    tokens = torch.full((n,), start_id, dtype=torch.long, device=device)
    log_prob_sums = torch.zeros(n, device=device)
    num_tokens = torch.zeros(n, device=device)
    sampled: list[list[int]] = [[] for _ in range(n)]
    for t in range(max_length):
        logits, state, _ = decoder.step(tokens, state, memory)  # (n, V)
        log_probs = masked_log_probs(logits, banned)  # (n, V)
        with torch.no_grad():
            tokens = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
        chosen = log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (n,)
        log_prob_sums = log_prob_sums.index_add(0, active, chosen)
        num_tokens.index_add_(0, active, torch.ones_like(chosen))
        done = tokens == end_id
        for row, token in zip(active[~done].tolist(), tokens[~done].tolist(), strict=True):
            sampled[row].append(token)
        if t == max_length - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            active, tokens = active[keep], tokens[keep]
            state, memory = select_rows(state, keep), select_rows(memory, keep)
    return SampledCaptions(sampled, log_prob_sums, num_tokens)


def self_critical_loss(
    log_prob_sums: torch.Tensor, num_tokens: torch.Tensor, rewards: torch.Tensor
) -> torch.Tensor:
    """rewards (I, K): each sample's advantage is its reward minus the mean of its K-1 siblings';
    the policy-gradient loss is averaged over the sampled tokens."""
    k = rewards.size(1)
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)  # (I, K)
    advantage = (rewards - baseline).reshape(-1)  # (N,)
    return -(advantage * log_prob_sums).sum() / num_tokens.sum().clamp(min=1)


def reference_corpus(samples: CaptionSamples) -> list[list[list[int]]]:
    """The training captions of every image as word ids for the reward: no <start> or <end>."""
    corpus = []
    for i in range(samples.num_images):
        rows = range(int(samples.offsets[i]), int(samples.offsets[i + 1]))
        corpus.append([samples.tokens[r, 1 : int(samples.lengths[r]) - 1].tolist() for r in rows])
    return corpus


def scst_lr(step: int, total_steps: int, cfg: ScstConfig) -> float:
    """Constant --lr, or a cosine decay from --lr to --min-lr over the run (a function of step)."""
    if cfg.min_lr is None:
        return cfg.lr
    return cosine_decay(cfg.lr, cfg.min_lr, step / max(1, total_steps))


def scst_step(
    decoder: ShowAttendTellDecoder,
    optimizer: torch.optim.Optimizer,
    feats: torch.Tensor,
    images: torch.Tensor,
    reward: CaptionReward,
    cfg: ScstConfig,
    vocab: Vocabulary,
    generator: torch.Generator,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    guard: Callable[[float], None] | None = None,
) -> tuple[float, float]:
    """One update on the images (rows of ``feats`` (I, P, C) on the decoder's device;
    ``images`` their corpus index); ``generator`` lives on that device too. ``guard`` sees the
    loss before it is back-propagated (and may raise to stop the update). Returns (mean
    sampled reward, mean caption length)."""
    device = feats.device
    if guard is not None and not bool(torch.isfinite(feats).all()):
        guard(float("nan"))  # NaN grids would make the sampling itself fail
    banned = torch.tensor(banned_ids(vocab.pad_id, vocab.start_id, vocab.unk_id, True))
    with autocast(device, amp_dtype):
        sampled = sample_captions(
            decoder,
            feats,
            cfg.samples_per_image,
            cfg.max_length,
            start_id=vocab.start_id,
            end_id=vocab.end_id,
            banned=banned.to(device),
            generator=generator,
        )
    owners = images.repeat_interleave(cfg.samples_per_image).tolist()
    scores = reward.scores(sampled.token_ids, sampled.finished, owners)
    rewards = torch.tensor(scores, device=device).view(-1, cfg.samples_per_image)  # (I, K)
    loss = self_critical_loss(sampled.log_prob_sums, sampled.num_tokens, rewards)
    if guard is not None:
        guard(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    scaled = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaled else loss).backward()
    if scaled:
        scaler.unscale_(optimizer)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
    if scaled:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(rewards.mean()), float(sampled.num_tokens.mean())


def train_scst(cfg: ScstConfig, restart: bool = False, log=print) -> Path:
    """Fine-tune ``cfg.init_model`` with SCST (or resume it); return the best model's directory."""
    check_folder_option(cfg.work_dir, "--work-dir")
    check_folder_option(cfg.run_dir, "--run-dir")
    run_dir = Path(cfg.run_dir)
    if cfg.threads:
        torch.set_num_threads(cap_threads(cfg.threads, log=log))
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    scaler = grad_scaler(device, amp_dtype)
    start = CaptioningModel.from_pretrained(cfg.init_model, device=str(device))
    decoder, vocab, spec = start.decoder, start.vocab, start.encoder
    prepared = prepare_data(cfg.work_dir, cfg.data_dir, log=log)
    if prepared.vocab.to_json() != vocab.to_json():
        raise ConfigError(
            f"{cfg.init_model} was trained with another vocabulary than {cfg.work_dir}'s"
        )
    features = load_training_features(
        prepared,
        spec.name,
        backend=cfg.backend,
        augment_views=cfg.augment_views,
        augment_strength=cfg.augment_strength,
        augment_seed=cfg.seed,
        val_images=cfg.val_images,
        device=device,
    )
    previous_epochs = saved_epochs(run_dir / "scst_config.json")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_settings(run_dir / "scst_config.json", cfg, restart)
    train_names = list(prepared.splits.train)
    samples = build_samples(train_names, prepared.captions, vocab)
    reward = CaptionReward.from_references(
        reference_corpus(samples),
        end_id=vocab.end_id,
        reward_end=cfg.reward_end,
        bleu_weight=cfg.bleu_weight,
        bleu_order=cfg.bleu_order,
    )
    if cfg.dropout is not None:
        decoder.dropout.p = cfg.dropout

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    generator = torch.Generator(device=device)
    optimizer = torch.optim.Adam(param_groups(decoder, cfg.encoder_lr / cfg.lr), lr=cfg.lr)
    batches_per_epoch = len(image_batches(samples.num_images, cfg.images_per_batch, cfg.seed, 0))
    total_steps = cfg.epochs * batches_per_epoch
    state = new_progress()
    ckpt_root = run_dir / "checkpoints"
    if restart:
        start_over(ckpt_root, log)
        set_aside_epoch_weights(run_dir, log)
    resumed = None if restart else resume_latest(ckpt_root, decoder, optimizer, log)
    if resumed:
        state.update(resumed)
        note_extension(previous_epochs, state["epoch"], cfg.epochs, log)
    recorder = EpochRecorder(
        run_dir,
        decoder,
        vocab,
        spec,
        features,
        prepared.captions,
        select_metric=cfg.select_metric,
        keep_epochs=cfg.keep_epochs,
        val_max_length=cfg.val_max_length,
        extra={"scst_config": cfg.to_json(), "init_model": start.extra},
        log=log,
        device=device,
    )

    def checkpoint():
        progress = {k: v for k, v in state.items() if k != "step"}
        save_checkpoint(ckpt_root, state["step"], decoder, optimizer, progress, cfg.keep_last)

    log(
        f"self-critical training from {cfg.init_model}: {samples.num_images:,} images, "
        f"{cfg.samples_per_image} samples each, {batches_per_epoch} batches/epoch"
    )
    decoder.train()
    stop = state["epoch"] >= cfg.epochs or (cfg.max_steps and state["step"] >= cfg.max_steps)
    while not stop:
        epoch = state["epoch"]
        batches = image_batches(samples.num_images, cfg.images_per_batch, cfg.seed, epoch)
        view_choice = features.view_choice(cfg.seed, epoch)
        bar = tqdm(
            total=len(batches), initial=state["batch"], desc=f"scst {epoch + 1}/{cfg.epochs}"
        )
        if state["batch"] == 0:
            state["train_sum"], state["train_count"] = 0.0, 0
        # a few lines instead where no bar shows (a log file, a pipe)
        lines = EpochLines(f"scst {epoch + 1}/{cfg.epochs}", len(batches), not bar.disable, log)
        t0 = time.perf_counter()
        reading = contextlib.closing(features.prefetch(view_choice, batches, state["batch"]))
        with reading as loader:
            for b, grids in loader:
                images = batches[b]
                feats = grids.to(device, non_blocking=True).float()  # (I, P, C)
                # samples depend on (seed, step) alone, so a resumed run draws what it would have
                generator.manual_seed(cfg.seed * 1_000_003 + state["step"])
                set_lr(optimizer, scst_lr(state["step"], total_steps, cfg))
                mean_reward, length = scst_step(
                    decoder,
                    optimizer,
                    feats,
                    images,
                    reward,
                    cfg,
                    vocab,
                    generator,
                    amp_dtype,
                    scaler,
                    guard=functools.partial(
                        check_finite_loss,
                        what="the self-critical loss",
                        step=state["step"],
                        epoch=epoch,
                        batch=b,
                        feats=feats,
                        image_names=[train_names[i] for i in images.tolist()],
                    ),
                )
                state["step"] += 1
                state["batch"] = b + 1
                state["train_sum"] += mean_reward
                state["train_count"] += 1
                bar.update(1)
                mean = state["train_sum"] / state["train_count"]
                bar.set_postfix(reward=f"{mean:.3f}", length=f"{length:.1f}")
                lines.batch_done(b, f"reward {mean:.3f}")
                if cfg.max_steps and state["step"] >= cfg.max_steps:
                    break
                if state["step"] % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                    state["seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint()
        bar.close()
        state["seconds"] += time.perf_counter() - t0
        if state["batch"] < len(batches):  # stopped by --max-steps inside an epoch
            checkpoint()
            break
        recorder.end_epoch(
            state,
            epoch,
            ("train_reward", state["train_sum"] / max(state["train_count"], 1)),
            scst_lr(state["step"], total_steps, cfg),
        )
        state["epoch"] = epoch + 1
        state["batch"] = 0
        checkpoint()
        early = bool(cfg.patience) and state["bad_epochs"] >= cfg.patience
        if early:
            log(f"early stopping: no better dev {cfg.select_metric} for {cfg.patience} epochs")
        stop = (
            early
            or state["epoch"] >= cfg.epochs
            or bool(cfg.max_steps and state["step"] >= cfg.max_steps)
        )
    return run_dir / "best"
