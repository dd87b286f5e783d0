"""ONNX export of the encoder and the extraction backends (ONNX Runtime first, PyTorch fallback).

On 2 CPU cores ONNX Runtime runs EfficientNet-Lite several times faster than PyTorch eager, so it
is the default; the exported file is cached per encoder and library versions.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from captioner.errors import ConfigError
from captioner.features.encoders import EncoderSpec, GridAndConcepts, build_encoder, get_spec
from captioner.io import atomic_path


def cache_root() -> Path:
    """Where exported ONNX files live: $CAPTIONER_CACHE or ~/.cache/captioner."""
    return Path(os.environ.get("CAPTIONER_CACHE", Path.home() / ".cache" / "captioner"))


def _quiet_export(model: torch.nn.Module, example: tuple, path: Path, **kwargs) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17, **kwargs)


def export_encoder(name: str, path: Path | None = None) -> Path:
    """Export the encoder to ONNX (batch dimension dynamic); reuse an existing export.

    Two outputs from one pass: ``features`` (B, P, C), the grid the decoder attends over, and
    ``concepts`` (B, 1000), the ImageNet classifier's logits (the "-concepts" in the file name
    keeps exports from before that output apart)."""
    spec = get_spec(name)
    if path is None:
        path = (
            cache_root()
            / "onnx"
            / (f"{name}-{spec.image_size}-r{spec.revision}-concepts-torch{torch.__version__}.onnx")
        )
    if path.is_file():
        return path
    model = GridAndConcepts(build_encoder(name)).eval()
    example = (torch.zeros(1, 3, spec.image_size, spec.image_size),)
    with atomic_path(path) as tmp:
        _quiet_export(
            model,
            example,
            tmp,
            input_names=["images"],
            output_names=["features", "concepts"],
            dynamic_axes={
                "images": {0: "batch"},
                "features": {0: "batch"},
                "concepts": {0: "batch"},
            },
        )
    return path


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class FeatureExtractor:
    """Preprocessed (B, 3, S, S) float32 -> (B, P, C) float32 features, by ORT or torch.

    ``precision="int8"`` runs the statically quantised export (features/quantize.py) that
    ``captioner export --precision int8`` made default; it needs ONNX Runtime, so it never falls
    back to PyTorch (that would quietly be fp32). "auto" is int8 only while
    int8 is the default by the quality bar (quantize.INT8_ENCODER_BY_DEFAULT) and there is such a
    file."""

    def __init__(
        self,
        name: str,
        backend: str = "auto",
        threads: int | None = None,
        precision: str = "fp32",
    ):
        from captioner.features.quantize import require_int8_encoder, resolve_precision

        self.spec: EncoderSpec = get_spec(name)
        self.backend = backend
        if precision == "auto" and backend == "torch":
            precision = "fp32"  # int8 is ONNX Runtime only
        precision = self.precision = resolve_precision(name, precision)  # "auto" resolved
        self.encoder_file: Path | None = None  # the ONNX file in use (None: PyTorch)
        self._session = None
        self._torch = None
        if precision == "int8":
            if backend == "torch":
                raise ConfigError("int8 runs on ONNX Runtime: use backend auto or onnx")
            self.encoder_file = require_int8_encoder(name)
            self._session = ort_session(self.encoder_file, threads)
            self.backend = "onnx"
        elif backend in ("auto", "onnx"):
            try:
                self.encoder_file = export_encoder(name)
                self._session = ort_session(self.encoder_file, threads)
                self.backend = "onnx"
            except Exception as exc:  # noqa: BLE001 - any ORT/export failure falls back
                if backend == "onnx":
                    raise
                warnings.warn(
                    f"ONNX Runtime encoder unavailable ({exc}); using PyTorch", stacklevel=2
                )
        if self._session is None:
            if threads:
                torch.set_num_threads(threads)
            self._torch = build_encoder(name)
            self.backend = "torch"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> the grid (B, P, C) only (what the feature cache stores)."""
        if self._session is not None:
            return self._session.run(["features"], {"images": batch})[0]
        with torch.inference_mode():
            return self._torch(torch.from_numpy(batch)).numpy()

    def with_concepts(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) -> (grid (B, P, C), ImageNet logits (B, 1000)) from one encoder pass."""
        if self._session is not None:
            grid, logits = self._session.run(["features", "concepts"], {"images": batch})
            return grid, logits
        with torch.inference_mode():
            grid = self._torch(torch.from_numpy(batch))  # (B, P, C)
            return grid.numpy(), self._torch.concept_logits(grid).numpy()
