"""`--mem-fraction-static auto`: the share of device memory for weights + KV cache, picked at start-up.

The tuning guide's rule is to leave 5-8 GB of the GPU free for activations and CUDA graph buffers
(`available_gpu_mem` in the memory line): less risks OOM, more wastes KV cache. `auto` aims at the middle,
GUIDE_RESERVE_GB = 6.5 GB, unless the model's own activation peak needs more: that peak is estimated from
the model's shapes (not measured by a trial forward) as the temporaries of one prefill step of
--chunked-prefill-size tokens (residual, normed and attention-output hidden states, q/k/v, the MLP's gate,
up and activation) plus the float32 logits and sampler scratch of the largest decode batch, times
ACTIVATION_MARGIN for allocator fragmentation and CUDA graph pools. So

    fraction = (total - max(6.5 GB, 1.5 x estimated peak)) / total

and the doctor, reading the resulting memory line, finds available_gpu_mem in the guide's 5-8 GB band.
On CPU there are no CUDA graphs and activations come from the same RAM as everything else on the host,
so `auto` keeps the CPU default (the pool for a few full-context requests within a small share of RAM)."""
from __future__ import annotations

import logging

from radixserve.models.config import ModelConfig

logger = logging.getLogger(__name__)
GB = 1 << 30
GUIDE_RESERVE_GB = 6.5
ACTIVATION_MARGIN = 1.5
LOGITS_COPIES = 3  # logits, probabilities, the sampler's filtered copy (float32 each)


def activation_peak_bytes(cfg: ModelConfig, chunk_tokens: int, max_decode_bs: int, dtype_bytes: int,
                          tp: int = 1) -> int:
    """Estimated peak of one forward's temporaries on one rank (layers run one after another, so one
    layer's live set plus the logits)."""
    q, kv = cfg.num_heads * cfg.head_dim // tp, max(cfg.num_kv_heads // tp, 1) * cfg.head_dim
    inter = (cfg.moe.intermediate_size * cfg.moe.top_k if cfg.moe else cfg.intermediate_size) // tp
    per_token = (3 * cfg.hidden_size + q + 2 * kv + 3 * inter) * dtype_bytes
    logits = max_decode_bs * cfg.vocab_size * 4 * LOGITS_COPIES
    return chunk_tokens * per_token + logits


def auto_fraction(total_bytes: int, peak_bytes: int) -> float:
    reserve = max(GUIDE_RESERVE_GB * GB, ACTIVATION_MARGIN * peak_bytes)
    fraction = (total_bytes - reserve) / total_bytes
    if fraction <= 0:
        raise ValueError(f"--mem-fraction-static auto: the device has {total_bytes / GB:.1f} GB but activations "
                         f"need {reserve / GB:.1f} GB; set --mem-fraction-static or --max-total-tokens by hand")
    logger.info(f"mem_fraction_static auto: {fraction:.3f} (total {total_bytes / GB:.2f} GB, leaves "
                f"{reserve / GB:.2f} GB = max(guide {GUIDE_RESERVE_GB} GB, {ACTIVATION_MARGIN} x estimated "
                f"activation peak {peak_bytes / GB:.2f} GB) free after weights + KV cache)")
    return fraction
