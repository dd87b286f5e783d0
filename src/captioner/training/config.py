"""Every training setting, with its default and help text; saved as train_config.json (and
scst_config.json for self-critical fine-tuning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TypeVar

from captioner.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound="_Settings")
SELECT_METRICS = ("CIDEr-D", "BLEU-4")
AUGMENT_STRENGTHS = ("light", "medium", "strong")
# settings that may change between a run and its resumption
_RESUMABLE = ("epochs", "threads", "patience", "data_dir", "max_steps", "keep_epochs")


def _f(default, help: str):  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help})


class _Settings:
    """Saving, loading and comparing a settings dataclass (train_config.json, scst_config.json)."""

    RESUMABLE_CHANGES: tuple[str, ...] = ()

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            options = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
            raise ConfigError(f"--{name.replace('_', '-')} must be {options}, not {value!r}")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls: type[SettingsT], data: dict) -> SettingsT:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown training settings: {sorted(unknown)}")
        return cls(**data)

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
    num_words: int = _f(5000, "vocabulary: keep at most this many words (0 = no limit)")
    min_count: int = _f(5, "vocabulary: drop words seen fewer times in training captions")
    max_caption_length: int = _f(30, "training captions are cut to this many words")
    # features
    encoder: str = _f(
        "efficientnet-lite0", "image encoder (efficientnet-lite0/1/2, or efficientnet-lite2-224)"
    )
    backend: str = _f("auto", "feature extraction backend: auto, onnx or torch")
    augment_views: int = _f(0, "extra augmented feature views per training image")
    augment_strength: str = _f("medium", "augmentation strength: light, medium or strong")
    # model
    cell: str = _f("gru", "recurrent cell: gru (original project) or lstm (Show-Attend-Tell)")
    embed_dim: int = _f(512, "word embedding size")
    hidden_dim: int = _f(512, "recurrent state size")
    attention_dim: int = _f(512, "attention space size")
    context_dim: int = _f(512, "image features are projected to this size")
    dropout: float = _f(0.3, "dropout on embeddings, features and the output layer")
    # optimisation
    epochs: int = _f(6, "passes over the training captions")
    batch_size: int = _f(
        100, "captions per batch (whole images: all of an image's captions go together)"
    )
    lr: float = _f(1e-3, "peak learning rate (Adam)")
    min_lr: float = _f(5e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(200, "linear learning-rate warm-up steps")
    weight_decay: float = _f(0.0, "Adam weight decay (decoupled, AdamW)")
    grad_clip: float = _f(5.0, "clip the gradient norm to this (0 = off)")
    alpha_c: float = _f(1.0, "doubly stochastic attention regularisation weight")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    seed: int = _f(0, "random seed (batches, dropout, augmentation)")
    threads: int = _f(0, "torch CPU threads (0 = all cores)")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = no limit)")
    # checkpoints and selection
    checkpoint_every: int = _f(500, "also checkpoint every N steps inside an epoch")
    keep_last: int = _f(3, "checkpoints kept (the best model is kept apart)")
    keep_epochs: int = _f(
        5, "end-of-epoch weights kept in epochs/ for `captioner average` (0 = none)"
    )
    select_metric: str = _f("CIDEr-D", "dev metric for best-model selection: CIDEr-D or BLEU-4")
    patience: int = _f(4, "stop after this many epochs without a better dev score (0 = never)")
    val_images: int = _f(0, "dev images decoded each epoch (0 = all)")
    val_max_length: int = _f(20, "longest caption decoded at validation")

    RESUMABLE_CHANGES = _RESUMABLE

    def __post_init__(self) -> None:
        self._check_choice("cell", ("gru", "lstm"))
        self._check_choice("select_metric", SELECT_METRICS)
        self._check_choice("augment_strength", AUGMENT_STRENGTHS)
        if self.keep_epochs < 0:
            raise ConfigError("--keep-epochs must be 0 or more")
        self._check_positive("epochs", "batch_size", "checkpoint_every")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("need 0 <= --min-lr <= --lr and --lr > 0")


@dataclass
class ScstConfig(_Settings):
    """Self-critical fine-tuning (Rennie et al. 2017) of a model trained with `captioner train`."""

    init_model: str | None = _f(None, "the cross-entropy-trained model to fine-tune (a directory)")
    # data
    data_dir: str | None = _f(None, "raw dataset folder; prepared into --work-dir when needed")
    work_dir: str = _f("work/flickr8k", "prepared data + feature caches (as for train)")
    run_dir: str = _f("runs/scst", "checkpoints, metrics.csv, curves.png, best/ model")
    backend: str = _f("auto", "feature extraction backend when caches are missing")
    augment_views: int = _f(0, "extra augmented feature views per training image")
    augment_strength: str = _f("medium", "augmentation strength: light, medium or strong")
    # optimisation
    epochs: int = _f(2, "passes over the training images")
    images_per_batch: int = _f(20, "images per optimizer step")
    samples_per_image: int = _f(
        5, "captions sampled per image; each one's baseline is the mean reward of the others"
    )
    max_length: int = _f(20, "longest sampled caption")
    lr: float = _f(5e-5, "learning rate (Adam)")
    min_lr: float | None = _f(
        None, "cosine decay from --lr to this over the run (default: --lr throughout)"
    )
    dropout: float | None = _f(
        None, "dropout while sampling and updating (default: the init model's)"
    )
    reward_end: bool = _f(
        False, "count <end> as a word in the CIDEr-D reward (penalises unfinished phrases)"
    )
    bleu_weight: float = _f(
        0.0, "reward = CIDEr-D + this x sentence BLEU (0 = CIDEr-D alone); raises BLEU-1"
    )
    bleu_order: int = _f(1, "n-gram order of that BLEU term (1 to 4)")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 = off)")
    seed: int = _f(0, "random seed (batches, views, sampling)")
    threads: int = _f(0, "torch CPU threads (0 = all cores)")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = no limit)")
    # checkpoints and selection
    checkpoint_every: int = _f(100, "also checkpoint every N steps inside an epoch")
    keep_last: int = _f(3, "checkpoints kept (the best model is kept apart)")
    keep_epochs: int = _f(5, "end-of-epoch weights kept in epochs/ for `captioner average`")
    select_metric: str = _f("CIDEr-D", "dev metric for best-model selection: CIDEr-D or BLEU-4")
    patience: int = _f(0, "stop after this many epochs without a better dev score (0 = never)")
    val_images: int = _f(0, "dev images decoded each epoch (0 = all)")
    val_max_length: int = _f(20, "longest caption decoded at validation")

    RESUMABLE_CHANGES = _RESUMABLE

    def __post_init__(self) -> None:
        if not self.init_model:
            raise ConfigError("--init-model is required: the model to fine-tune")
        if self.samples_per_image < 2:
            raise ConfigError("--samples-per-image must be at least 2 (the baseline needs peers)")
        self._check_choice("select_metric", SELECT_METRICS)
        self._check_choice("augment_strength", AUGMENT_STRENGTHS)
        self._check_positive("epochs", "images_per_batch", "max_length", "checkpoint_every")
        if self.lr <= 0 or self.keep_epochs < 0:
            raise ConfigError("need --lr > 0 and --keep-epochs >= 0")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError("need 0 <= --min-lr <= --lr")
        if self.bleu_weight < 0 or not 1 <= self.bleu_order <= 4:
            raise ConfigError("need --bleu-weight >= 0 and --bleu-order from 1 to 4")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), not {self.dropout}")
