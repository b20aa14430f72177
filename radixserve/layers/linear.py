"""Tensor-parallel linear layers.

Each parameter carries a `weight_loader(param, full_tensor, shard_id)` that copies this rank's
slice of a full checkpoint tensor into place, so loaders stay ignorant of parallelism.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.distributed.group import TPGroup


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.out_per_rank = tp.split(out_features, "output features")
        self.weight = _param(self.out_per_rank, in_features)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(self.out_per_rank) if bias else None
        if bias:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup) -> None:
        super().__init__(in_features, sum(out_sizes), bias, tp)
        self.out_sizes = [tp.split(o, "output features") for o in out_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        size, offset = self.out_sizes[shard_id], sum(self.out_sizes[:shard_id])
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q, K, V projection. Query heads are split over ranks; KV heads too, or replicated
    when there are fewer KV heads than ranks (each rank keeps the KV head its queries use)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup) -> None:
        self.heads = tp.split(num_heads, "attention heads")
        if num_kv_heads >= tp.size:
            self.kv_heads = tp.split(num_kv_heads, "KV heads")
            self.kv_rank = tp.rank
        else:
            if tp.size % num_kv_heads:
                raise ValueError(f"--tp {tp.size} must be a multiple of the {num_kv_heads} KV heads")
            self.kv_heads, self.kv_rank = 1, tp.rank // (tp.size // num_kv_heads)
        self.head_dim = head_dim
        nn.Module.__init__(self)
        self.tp = tp
        out = (self.heads + 2 * self.kv_heads) * head_dim
        self.weight = _param(out, hidden)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(out) if bias else None
        if bias:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        offset, size, rank = {"q": (0, q, self.tp.rank), "k": (q, kv, self.kv_rank),
                              "v": (q + kv, kv, self.kv_rank)}[shard_id]
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, rank * size, size))


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.in_per_rank = tp.split(in_features, "input features")
        self.weight = _param(out_features, self.in_per_rank)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(out_features) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
