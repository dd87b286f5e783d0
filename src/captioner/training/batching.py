"""Caption samples grouped by image, and reproducible image batches.

A batch is a set of images with all of their captions: the decoder projects each image once and
shares it among its (usually 5) captions, and sorts the captions by length so finished ones drop
out of the step loop (padding costs nothing). Batch order depends only on (seed, epoch), so a
resumed run skips the batches it already did and then sees exactly the batches it would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.data.vocab import Vocabulary


@dataclass
class CaptionSamples:
    tokens: torch.Tensor  # (S, L) <start> ... <end> <pad>..., long, grouped by image
    lengths: torch.Tensor  # (S,) <start> through <end>
    offsets: torch.Tensor  # (I + 1,) captions of image i are rows offsets[i]:offsets[i + 1]

    @property
    def num_images(self) -> int:
        return len(self.offsets) - 1

    def for_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample rows of the given images, and for each row its position in ``images``."""
        starts, ends = self.offsets[images], self.offsets[images + 1]
        counts = ends - starts  # (I,)
        rows = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)])
        image_pos = torch.repeat_interleave(torch.arange(len(images)), counts)
        return rows, image_pos


def build_samples(
    image_names: list[str], captions: dict[str, list[str]], vocab: Vocabulary, max_length: int = 30
) -> CaptionSamples:
    """Every caption of every image (in the given image order), encoded and cut to max_length."""
    encoded, offsets = [], [0]
    for name in image_names:
        for caption in captions[name]:
            ids = vocab.encode(caption, add_special=False)[:max_length]
            if ids:
                encoded.append([vocab.start_id, *ids, vocab.end_id])
        offsets.append(len(encoded))
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    tokens = torch.zeros(len(encoded), int(lengths.max()) if encoded else 2, dtype=torch.long)
    for i, ids in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids)
    return CaptionSamples(tokens, lengths, torch.tensor(offsets, dtype=torch.long))


def image_batches(
    num_images: int, images_per_batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1
) -> list[torch.Tensor]:
    """A seeded shuffle of the images cut into batches; with ``world`` > 1 every rank gets the
    same number of batches (every world-th one), as DistributedSampler does."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_images, generator=generator)
    batches = list(order.split(images_per_batch))
    if world > 1:
        usable = len(batches) - len(batches) % world
        batches = batches[rank:usable:world]
    return batches
