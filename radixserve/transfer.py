"""Host → device copies that never stall the CPU behind the GPU.

A plain `torch.tensor(x, device="cuda")` copies from pageable memory and synchronises the stream,
so the CPU waits for the step in flight: that would serialise overlap scheduling. Copies from
pinned memory with non_blocking=True are queued behind the running work instead.
"""
from __future__ import annotations

import array
from collections.abc import Iterable

import torch


def int64_tensor(values: Iterable[int]) -> torch.Tensor:
    """A CPU int64 tensor of Python ints, for the per-request index lists a step builds (rows, lengths,
    slots). torch.tensor converts a list element by element (~0.1-0.2 us each, tens of us at batch
    256); array.array packs the ints in C and torch.frombuffer wraps that buffer without a copy (the
    tensor keeps the array alive), several times faster."""
    buf = array.array("q", values)
    return torch.frombuffer(buf, dtype=torch.int64) if buf else torch.empty(0, dtype=torch.int64)


def to_device(data, device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
