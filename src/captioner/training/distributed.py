"""torchrun support: process group from the environment (NCCL between GPUs, gloo on CPU),
rank-0-only side effects."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from captioner.devices import dist_backend


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # this process's device (cuda:LOCAL_RANK on GPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()


def init_distributed(device: torch.device | None = None) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1); otherwise a single process.
    The backend follows the device: NCCL for CUDA, gloo for the CPU."""
    device = device or torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=dist_backend(device))
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def broadcast_flag(value: bool, ctx: DistContext) -> bool:
    """Rank 0 decides (e.g. early stopping); every rank gets its answer."""
    if not ctx.enabled:
        return value
    flag = torch.tensor([1 if value else 0], device=ctx.device)  # NCCL moves GPU tensors only
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
