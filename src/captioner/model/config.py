"""Decoder hyperparameters: one dataclass, saved as config.json, unknown keys rejected."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from captioner.errors import ConfigError


@dataclass
class DecoderConfig:
    vocab_size: int  # from the vocabulary, including the 4 special tokens
    feature_dim: int = 1280  # C of the encoder grid (B, P, C)
    num_pixels: int = 49  # P of the encoder grid
    cell: str = "gru"  # "gru" (the original project) or "lstm" (Show, Attend and Tell)
    embed_dim: int = 512  # word embedding size
    hidden_dim: int = 512  # recurrent state size
    attention_dim: int = 512  # size of the additive attention space
    context_dim: int = 512  # image features are projected to this once per image
    dropout: float = 0.3  # on embeddings, projected features and the output layer

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.cell not in ("gru", "lstm"):
            raise ConfigError(f"cell must be 'gru' or 'lstm', not {self.cell!r}")
        for name in (
            "vocab_size",
            "feature_dim",
            "num_pixels",
            "embed_dim",
            "hidden_dim",
            "attention_dim",
            "context_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown decoder config keys: {sorted(unknown)}")
        return cls(**data)
