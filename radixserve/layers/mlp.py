"""The dense SwiGLU MLP: gate and up in one column-parallel matmul, SiLU-and-mul, row-parallel down.

The decoder layers of dense models use it, and so do MoE models for their dense layers and for Qwen2-MoE's
shared expert (layers/moe.py)."""
from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed.group import TPGroup
from radixserve.kernels.fused import silu_and_mul
from radixserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from radixserve.layers.quantization import QuantConfig


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, False, tp, quant)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
