"""Block configurations for the fused-MoE kernel (radixserve/kernels/moe.py, MOE_CONFIGS), timed on this GPU.

    python benchmarks/moe_tune.py [--experts 128 --top-k 8 --hidden 2048 --inter 768] [--output tune.json]

For each token count T, every candidate config runs the whole fused_moe (align, gate_up, down, top-k sum)
inside a CUDA graph (triton.testing.do_bench_cudagraph, median), after its output has been checked against the
fp32 torch twin (bf16 tolerance 2e-2 of max |ref|). Figures against the limits measured in the same process:
small T is memory-bound (bytes: the distinct experts' weights + activations / copy bandwidth), large T compute-
bound (FLOPs: 6 * T * k * H * I / bf16 matmul rate). The defaults are Qwen3-30B-A3B's expert shapes.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.runtime.errors
import triton.testing

from radixserve.bench.roofline import limits, record
from radixserve.kernels.moe import MOE_CONFIGS, fused_moe_ref, fused_moe_triton
from radixserve.layers.moe import route


def cfg(sorted_: bool, bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    return dict(SORTED=sorted_, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


DECODE = [cfg(False, 16, 64, 128, 4, 4), cfg(False, 16, 32, 128, 4, 4), cfg(False, 16, 64, 256, 4, 3),
          cfg(False, 16, 128, 128, 4, 4), cfg(True, 16, 64, 128, 4, 4)]
SMALL = [cfg(True, 16, 64, 128, 4, 4), cfg(True, 16, 32, 128, 4, 4), cfg(True, 16, 64, 256, 4, 3),
         cfg(True, 16, 128, 64, 4, 4), cfg(True, 32, 64, 64, 4, 4), cfg(False, 16, 64, 128, 4, 4)]
MID = [cfg(True, 32, 64, 64, 4, 4), cfg(True, 64, 64, 64, 4, 4), cfg(True, 32, 128, 64, 4, 3),
       cfg(True, 64, 128, 64, 4, 3), cfg(True, 16, 64, 128, 4, 4)]
LARGE = [cfg(True, 64, 128, 64, 4, 3), cfg(True, 64, 128, 64, 8, 4), cfg(True, 128, 128, 64, 8, 3),
         cfg(True, 128, 128, 128, 8, 3), cfg(True, 64, 256, 64, 8, 3), cfg(True, 128, 256, 64, 8, 3)]
PLAN = [(1, DECODE), (2, DECODE), (4, DECODE), (8, SMALL), (16, SMALL), (32, SMALL), (64, MID), (256, MID),
        (1024, LARGE), (4096, LARGE), (16384, LARGE)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--budget-s", type=float, default=150.0, help="Stop starting new token counts after this.")
    p.add_argument("--output", default=None)
    a = p.parse_args()
    E, k, H, inter = a.experts, a.top_k, a.hidden, a.inter
    lim = limits("cuda")
    bw, rate = lim["copy_bandwidth_GBps"] * 1e9, lim["matmul_TFLOPs"] * 1e12
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, inter, device="cuda", generator=g) / inter ** 0.5).bfloat16()
    t0, rows, best = time.time(), [], {}
    for T, cands in PLAN:
        if time.time() - t0 > a.budget_s:
            print(f"budget spent: stopping before T={T}")
            break
        x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
        w, ids = route(torch.randn(T, E, device="cuda", generator=g), k, True, torch.bfloat16)
        ref = fused_moe_ref(x.float(), w13.float(), w2.float(), w.float(), ids) if T <= 4096 else None
        touched = int(torch.unique(ids).numel())
        nbytes = touched * 3 * H * inter * 2 + T * H * 2 * 2
        flops = 6 * T * k * H * inter
        floor = max(nbytes / bw, flops / rate)
        table = next(c for bound, c in MOE_CONFIGS if T <= bound)
        for c in cands + ([table] if table not in cands else []):
            try:
                out = fused_moe_triton(x, w13, w2, w, ids, config=c)
            except triton.runtime.errors.OutOfResources as e:  # too much shared memory for this GPU
                print(f"T={T}: skip {c}: {e}")
                continue
            err = float((out.float() - ref).abs().max() / ref.abs().max()) if ref is not None else float("nan")
            ok = ref is None or err < 2e-2
            fn = lambda c=c, x=x, w=w, ids=ids: fused_moe_triton(x, w13, w2, w, ids, config=c)
            ms = triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") if ok else float("nan")
            row = {"T": T, "config": c, "in_table": c == table, "ms": ms, "err": err, "ok": ok,
                   "GBps": nbytes / ms / 1e6, "TFLOPs": flops / ms / 1e9, "floor_fraction": floor / (ms / 1e3)}
            rows.append(row)
            if ok and (T not in best or ms < best[T]["ms"]):
                best[T] = row
        b = best[T]
        print(f"T={T:>6} experts touched {touched:>3}: best {b['ms'] * 1e3:8.1f} us  {b['GBps']:7.0f} GB/s "
              f"{b['TFLOPs']:6.1f} TFLOP/s  {b['floor_fraction']:.1%} of floor  {b['config']}", flush=True)
    fig = {"shape": {"experts": E, "top_k": k, "hidden": H, "inter": inter, "dtype": "bfloat16"}, **lim,
           "best": {str(t): r for t, r in best.items()}, "all": rows}
    record(a.output, fig, "cuda")
    print("\nT | best us | GB/s | TFLOP/s | of floor | table config us")
    for t, r in best.items():
        tab = next((x for x in rows if x["T"] == t and x["in_table"]), None)
        print(f"{t} | {r['ms'] * 1e3:.1f} | {r['GBps']:.0f} | {r['TFLOPs']:.1f} | {r['floor_fraction']:.1%} | "
              f"{tab['ms'] * 1e3 if tab else float('nan'):.1f} | {r['config']}")


if __name__ == "__main__":
    main()
