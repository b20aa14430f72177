"""FP8 (e4m3) weights: quantized at load (`--quantization fp8`), or read from an HF FP8 checkpoint
(`quantization_config.quant_method == "fp8"`) with per-tensor `weight_scale` (+ `input_scale` for
static activations) or 128x128 block `weight_scale_inv`.

Every variant ends in one runtime form: `weight` [N, K] float8_e4m3fn and `weight_scale` [N, G]
float32 (see kernels/fp8.py), so one `apply` serves them all:
    CUDA, M < w8a8_min_tokens, or group scales    Triton W8A16 (weight upcast in the kernel)
    CUDA, more tokens, per-row scales             W8A8: activations quantized per token (or with the
                                                  checkpoint's static input scale), torch._scaled_mm
    CPU                                           the same choice, with the torch twins of both maths
On a GPU without FP8 support (compute capability < 8.9) checkpoints are dequantized at load.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from radixserve.kernels import fp8 as K
from radixserve.layers.quantization.base import LinearMethod, ParamLayout, QuantConfig, QuantizedActivation, make_param
from radixserve.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from radixserve.layers.linear import LinearBase

logger = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn


def w8a8_min_tokens(n: int, k: int) -> int:
    """Tokens per matmul from which W8A8 (_scaled_mm) replaces the W8A16 kernel (per-row scales). Measured on
    an H200 at the Llama-3.1-8B shapes inside CUDA graphs, eight distinct weights per graph, the activation
    quantized by the RMSNorm / SiLU kernel before it (benchmarks/fp8_gemm_graph_bench.py,
    benchmarks/results/fp8_gemm_graph_h200.json): W8A8 is faster from 8 tokens on qkv (15.3 vs 18.1 us),
    o (17.0-17.5 vs 13-23 us) and gate_up (37.4 vs 47.0 us), and from 24 on down_proj (K 14336: 38.1 vs 50.7
    us; at 16 tokens the tile wins, 31.9 vs 38.2). From 40 tokens the 16-row W8A16 tile was twice as slow
    as bf16 (gate_up 125 vs 62 us): the old switch at 64 tokens made FP8 decode slower than bf16 there.
    Matrices under 4096 x 4096 keep the weight-only kernel up to 512 tokens: launch-bound there, where
    quantizing activations costs accuracy and buys nothing."""
    if n * k < 1 << 24:
        return 512
    return 24 if k >= 8192 else 8


def fp8_supported(device: torch.device) -> bool:
    """FP8 matmul needs Ada/Hopper (sm_89+) on CUDA; on CPU the torch twins always work."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8LinearMethod(LinearMethod):
    """The shared runtime: weight [N, K] fp8, weight_scale [N, G] fp32, optional input_scale [1]."""

    def __init__(self, native: bool = True) -> None:
        self.native = native  # False: dequantize at load (GPU without FP8)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if not self.native:
            w = K.dequantize(layer.weight.data, layer.weight_scale.data, layer.params_dtype)
            for name in ("weight_scale", "input_scale"):
                if hasattr(layer, name):
                    delattr(layer, name)
            layer.weight = make_param(tuple(w.shape), w.dtype, ParamLayout(), device=w.device)
            layer.weight.data.copy_(w)
            layer.quant_method = UnquantizedLinearMethod()

    def input_quant(self, layer: LinearBase, num_tokens: int) -> torch.dtype | None:
        """FP8 when apply takes the W8A8 branch with per-token scales: the norm / SiLU kernel before it then
        writes q and scale directly (bitwise the same values; one pass over the activation fewer)."""
        if layer.weight.dtype != FP8 or getattr(layer, "input_scale", None) is not None:
            return None
        return FP8 if _uses_w8a8(layer.weight, layer.weight_scale, num_tokens, layer.params_dtype) else None

    def apply(self, layer: LinearBase, x: torch.Tensor | QuantizedActivation, bias: torch.Tensor | None
              ) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return _apply_quantized(layer.weight, layer.weight_scale, x, bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        w, s = layer.weight, layer.weight_scale
        input_scale = getattr(layer, "input_scale", None)
        use_w8a8 = _uses_w8a8(w, s, x2.shape[0], x.dtype)
        if x.is_cuda:
            if use_w8a8:
                y = _scaled_mm_w8a8(x2, w, s, input_scale, bias)
            else:
                y = torch.ops.radixserve.w8a16_linear(x2.contiguous(), w, s, bias)
        elif use_w8a8:
            y = K.w8a8_ref(x2, w, s, input_scale, bias)
        elif s.shape[1] == 1:  # per-row scales commute with the matmul: one pass over the weight, not two
            y = F.linear(x2, w.to(x.dtype)) * s.reshape(1, -1).to(x.dtype)
            y = y if bias is None else y + bias
        else:
            y = F.linear(x2, K.dequantize(w, s, x.dtype), bias)
        return y.reshape(*shape[:-1], -1)


def _uses_w8a8(w: torch.Tensor, s: torch.Tensor, num_tokens: int, act_dtype: torch.dtype) -> bool:
    """The W8A8 branch of apply (and so of input_quant): per-row scales and enough tokens; on CUDA also a
    16-bit activation and both dims multiples of 16 (_scaled_mm's constraints)."""
    if s.shape[1] != 1 or num_tokens < w8a8_min_tokens(*w.shape):
        return False
    return not w.is_cuda or (act_dtype in (torch.bfloat16, torch.float16) and not w.shape[0] % 16
                             and not w.shape[1] % 16)


def _apply_quantized(w: torch.Tensor, s: torch.Tensor, x: QuantizedActivation, bias: torch.Tensor | None
                     ) -> torch.Tensor:
    """W8A8 of an input quantized per token by its producer (input_quant): _scaled_mm on CUDA, the twin elsewhere."""
    if x.q.is_cuda:
        return torch._scaled_mm(x.q, w.t(), scale_a=x.scale, scale_b=s.reshape(1, -1), bias=bias, out_dtype=x.dtype,
                                use_fast_accum=True)
    return K.w8a8_quantized_ref(x.q, x.scale, w, s, bias, x.dtype)


def _scaled_mm_w8a8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, input_scale: torch.Tensor | None,
                    bias: torch.Tensor | None) -> torch.Tensor:
    if input_scale is None:
        xq, xs = torch.ops.radixserve.quantize_rows_fp8(x)
    else:
        xs = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
        xq = K.to_fp8(x / input_scale.to(x.dtype))
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s.reshape(1, -1), bias=bias, out_dtype=x.dtype,
                            use_fast_accum=True)


@torch.library.custom_op("radixserve::w8a16_linear", mutates_args=())
def w8a16_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The Triton kernel as an opaque op, so --enable-torch-compile graphs call it instead of tracing it."""
    if K.HAS_TRITON:
        return K.w8a16_gemm(x, w, scale, bias)
    return K.w8a16_ref(x, w, scale, bias)


@w8a16_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("radixserve::quantize_rows_fp8", mutates_args=())
def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token e4m3 quantization in one kernel (kernels.fp8.quantize_rows_fused), opaque to torch.compile."""
    return K.quantize_rows_fused(x)


@quantize_rows_fp8.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


class Fp8OnlineLinearMethod(Fp8LinearMethod):
    """`--quantization fp8` on a 16/32-bit checkpoint: load as usual, then one scale per output row."""

    description = "fp8 e4m3, per-channel scales (quantized at load)"

    def create_weights(self, layer: LinearBase, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = make_param((out_features, in_features), dtype, ParamLayout())

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scale = K.quantize_rows(layer.weight.data)
        layer.weight = make_param(tuple(q.shape), FP8, ParamLayout(), device=q.device)
        layer.weight.data.copy_(q)
        layer.weight_scale = make_param(tuple(scale.shape), torch.float32, ParamLayout(0, None), device=q.device)
        layer.weight_scale.data.copy_(scale)


def _per_tensor_expand(name: str):
    def expand(loaded: torch.Tensor, full_out: int, full_in: int) -> torch.Tensor:
        if loaded.numel() == 1:
            return loaded.reshape(1, 1).float().expand(full_out, 1)
        if loaded.numel() == full_out:  # per-channel scales (compressed-tensors "channel" strategy)
            return loaded.reshape(full_out, 1).float()
        raise ValueError(f"{name} of shape {tuple(loaded.shape)} does not fit a [{full_out}, {full_in}] weight: "
                         f"expected one value (per tensor) or {full_out} (per output channel)")
    return expand


def _scalar_expand(loaded: torch.Tensor, full_out: int, full_in: int) -> torch.Tensor:
    if loaded.numel() != 1:
        raise ValueError(f"input_scale of shape {tuple(loaded.shape)}: a static activation scale is one value")
    return loaded.reshape(1).float()


class Fp8PerTensorLinearMethod(Fp8LinearMethod):
    """HF FP8 checkpoint with one `weight_scale` per tensor. Fused projections (qkv, gate_up) keep
    each part's scale on its own rows, which is exact (no requantization to a shared scale)."""

    description = "fp8 e4m3 checkpoint, per-tensor scales"

    def __init__(self, native: bool = True, static_activations: bool = False) -> None:
        super().__init__(native)
        self.static = static_activations

    def create_weights(self, layer: LinearBase, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = make_param((out_features, in_features), FP8, ParamLayout())
        layer.weight_scale = make_param((out_features, 1), torch.float32,
                                        ParamLayout(0, None, expand=_per_tensor_expand("weight_scale")))
        if self.static:
            layer.input_scale = make_param((1,), torch.float32, ParamLayout(None, None, expand=_scalar_expand,
                                                                            reduce="max"), fill=0.0)


def _block_expand(block: tuple[int, int]):
    b0, b1 = block

    def expand(loaded: torch.Tensor, full_out: int, full_in: int) -> torch.Tensor:
        want = (-(-full_out // b0), -(-full_in // b1))
        if tuple(loaded.shape) != want:
            raise ValueError(f"weight_scale_inv of shape {tuple(loaded.shape)} does not fit a [{full_out}, {full_in}] "
                             f"weight in {b0}x{b1} blocks: expected {list(want)} (edge blocks count)")
        return loaded.float().repeat_interleave(b0, dim=0)[:full_out]
    return expand


class Fp8BlockLinearMethod(Fp8LinearMethod):
    """HF FP8 checkpoint with `weight_block_size` [b0, b1] and `weight_scale_inv` [ceil(N/b0), ceil(K/b1)].
    Stored expanded to [N, ceil(K/b1)] (see kernels/fp8.py): rows may then be split anywhere."""

    def __init__(self, block: tuple[int, int], native: bool = True) -> None:
        super().__init__(native)
        self.block = block
        self.description = f"fp8 e4m3 checkpoint, {block[0]}x{block[1]} block scales"

    def create_weights(self, layer: LinearBase, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        layer.weight = make_param((out_features, in_features), FP8, ParamLayout())
        groups = -(-in_features // self.block[1])
        layer.weight_scale_inv = make_param((out_features, groups), torch.float32,
                                            ParamLayout(0, 1, in_unit=self.block[1], expand=_block_expand(self.block)))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        layer.weight_scale = layer.weight_scale_inv  # the runtime name; one tensor
        del layer.weight_scale_inv
        super().process_weights_after_loading(layer)


class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(self, checkpoint: dict[str, Any] | None = None, native: bool = True) -> None:
        """checkpoint: the HF `quantization_config` of a pre-quantized model, or None for `--quantization fp8`
        on a 16/32-bit one."""
        self.checkpoint, self.native = checkpoint, native
        self.block: tuple[int, int] | None = None
        self.static = False
        if checkpoint is not None:
            if checkpoint.get("fmt", "e4m3") != "e4m3":
                raise ValueError(f"FP8 checkpoint format {checkpoint.get('fmt')!r}: only e4m3 weights are supported")
            scheme = checkpoint.get("activation_scheme", "dynamic")
            if scheme not in ("dynamic", "static"):
                raise ValueError(f"FP8 checkpoint activation_scheme {scheme!r}: expected dynamic or static")
            self.static = scheme == "static"
            block = checkpoint.get("weight_block_size")
            if block is not None:
                if len(block) != 2 or min(block) < 1:
                    raise ValueError(f"FP8 checkpoint weight_block_size {block!r}: expected [rows, cols]")
                self.block = (int(block[0]), int(block[1]))
                if self.static:
                    raise ValueError("FP8 checkpoint with block scales and a static activation scheme: not supported")

    def linear_method(self) -> LinearMethod:
        if self.checkpoint is None:
            return Fp8OnlineLinearMethod(self.native)
        if self.block is not None:
            return Fp8BlockLinearMethod(self.block, self.native)
        return Fp8PerTensorLinearMethod(self.native, self.static)

    def lm_head_method(self, tied: bool) -> LinearMethod | None:
        """`--quantization fp8` also quantizes an untied LM head: at decode it is an eighth of an 8B model's
        bytes, and the FP8 GEMV reads it in 147 us against bf16's 257 (128256 x 4096 on an H200,
        benchmarks/results/fp8_gemm_h200_gemv.json). A tied head stays in the model dtype (its table is also
        the embedding the first layer gathers from), and so does a checkpoint's, which ships it unquantized."""
        if tied or self.checkpoint is not None:
            return None
        return Fp8OnlineLinearMethod(self.native)

    def describe(self) -> str:
        d = self.linear_method().description
        return d if self.native else d + ", dequantized at load (no FP8 matmul on this GPU)"
