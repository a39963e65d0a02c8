"""Where tensors are computed: `--device auto|cpu|cuda|cuda:N` resolved (merge, extract)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return dev


def resolve_device_name(device: str = "auto") -> str:
    """resolve_device as a string, without importing torch (~1.5 s) when the answer is the CPU:
    "auto" on a Linux machine with no GPU driver at all is the CPU."""
    if device == "cpu" or (device == "auto" and sys.platform.startswith("linux") and not _gpu_driver()):
        return "cpu"
    return str(resolve_device(device))


def _gpu_driver() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd"))
