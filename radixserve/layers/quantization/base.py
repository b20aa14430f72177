"""The interface between linear layers and a quantization scheme.

A linear layer knows how it is sharded (which output rows and input columns of a checkpoint tensor
this rank holds); a `LinearMethod` knows which tensors a weight is stored as (a plain matrix; an
FP8 matrix with a scale per row or per 128x128 block; later int4 groups) and how to multiply with
them. The layer asks the method to create its parameters, loads every checkpoint tensor through
the same row/column slicing, and calls `apply` in forward. Adding a scheme is one new module with
a `QuantConfig` and its `LinearMethod`s, registered in `QUANT_CONFIGS` (layers/quantization/__init__).

Parameter layout contract: every parameter a method creates carries `param.shard_layout`, a
`ParamLayout` that tells the layer's loader how a checkpoint tensor maps onto it:
    out_dim   the dim indexed by output features (sharded by column-parallel layers), or None
    in_dim    the dim indexed by input features (sharded by row-parallel layers), or None
    in_unit   input features per element along in_dim (1 for a weight, 128 for block scales)
    expand    optional: turns the checkpoint tensor into the full per-row layout first (a per-tensor
              scale becomes one value per output row), given the full (out, in) of the weight and
              the checkpoint tensor's name for errors
    reduce    "copy" (default) or "max": scalars that fused projections share (the static input
              scale of q, k and v) keep the largest of their shards
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from radixserve.layers.linear import LinearBase


@dataclass(frozen=True)
class ParamLayout:
    out_dim: int | None = 0
    in_dim: int | None = 1
    in_unit: int = 1
    expand: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
    reduce: str = "copy"


def make_param(shape: tuple[int, ...], dtype: torch.dtype, layout: ParamLayout,
               fill: float | None = None, device: torch.device | None = None) -> nn.Parameter:
    """device None: the current default (the model is built under `with torch.device(...)`); parameters
    made after loading (quantized copies) must name their device."""
    t = (torch.empty(shape, dtype=dtype, device=device) if fill is None
         else torch.full(shape, fill, dtype=dtype, device=device))
    p = nn.Parameter(t, requires_grad=False)
    p.shard_layout = layout
    return p


class QuantizedActivation(NamedTuple):
    """A linear layer's input already quantized per token by the kernel that produced it (RMSNorm,
    SiLU-and-mul), so the matmul skips its own quantize pass: q [T, K], scale [T, 1] fp32, and the
    dtype the product comes back in. Made only for a layer whose `input_quant` asked for it."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


class LinearMethod(ABC):
    """How one linear layer stores and applies its weight. Stateless across layers: per-layer state
    lives on the layer as parameters/buffers the method registers."""

    #: short name for start-up lines ("fp8 per-channel (online)")
    description: str = "unquantized"
    #: process_weights_after_loading touches only its own layer, so layers may be processed on threads
    parallel_processing: bool = False

    @abstractmethod
    def create_weights(self, layer: LinearBase, out_features: int, in_features: int,
                       dtype: torch.dtype) -> None:
        """Register this rank's parameters on `layer` ([out_features, in_features] per rank)."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:  # noqa: B027 (optional hook)
        """Turn the loaded tensors into the form `apply` uses (quantize, requantize, dequantize)."""

    @abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor | QuantizedActivation, bias: torch.Tensor | None
              ) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype. A QuantizedActivation comes only after input_quant said so."""

    def input_quant(self, layer: LinearBase, num_tokens: int) -> torch.dtype | None:
        """The FP8 dtype when `apply` would quantize an input of num_tokens rows per token (dynamically)
        itself: the kernel producing the input may then hand over a QuantizedActivation instead. None: a
        plain tensor, always."""
        return None


class QuantConfig(ABC):
    """A quantization scheme as configured for one model (from a flag or the checkpoint's config)."""

    name: str

    @abstractmethod
    def linear_method(self) -> LinearMethod:
        """The method every TP linear layer of the decoder uses (the embedding stays unquantized)."""

    def lm_head_method(self, tied: bool) -> LinearMethod | None:
        """The LM head's method (`tied`: its weight is the embedding table too); None (the default) keeps
        it in the model dtype."""
        return None

    def describe(self) -> str:
        return self.linear_method().description
