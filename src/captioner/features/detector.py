"""A person and animal detector: the evidence ImageNet's classes cannot give.

ImageNet-1k has no person class, and a Flickr8k-trained word model sees a person in every
street, tent or parked motorbike (nearly every training caption has one). An Open Images
detector does: MediaPipe's SSD MobileNetV2 (24 classes: Person, Dog, Cat, Car, Chair, ...,
Apache-2.0), converted from its npm package to ONNX by ``scripts/fetch_detector.py`` and shipped
in ``pretrained/detector`` with its checksum, so nothing downloads at run time. Only its class
branch runs: the max over its 1,917 anchors of each class's logit says whether the class is
anywhere in the photo, which is all a caption needs (no boxes, no non-maximum suppression).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.errors import CheckpointError
from captioner.io import read_json

DETECTOR_FILE = "detector.onnx"
DETECTOR_META = "detector.json"
UNUSED_LABEL = "???"  # Open Images' background slot
CHUNK = 4  # photos per detector run


def bundled_detector_dir() -> Path:
    return Path(str(resources.files("captioner") / "pretrained" / "detector"))


@dataclass
class DetectorOutput:
    labels: list[str]  # the detector's classes, "???" (background) included
    probabilities: np.ndarray  # (B, L) presence probability of each class anywhere in the photo

    def of(self, label: str) -> np.ndarray:
        """(B,) probability of one class."""
        return self.probabilities[:, self.labels.index(label)]


class ObjectDetector:
    """RGB uint8 arrays (H, W, 3) of any size -> per-class presence probabilities."""

    def __init__(self, path: Path, labels: list[str], size: int, threads: int | None = None):
        import onnxruntime as ort

        self.labels = labels
        self.size = int(size)
        options = ort.SessionOptions()
        # one thread by default: the detector runs beside the encoder and decoder, and on a
        # 2-core machine a second spinning pool only steals their time
        options.intra_op_num_threads = threads or 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - a damaged file is one clear error
            raise CheckpointError(f"{path}: unreadable detector ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, threads: int | None = None, verify: bool = True
    ) -> ObjectDetector:
        """The detector in ``path`` (default: the one shipped with captioner); ``verify``
        checks the ONNX file against the sha256 its detector.json records."""
        folder = Path(path) if path is not None else bundled_detector_dir()
        onnx_path, meta_path = folder / DETECTOR_FILE, folder / DETECTOR_META
        if not onnx_path.is_file() or not meta_path.is_file():
            raise CheckpointError(
                f"no detector in {folder} (expected {DETECTOR_FILE} and {DETECTOR_META}; "
                "python scripts/fetch_detector.py rebuilds them)"
            )
        try:
            meta = read_json(meta_path)
            labels, size = list(meta["labels"]), int(meta["input"]["size"])
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{meta_path}: unreadable detector description ({exc})") from exc
        if verify:
            digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
            if digest != meta.get("onnx_sha256"):
                raise CheckpointError(
                    f"{onnx_path}: checksum mismatch (file damaged or replaced; "
                    "python scripts/fetch_detector.py rebuilds it)"
                )
        return cls(onnx_path, labels, size, threads)

    def thumbnails(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 (H, W, 3) arrays -> (B, S, S, 3) uint8 at the input size, a plain resize
        (what the model was trained on; no crop, so a person at the edge stays in). Photos
        already at that size (thumbnails kept from before) are taken as they are."""
        out = np.empty((len(images), self.size, self.size, 3), dtype=np.uint8)
        for i, array in enumerate(images):
            array = np.asarray(array, dtype=np.uint8)
            if array.shape != (self.size, self.size, 3):
                image = Image.fromarray(array).convert("RGB")
                array = np.asarray(image.resize((self.size, self.size), Image.BILINEAR))
            out[i] = array
        return out

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 (H, W, 3) arrays -> (B, S, S, 3) float32 in [-1, 1]."""
        return self.thumbnails(images).astype(np.float32) / 127.5 - 1.0

    def __call__(self, images: list[np.ndarray]) -> DetectorOutput:
        if not images:
            return DetectorOutput(self.labels, np.zeros((0, len(self.labels)), np.float32))
        # small chunks: the int8 convolutions run 1.5x slower a photo in batches of 50 than of 4
        logits = np.concatenate(
            [
                self.session.run(None, {self.input_name: self.preprocess(images[i : i + CHUNK])})[0]
                for i in range(0, len(images), CHUNK)
            ]
        )  # (B, L)
        probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return DetectorOutput(self.labels, probabilities.astype(np.float32))
