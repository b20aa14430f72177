"""HF FP8 checkpoints (`quantization_config.quant_method == "fp8"`): checked before loading, and their
KV-cache scales taken out of the tensor stream.

The checks read only the safetensors headers (names, shapes, dtypes), so a scale that does not fit
its weight fails at once, naming both tensors, instead of as a shape error deep in a weight loader
after minutes of reading. The KV scales (`self_attn.k_scale` / `v_scale`, or compressed-tensors'
`k_proj.output_scale` / `v_proj.output_scale`) belong to the KV pool, not to a layer, so they are
collected here and handed to the pool.
"""
from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Iterator

import torch

FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E5M2")
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:attn\.|(?:k|v)_proj\.)?(k|v)_scale$"
                       r"|model\.layers\.(\d+)\.self_attn\.(k|v)_proj\.output_scale$")


def header_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string) of every tensor in the checkpoint, headers only."""
    from safetensors import safe_open
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (tuple(s.get_shape()), s.get_dtype())
    return out


def check_fp8_checkpoint(tensors: dict[str, tuple[tuple[int, ...], str]], block: tuple[int, int] | None) -> None:
    """Every FP8 weight has a scale of the right shape; every scale has a weight. Raises ValueError naming
    the tensor and the shape it should have."""
    for name, (shape, dtype) in tensors.items():
        if name.endswith(".weight") and dtype in FP8_HEADER_DTYPES:
            scale = name + ("_scale_inv" if block else "_scale")
            if scale not in tensors:
                raise ValueError(f"FP8 weight {name} has no {scale.rsplit('.', 1)[1]} tensor in the checkpoint "
                                 f"(quantization_config says {'block' if block else 'per-tensor'} scales)")
        for suffix in (".weight_scale_inv", ".weight_scale", ".input_scale"):
            if not name.endswith(suffix):
                continue
            weight = name[: -len(suffix)] + ".weight"
            if weight not in tensors:
                raise ValueError(f"checkpoint tensor {name} has no weight {weight}")
            (o, i), n = tensors[weight][0], _numel(shape)
            if suffix == ".weight_scale_inv":
                if block is None:
                    raise ValueError(f"checkpoint tensor {name}: block scales, but quantization_config has no "
                                     f"weight_block_size")
                want = (-(-o // block[0]), -(-i // block[1]))
                if tuple(shape) != want:
                    raise ValueError(f"{name} has shape {list(shape)}, which does not fit {weight} [{o}, {i}] "
                                     f"in {block[0]}x{block[1]} blocks: expected {list(want)}")
            elif suffix == ".weight_scale" and n not in (1, o):
                raise ValueError(f"{name} has shape {list(shape)}, which does not fit {weight} [{o}, {i}]: expected "
                                 f"one value (per tensor) or {o} (per output channel)")
            elif suffix == ".input_scale" and n != 1:
                raise ValueError(f"{name} has shape {list(shape)}: a static activation scale is one value")
        if _KV_SCALE.fullmatch(name) and _numel(shape) != 1:
            raise ValueError(f"{name} has shape {list(shape)}: a KV-cache scale is one value per layer")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def split_kv_scales(weights: Iterable[tuple[str, torch.Tensor]], scales: dict[int, tuple[float, float]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass every tensor on but the KV-cache scales, which go into `scales[layer] = (k_scale, v_scale)`."""
    for name, tensor in weights:
        m = _KV_SCALE.fullmatch(name)
        if m is None:
            yield name, tensor
            continue
        layer, which = int(m.group(1) or m.group(3)), m.group(2) or m.group(4)
        k, v = scales.get(layer, (1.0, 1.0))
        value = float(tensor.float().reshape(-1)[0])
        scales[layer] = (value, v) if which == "k" else (k, value)
