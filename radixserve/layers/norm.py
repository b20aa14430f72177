"""RMSNorm, with the residual add fused into the same call (one Triton kernel on GPU), and optionally the
per-token FP8 quantization of the matmul that follows (`quant`, from that layer's input_quant)."""
from __future__ import annotations

import torch
from torch import nn

from radixserve.kernels.fused import rmsnorm
from radixserve.layers.quantization.base import QuantizedActivation


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quant: torch.dtype | None = None):
        """normed(x), or (normed(x + residual), x + residual) when a residual is given; normed(...) is a
        QuantizedActivation when `quant` names an FP8 dtype."""
        if quant is None:
            return rmsnorm(x, self.weight, self.eps, residual)
        out = rmsnorm(x, self.weight, self.eps, residual, quant=quant)
        if residual is None:
            return QuantizedActivation(*out, x.dtype)
        return QuantizedActivation(*out[0], x.dtype), out[1]
