"""Tensor-parallel linear layers.

Each parameter carries a `weight_loader(param, full_tensor, shard_id)` that copies this rank's
slice of a full checkpoint tensor into place, so loaders stay ignorant of parallelism. What the
parameters are (a plain matrix, an FP8 matrix and its scales, ...) is up to the layer's
`LinearMethod` (layers/quantization); every one of them is sliced by the same rule, read from its
`ParamLayout`: output rows like the weight's rows, input columns like the weight's columns.
"""
from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed.group import TPGroup
from radixserve.layers.quantization import LinearMethod, QuantConfig
from radixserve.layers.quantization.base import ParamLayout, QuantizedActivation, make_param
from radixserve.layers.quantization.unquantized import UnquantizedLinearMethod


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    """y = x W^T (+ b). `out_shards[shard_id] = (row offset in our parameter, rows on this rank, which
    slice of the checkpoint tensor this rank takes, the checkpoint tensor's full row count)`; input
    columns are split over ranks when `in_sharded`."""

    def __init__(self, in_features: int, in_per_rank: int, in_sharded: bool,
                 out_shards: dict[object, tuple[int, int, int, int]], bias: bool, tp: TPGroup,
                 quant: QuantConfig | None) -> None:
        super().__init__()
        self.tp, self.in_features, self.in_per_rank, self.in_sharded = tp, in_features, in_per_rank, in_sharded
        self.out_shards = out_shards
        self.out_per_rank = sum(size for _, size, _, _ in out_shards.values())
        self.params_dtype = torch.get_default_dtype()  # the model dtype: activations, bias, dequantized weights
        self.quant_method: LinearMethod = quant.linear_method() if quant else UnquantizedLinearMethod()
        self.quant_method.create_weights(self, self.out_per_rank, in_per_rank, self.params_dtype)
        self.bias = make_param((self.out_per_rank,), self.params_dtype, ParamLayout(0, None)) if bias else None
        for p in self.parameters(recurse=False):
            p.weight_loader = self.weight_loader

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Parameters a method adds after construction (scales it computes) get the same loader."""
        super().register_parameter(name, param)
        if param is not None and hasattr(self, "out_shards"):
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        layout: ParamLayout = param.shard_layout
        offset, size, rank, full_out = self.out_shards[shard_id]
        if layout.expand is not None:
            loaded = layout.expand(loaded, full_out, self.in_features)
        if layout.in_dim is not None and self.in_sharded and self.tp.size > 1:
            if self.in_per_rank % layout.in_unit:
                raise ValueError(f"--tp {self.tp.size} splits {self.in_features} input features into "
                                 f"{self.in_per_rank} per rank, not a multiple of the {layout.in_unit}-wide "
                                 f"quantization blocks; use a TP size that keeps blocks whole")
            n = self.in_per_rank // layout.in_unit
            loaded = loaded.narrow(layout.in_dim, self.tp.rank * n, n)
        dst = param.data
        if layout.out_dim is not None:
            loaded = loaded.narrow(layout.out_dim, rank * size, size)
            dst = dst.narrow(layout.out_dim, offset, size)
        if dst.shape != loaded.shape:
            raise ValueError(f"checkpoint slice of shape {tuple(loaded.shape)} does not fit parameter slice "
                             f"{tuple(dst.shape)} (shard {shard_id!r})")
        loaded = loaded.to(dst.dtype)
        dst.copy_(torch.maximum(dst, loaded) if layout.reduce == "max" else loaded)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def input_quant(self, num_tokens: int) -> torch.dtype | None:
        """See LinearMethod.input_quant: whether the producer of this layer's input may quantize it."""
        return self.quant_method.input_quant(self, num_tokens)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's output rows split over ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup,
                 quant: QuantConfig | None = None) -> None:
        n = tp.split(out_features, "output features")
        super().__init__(in_features, in_features, False, {None: (0, n, tp.rank, out_features)}, bias, tp, quant)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of the same input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup,
                 quant: QuantConfig | None = None) -> None:
        sizes = [tp.split(o, "output features") for o in out_sizes]
        shards = {i: (sum(sizes[:i]), s, tp.rank, o) for i, (s, o) in enumerate(zip(sizes, out_sizes))}
        super().__init__(in_features, in_features, False, shards, bias, tp, quant)


class QKVParallelLinear(LinearBase):
    """Fused Q, K, V projection. Query heads are split over ranks; KV heads too, or replicated
    when there are fewer KV heads than ranks (each rank keeps the KV head its queries use)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup, quant: QuantConfig | None = None) -> None:
        self.heads = tp.split(num_heads, "attention heads")
        if num_kv_heads >= tp.size:
            self.kv_heads = tp.split(num_kv_heads, "KV heads")
            kv_rank = tp.rank
        else:
            if tp.size % num_kv_heads:
                raise ValueError(f"--tp {tp.size} must be a multiple of the {num_kv_heads} KV heads")
            self.kv_heads, kv_rank = 1, tp.rank // (tp.size // num_kv_heads)
        self.head_dim = head_dim
        q, kv = self.heads * head_dim, self.kv_heads * head_dim
        shards = {"q": (0, q, tp.rank, num_heads * head_dim), "k": (q, kv, kv_rank, num_kv_heads * head_dim),
                  "v": (q + kv, kv, kv_rank, num_kv_heads * head_dim)}
        super().__init__(hidden, hidden, False, shards, bias, tp, quant)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's input columns split over ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup,
                 quant: QuantConfig | None = None) -> None:
        n = tp.split(in_features, "input features")
        super().__init__(in_features, n, True, {None: (0, out_features, 0, out_features)}, bias, tp, quant)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        y = self.tp.all_reduce(self.quant_method.apply(self, x, None))
        return y if self.bias is None else y + self.bias
