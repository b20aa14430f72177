"""RMSNorm, with the residual add fused into the same call (one Triton kernel on GPU), and optionally the
per-token FP8 quantization of the matmul that follows (`quant`, from that layer's input_quant)."""
from __future__ import annotations

import torch
from torch import nn

from radixserve.kernels.fused import rmsnorm
from radixserve.layers.quantization.base import NormedInput, QuantizedActivation


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

    def deferred(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[NormedInput, torch.Tensor]:
        """forward's (normed, new residual) for a linear layer whose input_prologue("rmsnorm") said yes: the
        norm is left to its matmul, which also fills the new residual (a fresh buffer; x itself without one)."""
        residual_out = torch.empty_like(x) if residual is not None else None
        return NormedInput(x, residual, self.weight, self.eps, residual_out), (x if residual is None else residual_out)
