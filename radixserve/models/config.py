"""ModelConfig: the architecture facts the engine needs, read once from a HF config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


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
    hf_config: Any = None

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        archs = getattr(hf, "architectures", None)  # configs rebuilt from GGUF carry only model_type
        arch = archs[0] if archs else MODEL_TYPES.get(hf.model_type, "LlamaForCausalLM")
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
            attention_bias=bool(getattr(hf, "attention_bias", False)) or arch.startswith("Qwen2"),
            qk_norm=arch.startswith("Qwen3"),
            sliding_window=window if arch.startswith("Mistral") else None,
            eos_token_ids=eos,
            bos_token_id=getattr(hf, "bos_token_id", None),
            hf_config=hf,
        )

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once more when untied): for roofline maths."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h
