"""Scattered row copies between the device KV pool and pinned host memory in one kernel launch.

HiCache moves pages whose slots are scattered over both pools. A torch copy needs contiguous memory, so
the `direct` path gathers into a staging buffer, copies it, and scatters on the other side. This kernel
(`--hicache-io-backend kernel`) does the gather, the PCIe transfer and the scatter at once: pinned host
memory is mapped into the GPU's address space (UVA), so a program can load a row from the device pool and
store it straight into host memory, or the reverse. One program copies one slot's row (all heads of one
layer's K or V); rows are moved as 8-byte words when their size allows.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only installs: the transfer engine uses plain index copies
    HAS_TRITON = False


if HAS_TRITON:
    @triton.jit
    def _copy_rows_kernel(src, dst, src_idx, dst_idx, ROW: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        s = tl.load(src_idx + i).to(tl.int64)
        d = tl.load(dst_idx + i).to(tl.int64)
        for off in tl.static_range(0, ROW, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < ROW
            tl.store(dst + d * ROW + cols, tl.load(src + s * ROW + cols, mask=mask), mask=mask)


def word_view(buf: torch.Tensor) -> torch.Tensor:
    """`buf` [slots, ...] as a 2-D tensor of words: int64 when a row's bytes allow it, else uint8."""
    flat = buf.view(torch.uint8).reshape(buf.shape[0], -1)
    return flat.view(torch.int64) if flat.shape[1] % 8 == 0 else flat


def copy_rows(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for 2-D word views (one of them may be pinned host memory); the
    index tensors live on the GPU. Launched on the current stream."""
    n = src_idx.numel()
    if n == 0:
        return
    row = src.shape[1]
    block = min(triton.next_power_of_2(row), 1024)
    _copy_rows_kernel[(n,)](src, dst, src_idx, dst_idx, ROW=row, BLOCK=block, num_warps=4)
