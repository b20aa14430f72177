"""Architecture name (config.json `architectures[0]`) -> model class."""
from __future__ import annotations

from torch import nn

from radixserve.distributed.group import TPGroup
from radixserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from radixserve.models.llama import LlamaForCausalLM

# one implementation with switches for every supported architecture (models/config.py says why)
ARCHITECTURES: dict[str, type[nn.Module]] = dict.fromkeys(SUPPORTED_ARCHITECTURES, LlamaForCausalLM)


def build_model(cfg: ModelConfig, tp: TPGroup, ep_size: int = 1) -> nn.Module:
    """ep_size > 1 (equal to tp.size, checked by ServerArgs): MoE experts are split whole over the TP ranks
    instead of each expert being split."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {cfg.architecture} is not supported; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.architecture](cfg, tp, expert_parallel=ep_size > 1)
