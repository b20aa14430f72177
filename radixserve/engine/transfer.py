"""Host → device copies that never stall the CPU behind the GPU.

A plain `torch.tensor(x, device="cuda")` copies from pageable memory and synchronises the stream,
so the CPU waits for the step in flight: that would serialise overlap scheduling. Copies from
pinned memory with non_blocking=True are queued behind the running work instead.
"""
from __future__ import annotations

import torch


def to_device(data, device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
