"""A trained captioner as a directory: config.json + vocab.json + model.safetensors (+ README.md).

config.json holds the decoder hyperparameters and the encoder it was trained on (name, image
size, preprocessing), so a saved model is self-describing: nothing else has to be found.

An *ensemble* (``captioner ensemble``) is the same directory with more decoders over the same
vocabulary and encoder: config.json's ``ensemble`` lists each extra member's decoder config and
weights file (``member1.safetensors``, ...), and inference searches with all of them
(:mod:`captioner.model.ensemble`). ``decoder`` stays the first member, so training, averaging
and export read a single decoder as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from captioner.data.vocab import Vocabulary
from captioner.errors import CheckpointError, ConfigError, VocabularyError
from captioner.features.encoders import EncoderSpec, get_spec, split_trunk_name
from captioner.io import atomic_path, atomic_write_json, read_json
from captioner.model.config import DecoderConfig, GenerationConfig
from captioner.model.decoder import ShowAttendTellDecoder

CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE = "config.json", "vocab.json", "model.safetensors"
GENERATION_FILE = "generation_config.json"  # decoding defaults, chosen on the dev split
DEFAULT_GENERATION = GenerationConfig().to_json()  # kept as a dict: callers read and update it
FORMAT_VERSION = 1


class CaptioningModel:
    """Decoder + vocabulary + the encoder spec its features came from."""

    def __init__(
        self,
        decoder: ShowAttendTellDecoder,
        vocab: Vocabulary,
        encoder: EncoderSpec,
        generation: dict | None = None,
        extra: dict | None = None,
        members: list[ShowAttendTellDecoder] | None = None,
    ):
        for other in members or []:
            if not _same_inputs(other.config, decoder.config):
                raise ConfigError(
                    "ensemble members must share the grid, feature size and vocabulary of the "
                    f"first decoder, got {other.config.to_json()} beside {decoder.config.to_json()}"
                )
        if decoder.config.vocab_size != len(vocab):
            raise ConfigError(
                f"decoder vocab_size {decoder.config.vocab_size} != vocabulary size {len(vocab)}"
            )
        if decoder.config.feature_dim != encoder.channels:
            raise ConfigError(
                f"decoder feature_dim {decoder.config.feature_dim} != {encoder.name} channels "
                f"{encoder.channels}"
            )
        for each in [decoder, *(members or [])]:
            _check_top_fits(each.config, encoder)
        self.decoder = decoder
        self.vocab = vocab
        self.encoder = encoder
        self.generation = GenerationConfig.from_json(generation or {}).to_json()
        # provenance read from config.json (training settings, dev scores...); save_pretrained
        # writes only the extra it is given, so a caller decides what still holds
        self.extra: dict = dict(extra or {})
        self.members: list[ShowAttendTellDecoder] = list(members or [])  # beside ``decoder``

    @property
    def decoders(self) -> list[ShowAttendTellDecoder]:
        """Every decoder inference searches with: ``decoder``, then the extra members."""
        return [self.decoder, *self.members]

    def save_pretrained(
        self, path: str | Path, dtype: torch.dtype = torch.float32, extra: dict | None = None
    ) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _save_weights(self.decoder, path / WEIGHTS_FILE, dtype)
        ensemble = []
        for i, member in enumerate(self.members, start=1):
            _save_weights(member, path / member_file(i), dtype)
            ensemble.append({"decoder": member.config.to_json(), "weights": member_file(i)})
        self.vocab.save(path / VOCAB_FILE)
        config = {
            "format_version": FORMAT_VERSION,
            "decoder": self.decoder.config.to_json(),
            "encoder": self.encoder.to_json(),
            **({"ensemble": ensemble} if ensemble else {}),
            **({"extra": extra} if extra else {}),
        }
        atomic_write_json(path / CONFIG_FILE, config)
        atomic_write_json(path / GENERATION_FILE, self.generation)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> CaptioningModel:
        path = Path(path)
        for name in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE):
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: not a saved captioner model ({name} is missing)")
        try:
            config = read_json(path / CONFIG_FILE)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / CONFIG_FILE}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{path / CONFIG_FILE}: a model config must be a JSON object, not {config!r}"
            )
        if config.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: unsupported format_version {config.get('format_version')}"
            )
        try:
            encoder = get_spec(config["encoder"]["name"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{path / CONFIG_FILE}: incomplete model config ({exc!r})"
            ) from exc
        try:
            decoder_config = DecoderConfig.from_json(config.get("decoder"))
        except ConfigError as exc:
            raise ConfigError(f"{path / CONFIG_FILE}: {exc}") from exc
        if encoder.to_json() != config["encoder"]:
            raise CheckpointError(
                f"{path}: saved encoder settings {config['encoder']} differ from this version's "
                f"{encoder.to_json()}"
            )
        # the decoder's grid must be the encoder's: a mismatch loads, then fails at the first
        # caption (ONNX Runtime INVALID_ARGUMENT), so it is refused here
        if (decoder_config.num_pixels, decoder_config.feature_dim) != (
            encoder.num_pixels,
            encoder.channels,
        ):
            raise CheckpointError(
                f"{path / CONFIG_FILE}: decoder expects num_pixels {decoder_config.num_pixels}, "
                f"feature_dim {decoder_config.feature_dim}, but encoder {encoder.name} gives "
                f"num_pixels {encoder.num_pixels}, feature_dim {encoder.channels}"
            )
        decoder = _load_decoder(path, WEIGHTS_FILE, decoder_config, device)
        members = [
            _load_decoder(path, name, member_config, device)
            for name, member_config in _ensemble_entries(path, config, decoder_config)
        ]
        try:
            vocab = Vocabulary.load(path / VOCAB_FILE)
        except VocabularyError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        generation = None
        if (path / GENERATION_FILE).is_file():
            try:
                generation = read_json(path / GENERATION_FILE)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path / GENERATION_FILE}: not valid JSON ({exc})") from exc
            try:
                generation = GenerationConfig.from_json(generation).to_json()
            except ConfigError as exc:
                raise ConfigError(f"{path / GENERATION_FILE}: {exc}") from exc
        return cls(decoder, vocab, encoder, generation, config.get("extra"), members)


def member_file(i: int) -> str:
    """The weights file of the i-th extra ensemble member (1-based)."""
    return f"member{i}.safetensors"


def _same_inputs(a: DecoderConfig, b: DecoderConfig) -> bool:
    """Whether two decoders read the same grid and feature size and share the vocabulary, so
    that they can be searched together."""
    return (a.num_pixels, a.feature_dim, a.vocab_size) == (
        b.num_pixels,
        b.feature_dim,
        b.vocab_size,
    )


def _save_weights(decoder: ShowAttendTellDecoder, file: Path, dtype: torch.dtype) -> None:
    state = {k: v.detach().to(dtype).contiguous() for k, v in decoder.state_dict().items()}
    with atomic_path(file) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def _ensemble_entries(
    path: Path, config: dict, first: DecoderConfig
) -> list[tuple[str, DecoderConfig]]:
    """(weights file, decoder config) of each extra member listed in config.json."""
    entries = config.get("ensemble", [])
    if not isinstance(entries, list):
        raise CheckpointError(f"{path / CONFIG_FILE}: 'ensemble' must be a list of members")
    members = []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or entry.get("weights") != member_file(i):
            raise CheckpointError(
                f"{path / CONFIG_FILE}: ensemble member {i} must name its weights "
                f"{member_file(i)!r}, got {entry!r}"
            )
        try:
            member_config = DecoderConfig.from_json(entry.get("decoder"))
        except ConfigError as exc:
            raise ConfigError(f"{path / CONFIG_FILE}: ensemble member {i}: {exc}") from exc
        if not _same_inputs(member_config, first):
            raise CheckpointError(
                f"{path / CONFIG_FILE}: ensemble member {i} has another grid, feature size or "
                "vocabulary than the first decoder"
            )
        if not (path / member_file(i)).is_file():
            raise CheckpointError(
                f"{path}: not a saved captioner model ({member_file(i)} is missing)"
            )
        members.append((member_file(i), member_config))
    return members


def _load_decoder(
    path: Path, name: str, decoder_config: DecoderConfig, device: str
) -> ShowAttendTellDecoder:
    """One decoder's weights, refused with a clear error when they do not fit its config."""
    decoder = ShowAttendTellDecoder(decoder_config)
    try:
        state = load_file(str(path / name), device=device)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path / name}: unreadable weights ({exc})") from exc
    expected = decoder.state_dict()
    if set(state) != set(expected):
        raise CheckpointError(
            f"{path}: weights do not match the config (missing "
            f"{sorted(set(expected) - set(state))}, "
            f"unexpected {sorted(set(state) - set(expected))})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected[key].shape)}"
            )
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{path / name}: {key} contains NaN or infinite values "
                "(a diverged or damaged model)"
            )
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    decoder.to(device).eval()
    return decoder


def _check_top_fits(config: DecoderConfig, encoder: EncoderSpec) -> None:
    """A decoder that runs the encoder's last N blocks must read the grid below exactly those
    (shapes alone would not tell trunk2 from trunk4: both give 7x7x192 in lite0)."""
    base, blocks = split_trunk_name(encoder.name)
    if (config.encoder_top or base, config.encoder_top_blocks) != (base, blocks):
        raise ConfigError(
            f"the decoder runs the last {config.encoder_top_blocks} blocks of "
            f"{config.encoder_top or 'no encoder'}, but its features come from {encoder.name}"
        )
