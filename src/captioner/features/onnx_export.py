"""ONNX export of the encoder, the export cache and ONNX Runtime sessions.

On 2 CPU cores ONNX Runtime runs EfficientNet-Lite several times faster than PyTorch eager, so it
is the default; the exported file is cached per encoder and library versions. (The extractor
that uses them is :mod:`captioner.features.onnx`; the int8 export,
:mod:`captioner.features.quantize`, builds on this module too.)
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch

from captioner.features.encoders import GridAndConcepts, build_encoder, get_spec, split_trunk_name
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
    keeps exports from before that output apart); a trunk's also ``pooled`` (GridAndConcepts)."""
    spec = get_spec(name)
    # a trunk's graph has a third output: its own name, so an older two-output file is not reused
    outputs = "concepts-pooled" if split_trunk_name(name)[1] else "concepts"
    if path is None:
        path = (
            cache_root()
            / "onnx"
            / (f"{name}-{spec.image_size}-r{spec.revision}-{outputs}-torch{torch.__version__}.onnx")
        )
    if path.is_file():
        return path
    model = GridAndConcepts(build_encoder(name)).eval()
    outputs = ["features", "concepts"] + (["pooled"] if model.encoder.top is not None else [])
    example = (torch.zeros(1, 3, spec.image_size, spec.image_size),)
    with atomic_path(path) as tmp:
        _quiet_export(
            model,
            example,
            tmp,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "batch"}, **{out: {0: "batch"} for out in outputs}},
        )
    return path


def load_failure(exc: BaseException) -> str:
    """The first line of why ONNX Runtime could not load a file (for a one-line warning)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # idle workers sleep instead of spinning: the detector's thread, the encode stage and beam
    # search share 2 cores, and spinning pools only took time from each other (one photo with
    # the detector: p50 21.7 ms against 25.6 spinning; without it 19.0 against 19.3)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
