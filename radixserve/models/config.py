"""ModelConfig: the architecture facts the engine needs, read once from a HF config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from radixserve.args import ServerArgs

#: config.json `architectures[0]` values radixserve serves. Qwen2/Qwen3/Mistral differ from Llama only by
#: switches in ModelConfig (QKV bias, q/k norm, sliding window), and the MoE models by their sparse layers
#: (ModelConfig.moe), so models/registry.py maps them all to one implementation. Kept here, apart from the
#: model classes, so that checking a model's config imports no torch (the launcher does it before spawning).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta, scaling fields
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    moe: MoEConfig | None = None  # mixture-of-experts models only
    hf_config: Any = None
    quant: Any = None  # layers.quantization.QuantConfig for the decoder's linear layers; None: unquantized

    @staticmethod
    def architecture_of(hf: Any) -> str:
        archs = getattr(hf, "architectures", None)  # configs rebuilt from GGUF carry only model_type
        return archs[0] if archs else MODEL_TYPES.get(hf.model_type, "LlamaForCausalLM")

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        arch = cls.architecture_of(hf)
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        eos = getattr(hf, "eos_token_id", None)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        heads = hf.num_attention_heads
        window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
        return cls(
            architecture=arch,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
            rope=rope,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False))
            or (arch.startswith("Qwen2") and bool(getattr(hf, "qkv_bias", True))),
            qk_norm=arch.startswith("Qwen3"),
            sliding_window=window if arch.startswith(("Mistral", "Mixtral")) else None,
            eos_token_ids=eos,
            bos_token_id=getattr(hf, "bos_token_id", None),
            moe=MoEConfig.from_hf(hf, arch),
            hf_config=hf,
        )

    def is_moe_layer(self, layer_id: int) -> bool:
        """HF's rule (Qwen2-MoE, Qwen3-MoE): a layer is sparse unless listed in mlp_only_layers, every
        decoder_sparse_step-th layer counting from 1; Mixtral's layers are all sparse."""
        m = self.moe
        return m is not None and layer_id not in m.mlp_only_layers and (layer_id + 1) % m.decoder_sparse_step == 0

    def num_params(self, active: bool = False) -> int:
        """Parameter count (embedding counted once more when untied): for roofline maths. active: only the
        experts one token uses (top-k of each sparse layer, plus the shared expert and its gate)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2) + 2 * h  # + the two norms
        attn += (self.num_heads + 2 * self.num_kv_heads) * d if self.attention_bias else 0
        attn += 2 * d if self.qk_norm else 0
        total = 0
        for n in range(self.num_layers):
            if self.is_moe_layer(n):
                m = self.moe
                experts = m.top_k if active else m.num_experts
                total += attn + m.num_experts * h + experts * 3 * h * m.intermediate_size
                if m.shared_expert_intermediate_size:
                    total += 3 * h * m.shared_expert_intermediate_size + h
            else:
                total += attn + 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total + emb + h


@dataclass(frozen=True)
class MoEConfig:
    """The sparse block of an MoE architecture, in HF's terms: `num_experts` experts of width
    `intermediate_size`, `top_k` of them per token, their softmax weights renormalised to sum to 1 when
    `norm_topk_prob` (Mixtral always does), an always-on shared expert behind a sigmoid gate (Qwen2-MoE),
    and which layers are sparse (`decoder_sparse_step`, `mlp_only_layers`; the others keep a dense MLP
    of the model's intermediate_size)."""
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    weights_in_model_dtype: bool = True  # Qwen rounds the routing weights to the model dtype; Mixtral keeps fp32

    @classmethod
    def from_hf(cls, hf: Any, arch: str) -> MoEConfig | None:
        if arch == "MixtralForCausalLM":
            return cls(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                       intermediate_size=hf.intermediate_size, norm_topk_prob=True, weights_in_model_dtype=False)
        if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM") or not getattr(hf, "num_experts", 0):
            return None
        return cls(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                   intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                   shared_expert_intermediate_size=getattr(hf, "shared_expert_intermediate_size", 0) or 0,
                   decoder_sparse_step=getattr(hf, "decoder_sparse_step", 1) or 1,
                   mlp_only_layers=tuple(getattr(hf, "mlp_only_layers", None) or ()))


def context_length(args: ServerArgs, cfg: ModelConfig) -> int:
    """--context-length, which may not exceed what the model was trained for unless asked explicitly."""
    limit = cfg.max_position_embeddings
    if args.context_length is None:
        return limit
    if args.context_length < 1:
        raise ValueError(f"--context-length must be >= 1, got {args.context_length}")
    if args.context_length > limit and not args.allow_overwrite_longer_context_len:
        raise ValueError(f"--context-length {args.context_length} is above the model's maximum "
                         f"(max_position_embeddings = {limit}); lower it, or pass "
                         f"--allow-overwrite-longer-context-len to accept possibly degraded output past it")
    return args.context_length
