"""Where tensors live (--device auto|cpu|cuda) and in what precision the GPU computes.

Every command resolves its --device here, so "auto" means the same everywhere (a visible CUDA
GPU, else the CPU) and asking for a GPU that is not there is one clear error, not a traceback
deep inside torch. On the CPU nothing changes: fp32, and the same numbers for the same seed.
"""

from __future__ import annotations

import contextlib
import os

import torch

from captioner.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu. Under torchrun each process takes the GPU
    of its LOCAL_RANK."""
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda: no CUDA GPU is visible to torch (use --device cpu or auto)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
            "start at most one process per GPU (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. 'auto' is bf16 on a GPU that has it and
    fp32 otherwise (the CPU keeps fp32 unless bf16/fp16 is asked for explicitly)."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return _DTYPES.get(name)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass and the loss; a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (disabled)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def dist_backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"
