"""FP8 linear layers at Llama-3.1-8B shapes: bf16 F.linear vs our W8A16 Triton kernels (the GEMV at M <= 4,
and the 16-row tensor-core tile with its fixed config beside it) vs W8A8 _scaled_mm (activation quantization
included), over the token counts of decode and prefill. Picks the token count from which W8A8 wins on each
shape: what layers/quantization/fp8.py's w8a8_min_tokens follows. The LM head's shape (128256 x 4096) says
whether an FP8 head would pay at decode.

    python benchmarks/fp8_gemm_bench.py --output benchmarks/results/fp8_gemm_h200.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from radixserve.bench.roofline import record  # noqa: E402
from radixserve.kernels import fp8 as F8  # noqa: E402
from radixserve.layers.quantization.fp8 import _scaled_mm_w8a8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
TOKENS = [1, 2, 4, 8, 32, 64, 128, 256, 1024, 4096]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def time_shape(x: torch.Tensor, wb: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> tuple[float, ...]:
    ones = torch.ones(x.shape[0], 1, device=x.device)
    m, n, k = x.shape[0], q.shape[0], q.shape[1]
    w8a16 = bench(lambda: F8.w8a16_gemm(x, q, s)) if m <= 256 else float("nan")  # decode-sized only
    dot = bench(lambda: F8.w8a16_gemm(x, q, s, config=F8.w8a16_config(m, n, k))) if m <= 16 else float("nan")
    return (bench(lambda: F.linear(x, wb)), w8a16, dot,
            bench(lambda: _scaled_mm_w8a8(x, q, s, None, None)),
            bench(lambda: torch._scaled_mm(F8.to_fp8(x), q.t(), scale_a=ones, scale_b=s.reshape(1, -1),
                                           out_dtype=torch.bfloat16, use_fast_accum=True)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output", default=None)
    a = p.parse_args()
    dev = "cuda"
    rows, crossover = [], {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev)
        wb = w.to(torch.bfloat16)
        q, s = F8.quantize_rows(w)
        del w
        for m in TOKENS:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            t_bf16, t_w8a16, t_dot, t_w8a8, t_raw = time_shape(x, wb, q, s)
            wbytes = n * k
            rows.append({"layer": name, "N": n, "K": k, "M": m, "bf16_us": t_bf16 * 1e6, "w8a16_us": t_w8a16 * 1e6,
                         "w8a16_dot_fixed_us": t_dot * 1e6, "w8a8_us": t_w8a8 * 1e6, "scaled_mm_only_us": t_raw * 1e6,
                         "w8a16_weight_TBps": wbytes / t_w8a16 / 1e12, "bf16_weight_TBps": 2 * wbytes / t_bf16 / 1e12,
                         "w8a8_TFLOPs": 2 * m * n * k / t_w8a8 / 1e12})
            if name not in crossover and name != "lm_head" and t_w8a8 < t_w8a16:
                crossover[name] = m
            print(f"{name:>8} M={m:>5}: bf16 {t_bf16 * 1e6:8.1f} us  w8a16 {t_w8a16 * 1e6:8.1f} us "
                  f"({wbytes / t_w8a16 / 1e12:.2f} TB/s; dot tile {t_dot * 1e6:8.1f})  "
                  f"w8a8 {t_w8a8 * 1e6:8.1f} us (mm alone {t_raw * 1e6:8.1f})", flush=True)
        del wb, q, s
        torch.cuda.empty_cache()
    fig = {"rows": rows, "w8a8_first_faster_M": crossover,
           "w8a8_min_tokens_suggested": max(crossover.values()) if len(crossover) == len(SHAPES) - 1 else None}
    out = record(a.output, fig, dev)
    print("W8A8 first faster at M =", out["w8a8_first_faster_M"])


if __name__ == "__main__":
    main()
