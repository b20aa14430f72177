"""Llama decoder; Qwen2 (QKV bias), Qwen3 (q/k norm) and Mistral (sliding window) are the same
network with those switches, read from ModelConfig. So are the MoE models (Qwen3-MoE, Qwen2-MoE,
Mixtral): their sparse layers put layers/moe.py's SparseMoeBlock where the dense MLP was."""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from radixserve.distributed.group import TPGroup
from radixserve.forward_batch import ForwardBatch
from radixserve.layers.attention import Attention
from radixserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.layers.linear import QKVParallelLinear, RowParallelLinear, default_weight_loader
from radixserve.layers.mlp import DenseMLP
from radixserve.layers.moe import FusedMoE, SparseMoeBlock
from radixserve.layers.norm import RMSNorm
from radixserve.layers.rotary import RotaryEmbedding
from radixserve.models.config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPGroup, rotary: RotaryEmbedding) -> None:
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads,
                                          cfg.attention_bias, tp, cfg.quant)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, False, tp, cfg.quant)
        self.q_size, self.kv_size = self.qkv_proj.heads * d, self.qkv_proj.kv_heads * d
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = Attention(layer_id, self.qkv_proj.heads, self.qkv_proj.kv_heads, d, rotary, cfg.sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, fb: ForwardBatch | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            d = self.attn.head_dim
            q = self.q_norm(q.reshape(-1, self.attn.num_heads, d))
            k = self.k_norm(k.reshape(-1, self.attn.num_kv_heads, d))
        return self.o_proj(self.attn(positions, q, k, v, fb))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPGroup, rotary: RotaryEmbedding,
                 expert_parallel: bool = False) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_id, tp, rotary)
        self.mlp = (SparseMoeBlock(cfg.moe, cfg.hidden_size, tp, expert_parallel, cfg.quant)
                    if cfg.is_moe_layer(layer_id) else DenseMLP(cfg.hidden_size, cfg.intermediate_size, tp, cfg.quant))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                fb: ForwardBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        # quant: an FP8 dtype when the next matmul quantizes its input per token (W8A8): the norm does it
        quant = self.self_attn.qkv_proj.input_quant(x.shape[0])
        if residual is None:
            x, residual = self.input_layernorm(x, quant=quant), x
        else:
            x, residual = self.input_layernorm(x, residual, quant=quant)
        x = self.self_attn(positions, x, fb)
        quant = self.mlp.input_quant(x.shape[0]) if isinstance(self.mlp, DenseMLP) else None
        x, residual = self.post_attention_layernorm(x, residual, quant=quant)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, expert_parallel: bool = False) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, tp, rotary, expert_parallel)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch | None) -> torch.Tensor:
        """Final hidden states of every new token. fb None: traced by torch.compile (see layers/attention)."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, fb)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # (our parameter, checkpoint name, shard id) for fused projections
    stacked_params = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]

    def __init__(self, cfg: ModelConfig, tp: TPGroup, expert_parallel: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg, tp, expert_parallel)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, cfg.quant, cfg.tie_word_embeddings)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits (float32) at each request's last new token: [B, vocab]."""
        return self.logits(self.model(fb.input_ids, fb.positions, fb)[fb.logits_idx])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF checkpoint tensor names and their full (unsharded) shapes: what dummy weights are generated
        from, so that they are the same model whatever the TP size."""
        c, d = self.cfg, self.cfg.head_dim
        h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * d, c.num_kv_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h),
                                              "model.norm.weight": (h,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, h)
        for n in range(c.num_layers):
            p = f"model.layers.{n}."
            shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                           p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                           p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
            shapes.update(self._moe_shapes(p) if c.is_moe_layer(n) else
                          {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                           p + "mlp.down_proj.weight": (h, i)})
            if c.attention_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if c.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        return shapes

    def _moe_shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        """A sparse layer's checkpoint tensors: router, per-expert projections (Mixtral's w1/w3/w2 under
        block_sparse_moe, Qwen's gate/up/down_proj under mlp), Qwen2-MoE's shared expert and its gate."""
        m, h = self.cfg.moe, self.cfg.hidden_size
        mixtral = self.cfg.architecture == "MixtralForCausalLM"
        p += "block_sparse_moe." if mixtral else "mlp."
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        i = m.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {p + "gate.weight": (m.num_experts, h)}
        for e in range(m.num_experts):
            shapes.update({f"{p}experts.{e}.{names[0]}.weight": (i, h), f"{p}experts.{e}.{names[1]}.weight": (i, h),
                           f"{p}experts.{e}.{names[2]}.weight": (h, i)})
        if m.shared_expert_intermediate_size:
            s = m.shared_expert_intermediate_size
            shapes.update({p + "shared_expert.gate_proj.weight": (s, h), p + "shared_expert.up_proj.weight": (s, h),
                           p + "shared_expert.down_proj.weight": (h, s), p + "shared_expert_gate.weight": (1, h)})
        return shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint tensors by HF name; every parameter must be covered exactly once."""
        params = dict(self.named_parameters())
        missing = set(params)
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            name, shard = _expert_param(name.replace(".block_sparse_moe.", ".mlp."))
            for ours, theirs, shard_id in self.stacked_params if shard is None else ():
                if f".{theirs}." in name:
                    name, shard = name.replace(theirs, ours), shard_id
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in {self.cfg.architecture}")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor.to(param.dtype), shard)
            missing.discard(name)
        if self.cfg.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks tensors for: {sorted(missing)[:5]} ...")
        for module in self.modules():  # FP8 experts: quantize (--quantization fp8) or dequantize (no FP8 GPU)
            if isinstance(module, FusedMoE):
                module.process_weights_after_loading()


# One expert's projection (Qwen: gate/up/down_proj, Mixtral: w1/w3/w2), or HF's fused [E, ...] tensors.
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.(weight|weight_scale_inv)")
_EXPERT_PART = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1), "w3": ("w13", 1),
                "down_proj": ("w2", None), "w2": ("w2", None)}


def _expert_param(name: str) -> tuple[str, object]:
    """(our parameter name, shard id for FusedMoE.weight_loader), or (name, None) for a non-expert tensor."""
    m = _EXPERT.fullmatch(name)
    if m:
        ours, half = _EXPERT_PART[m.group(3)]
        return f"{m.group(1)}.{ours}{'_scale' if m.group(4) != 'weight' else ''}", (int(m.group(2)), half)
    for fused, ours in ((".mlp.experts.gate_up_proj", "w13"), (".mlp.experts.down_proj", "w2")):
        if name.endswith(fused):
            return name[: -len(fused)] + ".mlp.experts." + ours, (None, None)
    return name, None
