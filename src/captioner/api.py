"""The public entry point: ``Captioner.from_pretrained().caption(images)``.

The CLI, the web app and the evaluation all call this; none of them re-implements
preprocessing or decoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from captioner.data.images import ImageInput, load_image
from captioner.decoding.sentences import sentences_first
from captioner.devices import resolve_device
from captioner.errors import CheckpointError, ConfigError
from captioner.evaluation.grammar import complete_sentence_check
from captioner.features.encoders import preprocess, split_trunk_name
from captioner.features.onnx import FeatureExtractor
from captioner.features.quantize import DEFAULT_PRECISION, check_precision, decoder_precision
from captioner.grounding.domain import pooled, unit_rows
from captioner.grounding.grounder import Grounder, word_groups
from captioner.grounding.second_look import SecondLook
from captioner.model.captioning_model import CaptioningModel
from captioner.model.ensemble import ensemble_of
from captioner.pretrained_paths import bundled_model_dir, resolve_model_path
from captioner.result import CaptionResult
from captioner.speculate import speculate

__all__ = ["Captioner", "CaptionResult", "bundled_model_dir", "resolve_model_path"]

BACKENDS = ("auto", "onnx", "torch")


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
    """Encoder + decoder + vocabulary, ready to caption images on the CPU or a CUDA GPU.

    ``device`` "cpu" (the default) runs the encoder and decoder in ONNX Runtime (``backend``
    "auto"/"onnx") or PyTorch; "cuda" runs both in PyTorch on the GPU, as the onnxruntime
    installed here is the CPU build (so ``backend`` "onnx" and the int8 encoder are CPU only);
    "auto" is a visible GPU, else the CPU (always the CPU with backend "onnx" or precision
    "int8"). Grounding stays numpy on the CPU; its word bias is
    moved to the decoder's device."""

    def __init__(
        self,
        model: CaptioningModel,
        backend: str = "auto",
        threads: int | None = None,
        grounder: Grounder | None = None,
        precision: str = DEFAULT_PRECISION,
        device: str = "cpu",
    ):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if device == "auto" and (backend == "onnx" or precision == "int8"):
            device = "cpu"  # what was asked for runs on ONNX Runtime, the CPU build
        self.device = resolve_device(device)  # a missing GPU: ConfigError, before any loading
        self.model = model
        self.vocab = model.vocab
        self.spec = model.encoder
        self.stepper = ensemble_of(model.decoders)
        self.grounder = grounder  # concepts, in-domain score and word bias (None: plain model)
        self._bias_groups = word_groups(self.vocab.itos)  # (V,) "cat" and "cats" share a bonus
        self._concept_head = None  # torch head for grids that come without logits (cache)
        self._threads = threads
        self._second_look: tuple[Grounder, SecondLook] | None = None
        if self.device.type != "cpu":
            self._on_gpu(backend, precision)
            return
        self.extractor = FeatureExtractor(model.encoder.name, backend, threads, precision)
        self.precision = self.extractor.precision  # fp32 or int8 ("auto" resolved)
        self.decoder_precision = "fp32"  # the ONNX decoder graphs' (PyTorch: always fp32)
        self.backend = "torch"
        if backend in ("auto", "onnx"):
            try:
                from captioner.model.onnx_ensemble import load_steppers

                # one thread: a decoder step is a few small matmuls, where waking a second
                # thread costs more than it saves (measured: 46 vs 56 ms per caption)
                wanted = decoder_precision(precision, self.precision)
                self.stepper = load_steppers(model.decoders, wanted, threads=1)
                self.decoder_precision = wanted
                self.backend = "onnx"
            except Exception:  # noqa: BLE001 - ORT missing or export failed: PyTorch still works
                if backend == "onnx":
                    raise
        if self.extractor.backend != self.backend:
            self.backend = f"{self.extractor.backend}+{self.backend}"

    def _on_gpu(self, backend: str, precision: str) -> None:
        """Encoder and decoder in PyTorch on ``self.device`` (fp32 weights: the captions match
        the CPU's up to float rounding)."""
        from captioner.features.gpu_encoder import DeviceExtractor

        if backend == "onnx":
            raise ConfigError(
                "backend onnx runs on the CPU only: use --device cpu or --backend torch"
            )
        if precision == "int8":
            raise ConfigError("the int8 encoder runs on ONNX Runtime (CPU): use --device cpu")
        self.extractor = DeviceExtractor(self.spec.name, self.device)
        self.precision = self.decoder_precision = "fp32"
        self.stepper = ensemble_of([d.to(self.device).eval() for d in self.model.decoders])
        self._bias_groups = self._bias_groups.to(self.device)  # (V,)
        self.backend = self.extractor.backend  # "torch-cuda"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        backend: str = "auto",
        threads: int | None = None,
        precision: str = DEFAULT_PRECISION,
        device: str = "cpu",
    ) -> Captioner:
        """A saved model directory, or the bundled Flickr8k model when ``path`` is None; its
        grounding (grounding.json + grounding.safetensors) is loaded when it has one.
        ``precision`` "int8" runs the quantised encoder (made by ``captioner export``);
        ``device`` "cpu", "cuda" or "auto" (see the class doc)."""
        check_precision(precision)  # before loading anything
        resolve_device(device)  # likewise: a missing GPU is one clear error
        path = resolve_model_path(path)
        model = CaptioningModel.from_pretrained(path)
        grounder = Grounder.from_pretrained(path)
        if grounder is not None and grounder.vocab_size != len(model.vocab):
            raise CheckpointError(
                f"{path}: grounding is for a {grounder.vocab_size}-word vocabulary, the model "
                f"has {len(model.vocab)}"
            )
        return cls(model, backend, threads, grounder, precision, device)

    @property
    def grid_size(self) -> int:
        return self.spec.grid

    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images -> encoder grids (B, P, C) float32."""
        return self._encode_arrays([load_image(img) for img in images], concepts=False)[0]

    def encode_with_concepts(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, np.ndarray]:
        """Images -> (grids (B, P, C) float32, ImageNet logits (B, 1000)), one encoder pass."""
        return self._encode_arrays([load_image(img) for img in images], concepts=True)[:2]

    def _encode_arrays(self, arrays: list[np.ndarray], concepts: bool):
        """RGB arrays -> (grids (B, P, C) tensor, ImageNet logits (B, 1000) or None, and for a
        trunk the grounding's pooled features (B, C_full) from the same pass, else None)."""
        batch = preprocess(arrays, self.spec)
        if not concepts:
            return torch.from_numpy(self.extractor(batch)), None, None
        grid, logits, mean = self.extractor.with_grounding(batch)
        return torch.from_numpy(grid), logits, (None if mean is None else unit_rows(mean))

    def _head(self):
        if self._concept_head is None:
            from captioner.features.encoders import concept_head

            self._concept_head = concept_head(self.spec.name)
        return self._concept_head

    def concept_logits(self, features: torch.Tensor) -> np.ndarray:
        """Grids (B, P, C) -> ImageNet logits (B, 1000) by the encoder's own head (the same
        numbers the encoder pass gives, for grids read from a feature cache)."""
        with torch.inference_mode():
            return self._head()(features.detach().float().cpu()).numpy()  # (B, 1000)

    def _grounding_features(self, features: torch.Tensor) -> np.ndarray:
        """Grids (B, P, C) -> unit-length pooled features (B, C_full) for the domain scorer and
        the word model: the grid's mean, or for a trunk (a fine-tuned top) the mean of the
        frozen network's grid, which is what the grounding was fitted on."""
        if split_trunk_name(self.spec.name)[1] == 0:
            return pooled(features.detach().float().cpu().numpy())
        with torch.inference_mode():
            return unit_rows(self._head().pooled(features.detach().cpu()).numpy())

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
        grounding: bool = True,
        grounding_strength: float | None = None,
        prefer_sentences: bool | None = None,
    ) -> list[CaptionResult]:
        """Caption one image or many (paths, bytes, PIL images or RGB arrays); one result each.

        Decoding settings left as None come from the model's generation_config.json. With a
        grounded model, ``grounding=False`` decodes without the concepts' word bias (concepts
        and the in-domain score are still reported); ``grounding_strength`` replaces the
        per-image strength (dev choice in domain, ``ood_strength`` outside) by one value for
        every image (0 = no bias). ``prefer_sentences=False`` keeps the best-scored beam even
        when another finished beam is a sentence and it is not (see decoding/sentences.py)."""
        if isinstance(images, (str, os.PathLike, bytes, np.ndarray)) or not isinstance(
            images, Sequence
        ):
            images = [images]
        images = list(images)
        if not images:
            return []
        encoded = self.encode_for_caption(images)
        return self.caption_features(
            encoded["features"],
            beam_size,
            max_length,
            return_attention,
            length_penalty,
            suppress_unk,
            no_repeat_ngram_size,
            grounding=grounding,
            grounding_strength=grounding_strength,
            concept_logits=encoded["concept_logits"],
            grounding_features=encoded.get("grounding_features"),
            detector_images=encoded.get("detector_images"),
            detections=encoded.get("detections"),
            prefer_sentences=prefer_sentences,
        )

    @property
    def second_look(self) -> SecondLook | None:
        """The person/animal detector's pass after decoding, for this grounding (None: the
        model has none); rebuilt when ``grounder`` is replaced."""
        if self.grounder is None:
            return None
        if self._second_look is None or self._second_look[0] is not self.grounder:
            self._second_look = (
                self.grounder,
                SecondLook(self.grounder, self.vocab.itos, self._threads),
            )
        return self._second_look[1]

    def encode_batch(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, np.ndarray | None]:
        """What ``caption`` encodes: grids (B, P, C) and, for a grounded model, the ImageNet
        logits (B, 1000) of the same pass (else None); the input to ``caption_features``."""
        encoded = self.encode_for_caption(images)
        return encoded["features"], encoded["concept_logits"]

    def encode_for_caption(self, images: Sequence[ImageInput]) -> dict:
        """``encode_batch``'s grids and logits plus, for a grounded model, the photos at the
        detector's input size (``detector_images``): the keyword arguments of
        ``caption_features`` that come from the images."""
        arrays = [load_image(img) for img in images]
        features, logits, pooled_features = self._encode_arrays(arrays, self.grounder is not None)
        encoded = {"features": features, "concept_logits": logits}
        if pooled_features is not None:
            encoded["grounding_features"] = pooled_features
        if self.grounder is not None:
            encoded["detector_images"] = self.second_look.thumbnails(arrays)
        return encoded

    def caption_batches(
        self, batches: Iterable[Sequence[ImageInput]], **options: Any
    ) -> Iterator[list[CaptionResult]]:
        """``caption(batch, **options)`` for every batch, in order, with the next batch read
        and encoded in a background thread while this one is decoded, so both stages keep a
        core busy (bulk captioning's throughput; results equal caption's, batch by batch).
        An image that cannot be read raises when its batch's results are due."""
        from captioner.overlap import Failed, overlapped

        stream = overlapped(
            (list(b) for b in batches),
            lambda b: self.encode_for_caption(b) if b else None,
        )
        try:
            for batch, encoded in stream:
                if isinstance(encoded, Failed):
                    raise encoded.error
                if not batch:
                    yield []
                    continue
                yield self.caption_features(**encoded, **options)
        finally:
            stream.close()

    def caption_features(
        self,
        features: torch.Tensor,
        beam_size: int | None = None,
        max_length: int | None = None,
        return_attention: bool = True,
        length_penalty: float | None = None,
        suppress_unk: bool | None = None,
        no_repeat_ngram_size: int | None = None,
        *,
        grounding: bool = True,
        grounding_strength: float | None = None,
        concept_logits: np.ndarray | None = None,
        grounding_features: np.ndarray | None = None,
        detector_images: np.ndarray | None = None,
        detections: np.ndarray | Callable[[], np.ndarray] | None = None,
        prefer_sentences: bool | None = None,
    ) -> list[CaptionResult]:
        """Decode precomputed encoder grids (B, P, C), e.g. from the feature cache.

        ``concept_logits`` (B, 1000): the encoder head's logits when the caller has them
        (otherwise the head is run on the grids); ``grounding_features`` likewise, the unit-length
        pooled features the grounding reads (``encode_for_caption`` gives them for a model with
        a fine-tuned encoder top). ``detector_images`` (B, S, S, 3) uint8: the
        photos at the detector's input size (``encode_for_caption``); without them (grids from
        a cache) the detector's gate and the short descriptions are skipped. ``detections``
        (B, L): the detector's probabilities when already computed (or a callable that waits
        for them)."""
        from captioner.decoding import beam_search, greedy_decode

        g = self.generation_settings(
            beam_size=beam_size,
            max_length=max_length,
            length_penalty=length_penalty,
            suppress_unk=suppress_unk,
            no_repeat_ngram_size=no_repeat_ngram_size,
            prefer_sentences=prefer_sentences,
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
        if grounding_strength is not None and not 0 <= grounding_strength <= 10:
            raise ConfigError(
                f"grounding_strength must be between 0 and 10, got {grounding_strength}"
            )
        if len(features) == 0:
            return []
        if self.grounder is not None and concept_logits is None:
            concept_logits = self.concept_logits(features)  # (B, 1000) grids from a cache
        described, word_bias = self._ground(
            features, concept_logits, grounding, grounding_strength, grounding_features
        )
        features = features.to(self.device)  # (B, P, C); a no-op on the CPU
        if word_bias is not None:
            word_bias = word_bias.to(features.device)  # (B, V) grounding computes it on the CPU
        ids = dict(
            start_id=self.vocab.start_id,
            end_id=self.vocab.end_id,
            unk_id=self.vocab.unk_id,
            pad_id=self.vocab.pad_id,
        )
        # one or two images: beam search's ops are tiny and a second thread only adds wake-ups;
        # larger batches have enough work per op to gain from all threads
        single = self.backend.endswith("onnx") and len(features) <= 2

        def decode_at(features: torch.Tensor, word_bias: torch.Tensor | None, width: int) -> list:
            options = dict(
                max_length=max_length,
                suppress_unk=suppress_unk,
                length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                word_bias=word_bias,
                bias_groups=self._bias_groups,
                **ids,
            )
            with torch.inference_mode(), _single_torch_thread(single):
                if width == 1:
                    return greedy_decode(self.stepper, features, **options)
                return beam_search(self.stepper, features, beam_size=width, **options)

        check = complete_sentence_check() if g["prefer_sentences"] else None
        itos = self.vocab.itos
        is_sentence = None if check is None else lambda ids: check(" ".join(itos[t] for t in ids))
        decode = sentences_first(decode_at, is_sentence, beam_size)

        looks = described is not None and word_bias is not None and detector_images is not None
        if looks and detections is None and self.second_look.wanted:
            # beam search keeps about one core busy, so the detector runs on the other
            # meanwhile, for every photo (its answer is waited for only where it is needed)
            detections = speculate(self.second_look.detect, detector_images)
        # a photo the second look will describe in a few words takes them from its best
        # beam's subject: its sentence is not reranked (the second look's re-decodes are)
        short_anyway = self.second_look.short_anyway(described) if looks else None
        decoded = decode(features, word_bias, short_anyway)
        short: list[list[str] | None] = [None] * len(decoded)
        if looks:
            decoded, short = self.second_look(
                decoded,
                described,
                concept_logits,
                detector_images,
                word_bias,
                features,
                decode,
                detections,
            )
        side = self.grid_size
        results = []
        for i, d in enumerate(decoded):
            tokens = [self.vocab.itos[t] for t in d.token_ids]
            attention = d.alphas.reshape(len(tokens), side, side) if return_attention else None
            result = CaptionResult(
                " ".join(tokens),
                tokens,
                float(d.score),
                attention,
                [(self.vocab.decode(alt), float(s)) for alt, s in d.alternatives],
            )
            if described is not None:
                g = described[i]
                result.concepts, result.in_domain = g.concepts, g.in_domain
                result.out_of_domain = g.out_of_domain
            if short[i] is not None:
                # the sentence stays on record as the first alternative; attention is uniform
                # (the words come from the concepts, not from looking at one place)
                result.alternatives.insert(0, (result.caption, result.score))
                result.caption, result.tokens, result.short = " ".join(short[i]), short[i], True
                if attention is not None:
                    cells = side * side
                    result.attention = np.full((len(short[i]), side, side), 1.0 / cells, np.float32)
            results.append(result)
        return results

    def _ground(
        self,
        features: torch.Tensor,
        logits: np.ndarray | None,
        enabled: bool,
        strength: float | None,
        pooled_features: np.ndarray | None = None,
    ):
        """(per-image ImageGrounding list, (B, V) word bias or None) for a batch of grids and
        their concept logits (None only for a model without grounding)."""
        if self.grounder is None:
            return None, None
        grid = features.detach().float().cpu().numpy()  # (B, P, C) grounding is numpy
        if pooled_features is None:  # (B, C) for the domain scorer and the word model
            pooled_features = self._grounding_features(features)
        described, scores = self.grounder.describe(grid, logits, pooled_features)
        if not enabled or strength == 0:
            return described, None
        return described, self.grounder.word_bias(logits, scores, strength, pooled_features)
