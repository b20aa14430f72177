"""Greedy sampling's argmax over the vocabulary in two Triton kernels.

torch's argmax reduces a [B, V] row with one thread block per row: for one row of 128,256 logits (Llama 3)
that is one SM doing the whole read, 27.5 us of a 3 ms batch-1 decode step on the H200
(benchmarks/results/kernel_table_llama8b_fp8_bs1_h200.json), plus a separate cast to fp32 before it. Here
stage 1 splits each row over programs of BLOCK logits (max and first index of each, compared in fp32 as
the cast would), and stage 2 reduces a row's partials. Ties go to the lowest index, as torch's argmax.
"""
from __future__ import annotations

import torch

from radixserve.kernels import pdl

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BLOCK = 4096

if HAS_TRITON:

    @triton.jit
    def _argmax_partial_kernel(X, PV, PI, V, stride_x, NUM_PARTS, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl.trigger(PDL)
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        offs = part * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        best = tl.max(x, axis=0)
        # first index holding the max (masked lanes are -inf, never chosen over a real logit)
        idx = tl.min(tl.where(x == best, offs, V + BLOCK), axis=0)
        tl.store(PV + row * NUM_PARTS + part, best)
        tl.store(PI + row * NUM_PARTS + part, idx)

    @triton.jit
    def _argmax_merge_kernel(PV, PI, Out, NUM_PARTS, BLOCK_P: tl.constexpr, PDL: tl.constexpr = False):
        pdl.trigger(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_P)
        mask = offs < NUM_PARTS
        v = tl.load(PV + row * NUM_PARTS + offs, mask=mask, other=float("-inf"))
        i = tl.load(PI + row * NUM_PARTS + offs, mask=mask, other=2**31 - 1)
        best = tl.max(v, axis=0)
        # partials cover increasing index ranges: the smallest index among the maxima is the first overall
        tl.store(Out + row, tl.min(tl.where(v == best, i, 2**31 - 1), axis=0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of a [B, V] tensor (int64 [B]); torch's where Triton does not run."""
    if not (HAS_TRITON and x.is_cuda and x.dim() == 2 and x.stride(-1) == 1) or x.shape[1] >= 2**31 - BLOCK:
        return x.float().argmax(dim=-1)
    B, V = x.shape
    parts = triton.cdiv(V, BLOCK)
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    if B == 0:
        return out
    pv = torch.empty((B, parts), dtype=torch.float32, device=x.device)
    pi = torch.empty((B, parts), dtype=torch.int32, device=x.device)
    _argmax_partial_kernel[(B, parts)](x, pv, pi, V, x.stride(0), parts, BLOCK=BLOCK, PDL=pdl.ENABLED, num_warps=8)
    _argmax_merge_kernel[(B,)](pv, pi, out, parts, BLOCK_P=max(16, triton.next_power_of_2(parts)),
                               PDL=pdl.ENABLED, num_warps=1)
    return out
