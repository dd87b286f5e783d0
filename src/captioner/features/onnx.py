"""The feature extractor: ONNX Runtime first, PyTorch as the fallback.

On 2 CPU cores ONNX Runtime runs EfficientNet-Lite several times faster than PyTorch eager, so it
is the default; the exported file is cached per encoder and library versions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from captioner.errors import ConfigError
from captioner.features.encoders import EncoderSpec, GridAndConcepts, build_encoder, get_spec
from captioner.features.onnx_export import (  # noqa: F401 - re-exported for older imports
    _quiet_export,
    cache_root,
    export_encoder,
    load_failure,
    ort_session,
)
from captioner.features.quantize import require_int8_encoder, resolve_precision


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
                self._session = repaired_session(name, self.encoder_file, threads)
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

    def with_grounding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``with_concepts`` plus, when the graph has them (a trunk's), the frozen network's
        pooled features (B, C_full) from the same pass; None otherwise (the grid's own mean is
        what the grounding reads, or, for a graph made before that output, the caller's
        ``ConceptHead.pooled``)."""
        if self._session is not None:
            if "pooled" not in {out.name for out in self._session.get_outputs()}:
                return (*self.with_concepts(batch), None)
            grid, logits, mean = self._session.run(
                ["features", "concepts", "pooled"], {"images": batch}
            )
            return grid, logits, mean
        with torch.inference_mode():
            out = [t.numpy() for t in GridAndConcepts(self._torch)(torch.from_numpy(batch))]
        return out[0], out[1], (out[2] if len(out) == 3 else None)


def repaired_session(name: str, path: Path, threads: int | None):
    """An ORT session over the cached encoder export; a file ONNX Runtime cannot load (cut,
    emptied) is exported again, once, with a warning, instead of every run falling back to
    PyTorch (3.7x slower)."""
    try:
        return ort_session(path, threads)
    except ImportError:
        raise  # no ONNX Runtime: nothing to repair
    except Exception as exc:  # noqa: BLE001 - any unreadable file is repaired the same way
        warnings.warn(
            f"the cached ONNX encoder {path} could not be loaded ({load_failure(exc)}); "
            "exporting it again",
            stacklevel=3,
        )
    path.unlink(missing_ok=True)
    return ort_session(export_encoder(name, path), threads)
