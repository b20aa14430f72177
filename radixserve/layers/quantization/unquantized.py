"""The plain matrix: weight [out, in] in the model dtype, y = x W^T (+ b)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from radixserve.layers.quantization.base import LinearMethod, ParamLayout, make_param

if TYPE_CHECKING:
    from radixserve.layers.linear import LinearBase


class UnquantizedLinearMethod(LinearMethod):
    description = "unquantized"

    def create_weights(self, layer: LinearBase, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = make_param((out_features, in_features), dtype, ParamLayout())

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
