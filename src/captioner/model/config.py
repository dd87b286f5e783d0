"""Model settings: the decoder hyperparameters (config.json) and the decoding defaults
(generation_config.json), typed dataclasses checked by captioner.settings; unknown keys,
wrong types and out-of-range values are rejected with the setting's name."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from captioner.errors import ConfigError
from captioner.settings import check_settings, setting, settings_from_json

CELLS = ("gru", "lstm")
# sizes that allocate what a machine can hold: 16384 is 32x the defaults, and a decoder of more
# than a billion parameters (4 GB of fp32 weights, 16 GB with Adam's state) is refused by name
MAX_DIM = 16_384
MAX_VOCAB = 1_000_000
MAX_PARAMETERS = 1_000_000_000


@dataclass
class DecoderConfig:
    vocab_size: int = setting(
        help="from the vocabulary, including the 4 special tokens", ge=4, le=MAX_VOCAB
    )
    feature_dim: int = setting(1280, "C of the encoder grid (B, P, C)", ge=1, le=MAX_DIM)
    encoder_top: str = setting(
        "", "the encoder whose last blocks the decoder runs and fine-tunes ('' = none)"
    )
    encoder_top_blocks: int = setting(
        0, "how many of its last blocks (with its head conv) run in the decoder", ge=0, le=8
    )
    num_pixels: int = setting(49, "P of the encoder grid", ge=1, le=MAX_DIM)
    cell: str = setting(
        "gru", "gru (the original project) or lstm (Show-Attend-Tell)", choices=CELLS
    )
    embed_dim: int = setting(512, "word embedding size", ge=1, le=MAX_DIM)
    hidden_dim: int = setting(512, "recurrent state size", ge=1, le=MAX_DIM)
    attention_dim: int = setting(512, "size of the additive attention space", ge=1, le=MAX_DIM)
    context_dim: int = setting(
        512, "image features are projected to this once per image", ge=1, le=MAX_DIM
    )
    dropout: float = setting(
        0.3, "on embeddings, projected features and the output layer", ge=0, lt=1
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_settings(self, flags=False)
        if bool(self.encoder_top) != bool(self.encoder_top_blocks):
            raise ConfigError("encoder_top and encoder_top_blocks go together: set both or neither")
        count = self.parameter_count()
        if count > MAX_PARAMETERS:
            raise ConfigError(
                f"a decoder with these sizes has about {count:,} parameters, more than the "
                f"{MAX_PARAMETERS:,} allowed ({4 * count / 1e9:,.0f} GB of fp32 weights): lower "
                "hidden_dim, embed_dim, context_dim or the vocabulary size"
            )

    def parameter_count(self) -> int:
        """The decoder's size, worked out before anything is allocated (model/decoder.py)."""
        v, f, e, h, a, c = (
            self.vocab_size,
            self.feature_dim,
            self.embed_dim,
            self.hidden_dim,
            self.attention_dim,
            self.context_dim,
        )
        gates = 4 if self.cell == "lstm" else 3
        parts = (
            2 * f + f * c + c,  # LayerNorm and projection of the grid
            v * e,  # embedding
            2 * (c * h + h),  # initial state(s)
            (c + h) * a + 3 * a,  # attention
            h * (gates + 1) * h + (e + c) * gates * h + 2 * gates * h,  # recurrent cell
            (h + c) * e + e * v + v,  # deep output
        )
        return sum(parts)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DecoderConfig:
        return settings_from_json(cls, data, "decoder config")


@dataclass
class GenerationConfig:
    """Decoding defaults saved with a model (chosen on the dev split); a caption call's own
    arguments override them."""

    beam_size: int = setting(3, "beam width (1 = greedy)", ge=1, le=20)
    max_length: int = setting(20, "most words per caption", ge=1, le=100)
    length_penalty: float = setting(1.0, "beam score = log-prob / length ** this", ge=0, le=10)
    suppress_unk: bool = setting(True, "never emit <unk>")
    no_repeat_ngram_size: int = setting(
        2,
        "never repeat an n-gram this long (0 = off; 2, the bundle's dev choice, stops loops)",
        ge=0,
        le=10,
    )
    prefer_sentences: bool = setting(
        True,
        "when the best beam is no sentence, say the best one that is (link-grammar, if installed)",
    )

    def __post_init__(self) -> None:
        check_settings(self, flags=False)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GenerationConfig:
        """Missing keys take the defaults (older models saved fewer settings)."""
        return settings_from_json(cls, data, "generation settings")
