"""torchrun support: process group from the environment, gloo on CPU, rank-0-only side effects."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed() -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())


def broadcast_flag(value: bool, ctx: DistContext) -> bool:
    """Rank 0 decides (e.g. early stopping); every rank gets its answer."""
    if not ctx.enabled:
        return value
    import torch

    flag = torch.tensor([1 if value else 0])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
