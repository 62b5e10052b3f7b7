"""Memory checks made before allocating: what the device has free, and a refusal with the numbers."""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import LlamaMinError


def free_memory(device) -> Optional[int]:
    """Bytes that can still be allocated on the device (None when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(n_bytes: int, what: str, device) -> None:
    """Refuse, before allocating, a request that cannot fit the device's free memory (with the numbers)."""
    free = free_memory(device)
    if free is not None and n_bytes > free:
        raise LlamaMinError(f"{what} needs {n_bytes / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB is free "
                            f"on {device}: ask for fewer positions (max_seq_len / max_gen_len) or a smaller batch")
