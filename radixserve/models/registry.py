"""Architecture name (config.json `architectures[0]`) -> model class."""
from __future__ import annotations

from torch import nn

from radixserve.distributed.group import TPGroup
from radixserve.models.config import ModelConfig
from radixserve.models.llama import LlamaForCausalLM

# Qwen2/Qwen3/Mistral differ from Llama only by switches in ModelConfig (QKV bias, q/k norm,
# sliding window), and the MoE models by their sparse layers (ModelConfig.moe), so they share one
# implementation instead of seven copies.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
}


def build_model(cfg: ModelConfig, tp: TPGroup, ep_size: int = 1) -> nn.Module:
    """ep_size > 1 (equal to tp.size, checked by ServerArgs): MoE experts are split whole over the TP ranks
    instead of each expert being split."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {cfg.architecture} is not supported; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.architecture](cfg, tp, expert_parallel=ep_size > 1)
