"""The encoder on a CUDA GPU for `captioner features --device cuda`.

ONNX Runtime is the fast path on a CPU (features/onnx.py); on a GPU PyTorch itself is the
simplest fast path, with no extra CUDA build of onnxruntime to install. Same interface as
FeatureExtractor (``spec``, ``backend``, ``__call__``, ``with_concepts``); fp32 weights, so the
grids match the CPU's up to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from captioner.features.encoders import EncoderSpec, GridAndConcepts, build_encoder, get_spec


class DeviceExtractor:
    """Preprocessed (B, 3, S, S) float32 -> (B, P, C) float32 features, computed on ``device``."""

    def __init__(self, name: str, device: torch.device):
        self.spec: EncoderSpec = get_spec(name)
        self.device = device
        self.backend = f"torch-{device.type}"
        self._torch = build_encoder(name).to(device).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            images = torch.from_numpy(batch).to(self.device, non_blocking=True)
            return self._torch(images).float().cpu().numpy()  # (B, P, C)

    def with_concepts(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            grid = self._torch(torch.from_numpy(batch).to(self.device))  # (B, P, C)
            logits = self._torch.concept_logits(grid)  # (B, 1000)
            return grid.float().cpu().numpy(), logits.float().cpu().numpy()

    def with_grounding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            out = GridAndConcepts(self._torch)(torch.from_numpy(batch).to(self.device))
        out = [t.float().cpu().numpy() for t in out]
        return out[0], out[1], (out[2] if len(out) == 3 else None)
