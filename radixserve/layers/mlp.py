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
from radixserve.layers.quantization.base import QuantizedActivation


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, False, tp, quant)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, tp, quant)

    def input_quant(self, num_tokens: int) -> torch.dtype | None:
        return self.gate_up_proj.input_quant(num_tokens)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        h = self.gate_up_proj(x)
        quant = self.down_proj.input_quant(h.shape[0])
        if quant is None:
            return self.down_proj(silu_and_mul(h))
        return self.down_proj(QuantizedActivation(*silu_and_mul(h, quant=quant), h.dtype))
