"""Every training setting, with its default, help text and allowed values; saved as
train_config.json (and scst_config.json for self-critical fine-tuning). Types and ranges are
checked by captioner.settings when a config is made, from the CLI or from a saved file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TypeVar

from captioner.devices import DEVICES, PRECISIONS
from captioner.errors import ConfigError
from captioner.model.config import MAX_DIM
from captioner.settings import BACKENDS, check_settings, settings_from_json
from captioner.settings import setting as _f

SettingsT = TypeVar("SettingsT", bound="_Settings")
SELECT_METRICS = ("CIDEr-D", "BLEU-4")
AUGMENT_STRENGTHS = ("light", "medium", "strong")
CELLS = ("gru", "lstm")
# settings that may change between a run and its resumption
# (device and precision too: a run started on a GPU may resume on the CPU and back)
_RESUMABLE = (
    "epochs",
    "threads",
    "patience",
    "data_dir",
    "max_steps",
    "keep_epochs",
    "device",
    "precision",
)


class _Settings:
    """Saving, loading and comparing a settings dataclass (train_config.json, scst_config.json)."""

    RESUMABLE_CHANGES: tuple[str, ...] = ()

    def _check(self) -> None:
        check_settings(self, flags=True)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr must be at most --lr ({self.lr}), not {self.min_lr}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls: type[SettingsT], data: dict) -> SettingsT:
        return settings_from_json(cls, data, "training settings")

    def differences(self, other: _Settings) -> list[str]:
        return [
            f.name
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
            and f.name not in self.RESUMABLE_CHANGES
        ]


@dataclass
class TrainConfig(_Settings):
    # data
    data_dir: str | None = _f(None, "raw dataset folder; prepared into --work-dir when needed")
    work_dir: str = _f("work/flickr8k", "prepared data + feature caches")
    run_dir: str = _f("runs/flickr8k", "checkpoints, metrics.csv, curves.png, best/ model")
    num_words: int = _f(5000, "vocabulary: keep at most this many words (0 = no limit)", ge=0)
    min_count: int = _f(5, "vocabulary: drop words seen fewer times in training captions", ge=1)
    max_caption_length: int = _f(30, "training captions are cut to this many words", ge=1)
    max_images: int = _f(
        0,
        "when preparing --data-dir: a seeded subset of this many images (0 = all), for a quick "
        "first run",
        ge=0,
    )
    # features
    encoder: str = _f(
        "efficientnet-lite0", "image encoder (efficientnet-lite0/1/2, or efficientnet-lite2-224)"
    )
    backend: str = _f("auto", "feature extraction backend: auto, onnx or torch", choices=BACKENDS)
    augment_views: int = _f(0, "extra augmented feature views per training image", ge=0)
    augment_strength: str = _f(
        "medium", "augmentation strength: light, medium or strong", choices=AUGMENT_STRENGTHS
    )
    tune_encoder_blocks: int = _f(
        0,
        "fine-tune the encoder's last N blocks and head conv with the decoder (0 = frozen "
        "encoder); features are then cached below those blocks",
        ge=0,
        le=8,
    )
    encoder_lr: float = _f(1e-4, "peak learning rate of the fine-tuned encoder blocks", gt=0)
    # model
    cell: str = _f(
        "gru", "recurrent cell: gru (original project) or lstm (Show-Attend-Tell)", choices=CELLS
    )
    embed_dim: int = _f(512, "word embedding size", ge=1, le=MAX_DIM)
    hidden_dim: int = _f(512, "recurrent state size", ge=1, le=MAX_DIM)
    attention_dim: int = _f(512, "attention space size", ge=1, le=MAX_DIM)
    context_dim: int = _f(512, "image features are projected to this size", ge=1, le=MAX_DIM)
    dropout: float = _f(0.3, "dropout on embeddings, features and the output layer", ge=0, lt=1)
    # optimisation
    epochs: int = _f(6, "passes over the training captions", ge=1)
    batch_size: int = _f(
        100, "captions per batch (whole images: all of an image's captions go together)", ge=1
    )
    lr: float = _f(1e-3, "peak learning rate (Adam)", gt=0)
    min_lr: float = _f(5e-5, "learning rate at the end of the cosine decay (<= --lr)", ge=0)
    warmup_steps: int = _f(200, "linear learning-rate warm-up steps", ge=0)
    weight_decay: float = _f(0.0, "Adam weight decay (decoupled, AdamW)", ge=0)
    grad_clip: float = _f(5.0, "clip the gradient norm to this (0 = off)", ge=0)
    alpha_c: float = _f(1.0, "doubly stochastic attention regularisation weight", ge=0)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy", ge=0, lt=1)
    seed: int = _f(0, "random seed (batches, dropout, augmentation)", ge=0)
    threads: int = _f(0, "torch CPU threads (0 = all cores)", ge=0)
    device: str = _f("auto", "auto (a CUDA GPU if visible), cpu or cuda", choices=DEVICES)
    precision: str = _f(
        "auto",
        "autocast: auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16",
        choices=PRECISIONS,
    )
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = no limit)", ge=0)
    # checkpoints and selection
    checkpoint_every: int = _f(500, "also checkpoint every N steps inside an epoch", ge=1)
    keep_last: int = _f(3, "checkpoints kept (the best model is kept apart; 0 = all)", ge=0)
    keep_epochs: int = _f(
        5, "end-of-epoch weights kept in epochs/ for `captioner average` (0 = none)", ge=0
    )
    select_metric: str = _f(
        "CIDEr-D", "dev metric for best-model selection: CIDEr-D or BLEU-4", choices=SELECT_METRICS
    )
    patience: int = _f(
        4, "stop after this many epochs without a better dev score (0 = never)", ge=0
    )
    val_images: int = _f(0, "dev images decoded each epoch (0 = all)", ge=0)
    val_max_length: int = _f(20, "longest caption decoded at validation", ge=1, le=100)

    RESUMABLE_CHANGES = _RESUMABLE

    def __post_init__(self) -> None:
        self._check()


@dataclass
class ScstConfig(_Settings):
    """Self-critical fine-tuning (Rennie et al. 2017) of a model trained with `captioner train`."""

    init_model: str | None = _f(None, "the cross-entropy-trained model to fine-tune (a directory)")
    # data
    data_dir: str | None = _f(None, "raw dataset folder; prepared into --work-dir when needed")
    work_dir: str = _f("work/flickr8k", "prepared data + feature caches (as for train)")
    run_dir: str = _f("runs/scst", "checkpoints, metrics.csv, curves.png, best/ model")
    backend: str = _f(
        "auto", "feature extraction backend when caches are missing", choices=BACKENDS
    )
    augment_views: int = _f(0, "extra augmented feature views per training image", ge=0)
    augment_strength: str = _f(
        "medium", "augmentation strength: light, medium or strong", choices=AUGMENT_STRENGTHS
    )
    # optimisation
    epochs: int = _f(2, "passes over the training images", ge=1)
    images_per_batch: int = _f(20, "images per optimizer step", ge=1)
    samples_per_image: int = _f(
        5,
        "captions sampled per image; each one's baseline is the mean reward of the others",
        ge=2,
    )
    max_length: int = _f(20, "longest sampled caption", ge=1, le=100)
    lr: float = _f(5e-5, "learning rate (Adam)", gt=0)
    encoder_lr: float = _f(
        1e-5, "learning rate of the encoder blocks the init model fine-tunes (if any)", gt=0
    )
    min_lr: float | None = _f(
        None, "cosine decay from --lr to this over the run (default: --lr throughout)", ge=0
    )
    dropout: float | None = _f(
        None, "dropout while sampling and updating (default: the init model's)", ge=0, lt=1
    )
    reward_end: bool = _f(
        False, "count <end> as a word in the CIDEr-D reward (penalises unfinished phrases)"
    )
    bleu_weight: float = _f(
        0.0, "reward = CIDEr-D + this x sentence BLEU (0 = CIDEr-D alone); raises BLEU-1", ge=0
    )
    bleu_order: int = _f(1, "n-gram order of that BLEU term", ge=1, le=4)
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 = off)", ge=0)
    seed: int = _f(0, "random seed (batches, views, sampling)", ge=0)
    threads: int = _f(0, "torch CPU threads (0 = all cores)", ge=0)
    device: str = _f("auto", "auto (a CUDA GPU if visible), cpu or cuda", choices=DEVICES)
    precision: str = _f(
        "auto",
        "autocast: auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16",
        choices=PRECISIONS,
    )
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = no limit)", ge=0)
    # checkpoints and selection
    checkpoint_every: int = _f(100, "also checkpoint every N steps inside an epoch", ge=1)
    keep_last: int = _f(3, "checkpoints kept (the best model is kept apart; 0 = all)", ge=0)
    keep_epochs: int = _f(5, "end-of-epoch weights kept in epochs/ for `captioner average`", ge=0)
    select_metric: str = _f(
        "CIDEr-D", "dev metric for best-model selection: CIDEr-D or BLEU-4", choices=SELECT_METRICS
    )
    patience: int = _f(
        0, "stop after this many epochs without a better dev score (0 = never)", ge=0
    )
    val_images: int = _f(0, "dev images decoded each epoch (0 = all)", ge=0)
    val_max_length: int = _f(20, "longest caption decoded at validation", ge=1, le=100)

    RESUMABLE_CHANGES = _RESUMABLE

    def __post_init__(self) -> None:
        if not self.init_model:
            raise ConfigError("--init-model is required: the model to fine-tune")
        self._check()
