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
from radixserve.kernels.fp8 import quantize_rows
from radixserve.kernels.moe import dequantize_expert, fused_moe, topk_softmax
from radixserve.layers.mlp import DenseMLP

if TYPE_CHECKING:  # layers sit below models: the config is only a type here
    from radixserve.layers.quantization import QuantConfig
    from radixserve.models.config import MoEConfig

FP8 = torch.float8_e4m3fn


def route(logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's top-k softmax router: softmax over all experts in fp32, the k largest, renormalised to sum to 1
    when asked (norm_topk_prob; Mixtral always), then rounded to `weights_dtype` (Qwen rounds them to the
    model dtype; Mixtral, None, keeps fp32). One kernel on GPU (kernels/moe.py topk_softmax)."""
    return topk_softmax(logits, top_k, renormalize, weights_dtype)


class FusedMoE(nn.Module):
    """This rank's experts as two stacked tensors, w13 [E_local, 2*I_local, H] (each expert's gate rows over
    its up rows) and w2 [E_local, H, I_local]. forward returns this rank's partial sum (not reduced).

    FP8 (quant: the model's Fp8Config): a block-FP8 checkpoint (Qwen3-30B-A3B-FP8's layout: per expert
    `weight` e4m3 and `weight_scale_inv` [ceil(rows/b0), ceil(cols/b1)]) loads as w13/w2 in fp8 with scales
    w13_scale [E_local, 2*I_local, H/b1] and w2_scale [E_local, H, I_local/b1] (expanded over rows, so rows split
    anywhere); `--quantization fp8` quantizes 16-bit experts per output row after loading. Per-tensor FP8
    expert checkpoints are refused. Without FP8 support (GPU below sm_89) the weights are dequantized."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup,
                 expert_parallel: bool, quant: QuantConfig | None = None) -> None:
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
        fp8 = quant is not None and quant.name == "fp8"
        self.block = quant.block if fp8 and quant.checkpoint is not None else None
        self.online_fp8 = fp8 and quant.checkpoint is None
        self.native_fp8 = fp8 and quant.native
        if fp8 and quant.checkpoint is not None and self.block is None:
            raise ValueError("FP8 expert weights with per-tensor scales are not supported: radixserve loads block-FP8 "
                             "MoE checkpoints (weight_block_size) or quantizes 16-bit experts with --quantization fp8")
        El, H, n = self.local_experts, hidden_size, self.inter
        self.params_dtype = torch.get_default_dtype()  # the model dtype: models are built under it
        wdtype = FP8 if self.block else None
        self.w13 = nn.Parameter(torch.empty(El, 2 * n, H, dtype=wdtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(El, H, n, dtype=wdtype), requires_grad=False)
        self.w13_scale = self.w2_scale = None
        self.group_k = (0, 0)
        if self.block:
            b1 = self.block[1]
            if n % b1 and not self.expert_parallel and tp.size > 1:
                raise ValueError(f"--tp {tp.size} splits each expert's {intermediate_size} columns into {n}, not a "
                                 f"multiple of the checkpoint's {b1}-column scale blocks; pass --ep-size {tp.size}")
            self.w13_scale = nn.Parameter(torch.empty(El, 2 * n, -(-H // b1), dtype=torch.float32),
                                          requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(El, H, -(-n // b1), dtype=torch.float32), requires_grad=False)
            self.group_k = (b1, b1)
        for p in (self.w13, self.w2, self.w13_scale, self.w2_scale):
            if p is not None:
                p.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """shard_id (expert, 0 | 1 | None): one expert's gate (0) or up (1) [I, H], or its down [H, I] (None);
        or (None, None): all experts at once (HF's fused layout, [E, 2I, H] / [E, H, I])."""
        expert, half = shard_id
        if param is self.w13_scale or param is self.w2_scale:
            return self._load_scale(param, loaded, expert, half)
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

    def _load_scale(self, param: nn.Parameter, loaded: torch.Tensor, expert: int, half: int | None) -> None:
        """A block checkpoint's weight_scale_inv [ceil(rows/b0), ceil(cols/b1)] of one expert's projection:
        expanded over rows, then this rank's rows (gate/up) or column blocks (down) taken."""
        local = expert - self.first_expert
        if not 0 <= local < self.local_experts:
            return
        b0, b1 = self.block
        n, rank = self.inter, (0 if self.expert_parallel else self.tp.rank)
        rows = loaded.float().repeat_interleave(b0, dim=0)
        if param is self.w13_scale:
            param.data[local, half * n:(half + 1) * n].copy_(rows.narrow(0, rank * n, n))
        else:
            h, g = param.shape[1], param.shape[2]
            param.data[local].copy_(rows[:h].narrow(1, rank * g, g))

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """--quantization fp8: 16-bit experts to e4m3 with one scale per output row; a GPU without FP8 matmul:
        dequantize a checkpoint's experts to the model dtype."""
        if self.online_fp8:
            (q13, s13), (q2, s2) = (quantize_rows(w.data) for w in (self.w13, self.w2))
            self.w13 = nn.Parameter(q13, requires_grad=False)
            self.w2 = nn.Parameter(q2, requires_grad=False)
            self.w13_scale = nn.Parameter(s13, requires_grad=False)
            self.w2_scale = nn.Parameter(s2, requires_grad=False)
            self.group_k = (self.w13.shape[-1], self.w2.shape[-1])
        elif self.block and not self.native_fp8:
            dtype = self.params_dtype
            for name, scale, g in (("w13", self.w13_scale, self.group_k[0]), ("w2", self.w2_scale, self.group_k[1])):
                w = getattr(self, name)
                deq = torch.stack([dequantize_expert(w[e], scale[e], g, dtype) for e in range(w.shape[0])])
                setattr(self, name, nn.Parameter(deq, requires_grad=False))
            self.w13_scale = self.w2_scale = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel:
            local = ids - self.first_expert
            ids = torch.where((local >= 0) & (local < self.local_experts), local, -1)
        scales = None if self.w13_scale is None else (self.w13_scale, self.w2_scale, *self.group_k)
        return fused_moe(x, self.w13, self.w2, weights, ids, has_remote=self.expert_parallel, scales=scales)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert). Parameter names follow the HF checkpoints:
    gate.weight, experts.*, shared_expert.*, shared_expert_gate.weight."""

    def __init__(self, moe: MoEConfig, hidden_size: int, tp: TPGroup, expert_parallel: bool = False,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.cfg, self.tp = moe, tp
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.experts = FusedMoE(moe.num_experts, hidden_size, moe.intermediate_size, tp, expert_parallel, quant)
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(hidden_size, moe.shared_expert_intermediate_size, tp, quant)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
            self.shared_expert_gate.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(F.linear(x, self.gate.weight), self.cfg.top_k, self.cfg.norm_topk_prob,
                             x.dtype if self.cfg.weights_in_model_dtype else None)
        out = self.tp.all_reduce(self.experts(x, weights, ids))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return out
