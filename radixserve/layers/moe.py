"""The sparse MoE block that takes the dense MLP's place in an MoE model's sparse layers.

    router logits = x @ gate^T                       (replicated: every rank routes every token alike)
    weights, ids  = route(logits)                    (HF's routing, below)
    out           = sum over the k chosen experts    (kernels/moe.py: fused grouped GEMMs)
                  + sigmoid(x @ shared_gate^T) * shared_expert(x)   (Qwen2-MoE only)

Parallelism. Attention is tensor-parallel, so after its all-reduce every rank holds every token's hidden
state: the tokens are already where any expert is, and dispatch is a selection, not a transfer.
* --tp N alone: every rank holds all experts, each expert's intermediate dimension split N ways (like the
  dense MLP); the partial outputs are all-reduced.
* --tp N --ep-size N: rank r holds experts [r*E/N, (r+1)*E/N) whole; each rank runs the pairs (token, expert)
  whose expert it holds and the all-reduce of the partial sums is the combine. An all-to-all would only pay
  where tokens are split across ranks (DP attention), which radixserve does not do; with replicated tokens it
  would move the same bytes twice and still need the all-gather for the next attention.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.distributed.group import TPGroup
from radixserve.kernels.moe import fused_moe
from radixserve.layers.mlp import DenseMLP

if TYPE_CHECKING:  # layers sit below models: the config is only a type here
    from radixserve.models.config import MoEConfig


def route(logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's top-k softmax router: softmax over all experts in fp32, the k largest, renormalised to sum to 1
    when asked (norm_topk_prob; Mixtral always), then rounded to `weights_dtype` (Qwen rounds them to the
    model dtype; Mixtral, None, keeps fp32)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if weights_dtype is None else weights.to(weights_dtype)), ids


class FusedMoE(nn.Module):
    """This rank's experts as two stacked tensors, w13 [E_local, 2*I_local, H] (each expert's gate rows over
    its up rows) and w2 [E_local, H, I_local]. forward returns this rank's partial sum (not reduced)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup,
                 expert_parallel: bool) -> None:
        super().__init__()
        self.num_experts, self.tp, self.expert_parallel = num_experts, tp, expert_parallel and tp.size > 1
        if self.expert_parallel:
            if num_experts % tp.size:
                raise ValueError(f"--ep-size {tp.size} does not divide the model's {num_experts} experts: each "
                                 f"rank must hold whole experts; use an EP size that divides {num_experts}")
            self.local_experts, self.inter = num_experts // tp.size, intermediate_size
            self.first_expert = tp.rank * self.local_experts
        else:
            self.local_experts, self.first_expert = num_experts, 0
            self.inter = tp.split(intermediate_size, "moe_intermediate_size")
        self.w13 = nn.Parameter(torch.empty(self.local_experts, 2 * self.inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.local_experts, hidden_size, self.inter), requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """shard_id (expert, 0 | 1 | None): one expert's gate (0) or up (1) [I, H], or its down [H, I] (None);
        or (None, None): all experts at once (HF's fused layout, [E, 2I, H] / [E, H, I])."""
        expert, half = shard_id
        if expert is None:  # [E, 2I, H] or [E, H, I]: every expert, through the per-expert path
            for e in range(loaded.shape[0]):
                if param is self.w13:
                    i = loaded.shape[1] // 2
                    self.weight_loader(param, loaded[e, :i], (e, 0))
                    self.weight_loader(param, loaded[e, i:], (e, 1))
                else:
                    self.weight_loader(param, loaded[e], (e, None))
            return
        local = expert - self.first_expert
        if not 0 <= local < self.local_experts:
            return  # another rank's expert
        n, rank = self.inter, (0 if self.expert_parallel else self.tp.rank)
        if param is self.w13:
            param.data[local, half * n:(half + 1) * n].copy_(loaded.narrow(0, rank * n, n))
        else:
            param.data[local].copy_(loaded.narrow(1, rank * n, n))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel:
            local = ids - self.first_expert
            ids = torch.where((local >= 0) & (local < self.local_experts), local, -1)
        return fused_moe(x, self.w13, self.w2, weights, ids, has_remote=self.expert_parallel)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert). Parameter names follow the HF checkpoints:
    gate.weight, experts.*, shared_expert.*, shared_expert_gate.weight."""

    def __init__(self, moe: MoEConfig, hidden_size: int, tp: TPGroup, expert_parallel: bool = False) -> None:
        super().__init__()
        self.cfg, self.tp = moe, tp
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedMoE(moe.num_experts, hidden_size, moe.intermediate_size, tp, expert_parallel)
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(hidden_size, moe.shared_expert_intermediate_size, tp)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
            self.shared_expert_gate.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(F.linear(x, self.gate.weight), self.cfg.top_k, self.cfg.norm_topk_prob,
                             x.dtype if self.cfg.weights_in_model_dtype else None)
        out = self.tp.all_reduce(self.experts(x, weights, ids))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return out
