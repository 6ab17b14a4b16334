"""Free memory on the host and on a device, read where the operating system or the driver reports it."""

from __future__ import annotations

import torch


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where there is no such file."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_bytes(device: torch.device) -> int | None:
    """Free memory where tensors on ``device`` live: the host's MemAvailable for the CPU,
    ``torch.cuda.mem_get_info`` for CUDA; None where unknown."""
    if device.type == "cpu":
        return host_available_bytes()
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None
