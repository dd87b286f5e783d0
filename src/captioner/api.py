"""The public entry point: ``Captioner.from_pretrained().caption(images)``.

The CLI, the web app and the evaluation all call this; none of them re-implements
preprocessing or decoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from captioner.data.images import ImageInput, load_image
from captioner.errors import CheckpointError, ConfigError
from captioner.features.encoders import preprocess
from captioner.features.onnx import FeatureExtractor
from captioner.model.captioning_model import CaptioningModel

DEFAULT_MODEL = "flickr8k"
BACKENDS = ("auto", "onnx", "torch")


@dataclass
class CaptionResult:
    caption: str  # "a dog runs through the snow"
    tokens: list[str]  # the words, without <start>/<end>
    score: float  # length-normalised log-probability of the best beam
    attention: np.ndarray | None  # (len(tokens), grid, grid) float32, each map sums to 1
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # all beams, best first


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The model shipped inside the package (no download)."""
    return Path(str(resources.files("captioner") / "pretrained" / name))


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None or str(path) in ("", "default", DEFAULT_MODEL):
        path = bundled_model_dir()
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"the bundled model is missing from {path}; reinstall captioner "
                "or pass a model directory"
            )
        return path
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model directory not found: {path}")
    return path


@contextmanager
def _single_torch_thread(enabled: bool):
    """Beam search's own tensor ops are tiny: on 2 cores, waking a second thread for each made
    a caption 1.5x slower (69 vs 108 ms end to end). The ONNX path runs them on one thread."""
    previous = torch.get_num_threads()
    if enabled and previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled and previous > 1:
            torch.set_num_threads(previous)


class Captioner:
    """Encoder + decoder + vocabulary, ready to caption images on CPU."""

    def __init__(self, model: CaptioningModel, backend: str = "auto", threads: int | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.model = model
        self.vocab = model.vocab
        self.spec = model.encoder
        self.extractor = FeatureExtractor(model.encoder.name, backend, threads)
        self.stepper = model.decoder
        self.backend = "torch"
        if backend in ("auto", "onnx"):
            try:
                from captioner.model.onnx_decoder import OrtStepper, exported_decoder_dir

                # one thread: a decoder step is a few small matmuls, where waking a second
                # thread costs more than it saves (measured: 46 vs 56 ms per caption)
                self.stepper = OrtStepper(
                    exported_decoder_dir(model.decoder), model.decoder.config.cell, threads=1
                )
                self.backend = "onnx"
            except Exception:  # noqa: BLE001 - ORT missing or export failed: PyTorch still works
                if backend == "onnx":
                    raise
        if self.extractor.backend != self.backend:
            self.backend = f"{self.extractor.backend}+{self.backend}"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        backend: str = "auto",
        threads: int | None = None,
    ) -> Captioner:
        """A saved model directory, or the bundled Flickr8k model when ``path`` is None."""
        return cls(CaptioningModel.from_pretrained(resolve_model_path(path)), backend, threads)

    @property
    def grid_size(self) -> int:
        return self.spec.grid

    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> encoder grids (B, P, C) float32."""
        arrays = [load_image(img) for img in images]
        return torch.from_numpy(self.extractor(preprocess(arrays, self.spec)))

    def generation_settings(self, **overrides) -> dict:
        """The model's decoding defaults (generation_config.json) with every override that is
        not None on top: what a caption call with these arguments will use."""
        unknown = set(overrides) - set(self.model.generation)
        if unknown:
            raise ConfigError(f"unknown generation settings: {sorted(unknown)}")
        chosen = {k: v for k, v in overrides.items() if v is not None}
        return {**self.model.generation, **chosen}

    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        beam_size: int | None = None,
        max_length: int | None = None,
        return_attention: bool = True,
        length_penalty: float | None = None,
        suppress_unk: bool | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> list[CaptionResult]:
        """Caption one image or many (paths, bytes, PIL images or RGB arrays); one result each.

        Decoding settings left as None come from the model's generation_config.json."""
        if isinstance(images, (str, os.PathLike, bytes, np.ndarray)) or not isinstance(
            images, Sequence
        ):
            images = [images]
        images = list(images)
        if not images:
            return []
        return self.caption_features(
            self.encode(images),
            beam_size,
            max_length,
            return_attention,
            length_penalty,
            suppress_unk,
            no_repeat_ngram_size,
        )

    def caption_features(
        self,
        features: torch.Tensor,
        beam_size: int | None = None,
        max_length: int | None = None,
        return_attention: bool = True,
        length_penalty: float | None = None,
        suppress_unk: bool | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> list[CaptionResult]:
        """Decode precomputed encoder grids (B, P, C), e.g. from the feature cache."""
        from captioner.decoding import beam_search, greedy_decode

        g = self.generation_settings(
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            suppress_unk=suppress_unk,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        beam_size, max_length = g["beam_size"], g["max_length"]
        length_penalty, suppress_unk = g["length_penalty"], g["suppress_unk"]
        no_repeat_ngram_size = g["no_repeat_ngram_size"]

        if not 1 <= beam_size <= 20:
            raise ConfigError(f"beam_size must be between 1 and 20, got {beam_size}")
        if not 1 <= max_length <= 100:
            raise ConfigError(f"max_length must be between 1 and 100, got {max_length}")
        if not 0 <= no_repeat_ngram_size <= 10:
            raise ConfigError(
                f"no_repeat_ngram_size must be between 0 (off) and 10, got {no_repeat_ngram_size}"
            )
        if len(features) == 0:
            return []
        ids = dict(
            start_id=self.vocab.start_id,
            end_id=self.vocab.end_id,
            unk_id=self.vocab.unk_id,
            pad_id=self.vocab.pad_id,
        )
        # one or two images: beam search's ops are tiny and a second thread only adds wake-ups;
        # larger batches have enough work per op to gain from all threads
        single = self.backend.endswith("onnx") and len(features) <= 2
        with torch.inference_mode(), _single_torch_thread(single):
            if beam_size == 1:
                decoded = greedy_decode(
                    self.stepper,
                    features,
                    max_length=max_length,
                    suppress_unk=suppress_unk,
                    length_penalty=length_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size,
                    **ids,
                )
            else:
                decoded = beam_search(
                    self.stepper,
                    features,
                    beam_size=beam_size,
                    max_length=max_length,
                    length_penalty=length_penalty,
                    suppress_unk=suppress_unk,
                    no_repeat_ngram_size=no_repeat_ngram_size,
                    **ids,
                )
        side = self.grid_size
        results = []
        for d in decoded:
            tokens = [self.vocab.itos[i] for i in d.token_ids]
            attention = d.alphas.reshape(len(tokens), side, side) if return_attention else None
            results.append(
                CaptionResult(
                    " ".join(tokens),
                    tokens,
                    float(d.score),
                    attention,
                    [(self.vocab.decode(alt), float(s)) for alt, s in d.alternatives],
                )
            )
        return results
