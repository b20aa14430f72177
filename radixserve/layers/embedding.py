"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.distributed.group import TPGroup
from radixserve.layers.quantization.base import LinearMethod, QuantConfig


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.per_rank = (vocab_size + tp.size - 1) // tp.size
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        part = loaded[self.start:self.start + self.per_rank]
        param.data[: part.shape[0]].copy_(part)
        param.data[part.shape[0]:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(mask, 0), self.weight).masked_fill(mask[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary: local slice, all-gathered, padding cut off. A quantization scheme
    may give the head its own method (`QuantConfig.lm_head_method`: packed fp16 on CPU); by default it
    multiplies with the parameter as it is."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, quant: QuantConfig | None = None,
                 tied: bool = False) -> None:
        super().__init__(vocab_size, hidden, tp)
        self.quant_method: LinearMethod | None = quant.lm_head_method(tied) if quant else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = (F.linear(hidden, self.weight) if self.quant_method is None
                 else self.quant_method.apply(self, hidden, None))
        return self.tp.all_gather_last_dim(local)[..., : self.vocab_size]
