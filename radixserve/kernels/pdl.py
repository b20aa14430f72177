"""Programmatic dependent launch (PDL, Hopper and later) for the weight-streaming decode kernels.

A batch-1 decode step of an FP8 8B model is ~130 weight GEMVs separated by ~200 tiny kernels (RMSNorm,
rotary, attention, SiLU). Launched normally, each GEMV starts only once the kernel before it has fully
drained, and then spends its first microseconds ramping DRAM traffic up; for the 4-25 MB projections
that ramp is a third of their time. With PDL a GEMV is launched as a *programmatic dependent*: the small
kernels before it execute `griddepcontrol.launch_dependents` on entry (`trigger`), so the GEMV's programs
become resident while they run, ask for their first weight lines into L2 (weights never depend on the
previous kernel), and only then `griddepcontrol.wait`, which returns once the previous kernel has
completed and its writes are visible. Nothing is read from or written to activation memory before that
wait, so the result is the same as a plain launch. CUDA graph capture keeps the programmatic edges.

Only the GEMVs are dependents. Making every small kernel one too (each triggering, then waiting, on
entry) was measured on the H200 and lost the gain: fp8 batch 1 322.1 tok/s with the chain against 323.2
without PDL, bf16 (whose GEMMs are cuBLAS's) 214.3 against 217.6. GEMVs only: +3.7 % at fp8 batch 1 in an
A/B alternated three times in one call (benchmarks/results/fp8_h200_bs1_pdlab_*.json).

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
    """Extra launch options for a kernel that waits (`gdc_wait`) before touching activations."""
    return {"launch_pdl": True} if ENABLED else {}


if triton is not None:

    @triton.jit
    def trigger(PDL: tl.constexpr):
        """Let the programmatic dependent launched after this kernel (a GEMV) become resident now; it waits
        for this kernel's output itself. PDL False: nothing."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
