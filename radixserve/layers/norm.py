"""RMSNorm, with the residual add fused into the same call (one Triton kernel on GPU)."""
from __future__ import annotations

import torch
from torch import nn

from radixserve.kernels.fused import rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """normed(x), or (normed(x + residual), x + residual) when a residual is given."""
        return rmsnorm(x, self.weight, self.eps, residual)
