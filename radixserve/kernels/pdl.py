"""Programmatic dependent launch (PDL, Hopper and later) for the weight-streaming decode kernels.

A batch-1 decode step of an FP8 8B model is ~130 weight GEMVs separated by ~200 tiny kernels (RMSNorm,
rotary, attention, SiLU). Launched normally, each kernel starts only once the one before it has fully
drained, and a GEMV then spends its first microseconds ramping DRAM traffic up; for the 4-25 MB
projections that ramp is a third of their time. With PDL every one of these Triton kernels is launched
as a *programmatic dependent* and starts with `enter`: `griddepcontrol.launch_dependents`, so the next
kernel may become resident while this one runs, then `griddepcontrol.wait`, which returns once the
previous kernel has completed and its writes are visible. Between the two a GEMV asks for its first
weight lines into L2 (weights never depend on the previous kernel). Nothing is read from or written to
activation memory before the wait, so the result is the same as a plain launch; kernels launched
normally (torch's, cuBLAS) keep full dependencies. CUDA graph capture keeps the programmatic edges.

`configure` is called once by the model runner from ServerArgs (`--disable-pdl` turns it off); kernels
read `ENABLED` at launch, so a captured graph keeps the setting it was captured with.
"""
from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl
    HAS_GDC = hasattr(tl, "extra") and hasattr(tl.extra, "cuda") and hasattr(tl.extra.cuda, "gdc_wait")
except ImportError:  # CPU-only installs
    triton = None
    HAS_GDC = False

logger = logging.getLogger(__name__)
ENABLED = False


def supported(device: torch.device) -> bool:
    """PDL needs sm_90+ and a Triton with the griddepcontrol intrinsics (3.3+)."""
    return HAS_GDC and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def configure(enabled: bool, device: torch.device) -> bool:
    """Turn PDL on for this process's kernels where the device supports it; returns whether it is on."""
    global ENABLED
    ENABLED = bool(enabled) and supported(device)
    if enabled and not ENABLED and device.type == "cuda":
        logger.info("programmatic dependent launch: not available here (needs sm_90+ and triton >= 3.3)")
    return ENABLED


def launch_kwargs() -> dict:
    """Extra launch options for a kernel that calls `enter` before touching activations."""
    return {"launch_pdl": True} if ENABLED else {}


if triton is not None:

    @triton.jit
    def enter(PDL: tl.constexpr):
        """A programmatic dependent's first step (PDL False: nothing): let the next kernel launch, then wait
        for the previous one's output."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
