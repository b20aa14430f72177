"""Weight quantization behind one interface (base.LinearMethod) that the linear layers call.

`resolve_quant_config` picks the scheme for a model: the checkpoint's own `quantization_config`
(pre-quantized models load with no flag) or `--quantization`. A new scheme (int4 AWQ/GPTQ) is one
module with a QuantConfig subclass, registered in QUANT_CONFIGS.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from radixserve.layers.quantization.base import LinearMethod, QuantConfig
from radixserve.layers.quantization.cpu_fp16 import CpuFp16Config, cpu_fp16_available, model_weight_bytes
from radixserve.layers.quantization.cpu_int4 import CpuInt4Config, cpu_int4_available
from radixserve.layers.quantization.fp8 import Fp8Config, fp8_supported

logger = logging.getLogger(__name__)

# --quantization / quant_method name -> config class(checkpoint dict or None, native: bool)
QUANT_CONFIGS: dict[str, type[QuantConfig]] = {"fp8": Fp8Config}
QUANTIZATION_CHOICES = sorted(QUANT_CONFIGS)


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def cpu_weight_config(cpu_weight_dtype: str, device: torch.device, dtype: torch.dtype) -> QuantConfig | None:
    """--cpu-weight-dtype: for a float32 model on an x86 CPU, packed float16 weights (cpu_fp16.py says why),
    and with int4 (auto's choice) a GGUF's 4-bit matrices also kept at 4 bits for decoding (cpu_int4.py);
    or None (weights stay in the model dtype). Logs what was chosen and why. Traced forwards
    (torch.compile) keep it: they call the packed GEMM as an opaque op (cpu_fp16.py)."""
    if device.type != "cpu" or cpu_weight_dtype == "float32":
        return None
    if cpu_weight_dtype in ("float16", "int4"):
        if not cpu_fp16_available():
            raise ValueError(f"--cpu-weight-dtype {cpu_weight_dtype} needs torch with FBGEMM (an x86 build); this "
                             f"torch has {torch.backends.quantized.supported_engines}: use --cpu-weight-dtype float32")
        if dtype != torch.float32:
            raise ValueError(f"--cpu-weight-dtype {cpu_weight_dtype} runs float32 activations; the model dtype is "
                             f"{dtype}: pass --dtype float32 (or leave it out on CPU)")
        if cpu_weight_dtype == "int4" and not cpu_int4_available():
            raise ValueError("--cpu-weight-dtype int4 needs torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu, "
                             "torch >= 2.6): use --cpu-weight-dtype float16")
        logger.info("CPU linear layers: --cpu-weight-dtype %s", cpu_weight_dtype)
        return CpuInt4Config() if cpu_weight_dtype == "int4" else CpuFp16Config()
    if dtype != torch.float32 or not cpu_fp16_available():
        return None
    if cpu_int4_available():
        logger.info("CPU linear layers (--cpu-weight-dtype auto): a checkpoint's 4-bit GGUF matrices stay 4-bit "
                    "for decoding (int4 kernel, bfloat16 matmul inputs), the rest float16 packed for FBGEMM: this "
                    "%s CPU is bound by the weight bytes a decode step streams; --cpu-weight-dtype float32 for "
                    "exact float32", torch.backends.cpu.get_cpu_capability())
        return CpuInt4Config()
    logger.info("CPU linear layers: float16 weights packed for FBGEMM, float32 activations (--cpu-weight-dtype "
                "auto: this %s CPU streams half the bytes per decode step, ~3x faster than float32 GEMV; "
                "--cpu-weight-dtype float32 for exact float32)", torch.backends.cpu.get_cpu_capability())
    return CpuFp16Config()


def resolve_quant_config(flag: str | None, hf_config: Any, device: torch.device,
                         use_checkpoint: bool = True, cpu_weight_dtype: str = "float32",
                         dtype: torch.dtype = torch.float32, traced: bool = False) -> QuantConfig | None:
    """The scheme for this model on this device, or None (unquantized). use_checkpoint False (dummy
    weights): the checkpoint's own quantization_config is ignored, random weights are 16/32-bit. With no
    flag and no checkpoint scheme, a CPU may still pack its weights (`cpu_weight_config`)."""
    ckpt = checkpoint_quant_config(hf_config) if use_checkpoint else None
    method = ckpt.get("quant_method") if ckpt else None
    if flag is not None and flag not in QUANT_CONFIGS:
        raise ValueError(f"--quantization {flag!r}: choose one of {', '.join(QUANTIZATION_CHOICES)}")
    if method is not None:
        if method not in QUANT_CONFIGS:
            raise ValueError(f"checkpoint quantization_config.quant_method {method!r} is not supported; "
                             f"radixserve loads {', '.join(QUANTIZATION_CHOICES)} checkpoints")
        if flag is not None and flag != method:
            raise ValueError(f"--quantization {flag} but the checkpoint is quantized with {method}; drop the flag")
        native = fp8_supported(device)
        if not native:
            logger.warning("this GPU has no FP8 matmul (compute capability < 8.9): the %s checkpoint is "
                           "dequantized to the model dtype at load (no memory saving)", method)
        return QUANT_CONFIGS[method](ckpt, native=native)
    if flag is None:
        return cpu_weight_config(cpu_weight_dtype, device, dtype)
    if not fp8_supported(device):
        raise ValueError(f"--quantization {flag} needs FP8 matmul: a GPU of compute capability >= 8.9 (Ada, "
                         f"Hopper) or --device cpu; drop the flag on this GPU")
    return QUANT_CONFIGS[flag](None, native=True)


@torch.no_grad()
def process_weights_after_loading(model: nn.Module) -> None:
    """Let every quantized layer turn its loaded tensors into their runtime form."""
    layers = [(m.quant_method, m) for m in model.modules()
              if isinstance(getattr(m, "quant_method", None), LinearMethod)]
    pooled = [(meth, m) for meth, m in layers if meth.parallel_processing]
    for meth, m in layers:
        if not meth.parallel_processing:
            meth.process_weights_after_loading(m)
    if pooled:  # torch ops release the GIL: packing 135M weights takes 1.2 s on two threads instead of 1.8
        with ThreadPoolExecutor(max(torch.get_num_threads(), 1)) as pool:
            list(pool.map(lambda job: job[0].process_weights_after_loading(job[1]), pooled))


__all__ = ["QUANTIZATION_CHOICES", "QUANT_CONFIGS", "LinearMethod", "QuantConfig", "checkpoint_quant_config",
           "cpu_weight_config", "model_weight_bytes", "process_weights_after_loading", "resolve_quant_config"]
