"""Decode-attention launch sweep on the GPU at hand, bf16 and FP8 pools: what kernels.attention.decode_config
and decode_num_splits follow.

    python benchmarks/decode_attn_sweep.py --output benchmarks/results/decode_attn_sweep_h200.json

Shapes: Llama-3.1-8B heads (32 q / 8 KV / D 128). Each case is a batch whose sequence lengths are drawn
uniformly from [lo, hi] (seeded), slots allocated contiguously per request as the pool's allocator hands
them out on a fresh server; the offline minisgl decode batch is the (256, 300-1500) case. Times are
triton.testing.do_bench medians; `pct_of_copy_bw` is the bytes that must move (K and V of every token,
its slot index) over the copy bandwidth measured in the same process.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixserve.bench.roofline import copy_bandwidth, device_name, git_commit  # noqa: E402
from radixserve.kernels import attention as KA  # noqa: E402

H, KVH, D = 32, 8, 128
CASES = [(1, 128, 128), (1, 4096, 4096), (64, 300, 1500), (256, 300, 1500)]


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    ap.add_argument("--large-batch", action="store_true",
                    help="only the batch 64 / 256 cases, 128-token tiles, 1-4 warps, 2-4 stages at the default splits (256-token tiles lost at 1b975be)")
    a = ap.parse_args()
    cases = [c for c in CASES if c[0] >= 64] if a.large_batch else CASES
    space = ((128,), (1, 2, 4), (2, 3, 4), (1,)) if a.large_batch else ((64, 128), (4, 8), (2, 3), (1, 2, 4))
    bw = copy_bandwidth("cuda")
    out = {"device": device_name("cuda"), "commit": git_commit(), "command": " ".join(sys.argv),
           "copy_bandwidth_GBps": bw / 1e9, "cases": []}
    rng = random.Random(0)
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for B, lo, hi in cases:
            lens = [rng.randint(lo, hi) for _ in range(B)]
            n = sum(lens)
            k = torch.randn(n + 1, KVH, D, device="cuda").to(kv_dtype)
            v = torch.randn(n + 1, KVH, D, device="cuda").to(kv_dtype)
            r2t = torch.zeros(B, max(lens), dtype=torch.int64, device="cuda")
            off = 1
            for b, s in enumerate(lens):
                r2t[b, :s] = torch.arange(off, off + s, device="cuda")
                off += s
            seq = torch.tensor(lens, device="cuda")
            rows = torch.arange(B, device="cuda")
            q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
            mid_o = torch.empty(B * H * KA.MAX_DECODE_SPLITS * D, device="cuda")
            mid_lse = torch.empty(B * H * KA.MAX_DECODE_SPLITS, device="cuda")
            nbytes = n * (2 * KVH * D * k.element_size() + 8)
            s0 = KA.decode_num_splits(B, KVH, "cuda")
            ref = KA.decode_attention(q, k, v, r2t, rows, seq, 0.088, None, s0, mid_o, mid_lse).float()
            results = []
            for bn, warps, stages, mult, fp16 in itertools.product(
                    *space, (False, True) if k.element_size() == 1 else (False,)):
                S = min(KA.MAX_DECODE_SPLITS, s0 * mult)
                cfg = {"BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "FP16_DOT": fp16}
                try:
                    got = KA.decode_attention(q, k, v, r2t, rows, seq, 0.088, None, S, mid_o, mid_lse, config=cfg)
                    err = (got.float() - ref).abs().max().item()
                    ms = bench(lambda: KA.decode_attention(q, k, v, r2t, rows, seq, 0.088, None, S, mid_o, mid_lse,
                                                           config=cfg))
                except Exception as e:  # noqa: BLE001 - resource errors of oversized tiles
                    results.append({**cfg, "splits": S, "error": type(e).__name__})
                    continue
                results.append({**cfg, "splits": S, "ms": round(ms, 4), "max_err_vs_default": err,
                                "pct_of_copy_bw": round(100 * nbytes / (ms * 1e-3) / bw, 1)})
            ok = [r for r in results if "ms" in r]
            best = min(ok, key=lambda r: r["ms"])
            dc = KA.decode_config(D, kv_dtype, s0)
            default = next(r for r in ok if r["BLOCK_N"] == dc["BLOCK_N"] and r["num_warps"] == dc["num_warps"]
                           and r["num_stages"] == dc["num_stages"] and r["splits"] == s0
                           and r["FP16_DOT"] == bool(dc.get("FP16_DOT")))
            case = {"kv_dtype": str(kv_dtype), "batch": B, "len_range": [lo, hi], "tokens": n,
                    "default_splits": s0, "default": default, "best": best, "all": results}
            out["cases"].append(case)
            print(f"{str(kv_dtype):>20} B={B:<4} len {lo}-{hi}: default {default['ms']:.4f} ms "
                  f"({default['pct_of_copy_bw']}%), best {best['ms']:.4f} ms ({best['pct_of_copy_bw']}%) "
                  f"{ {k: best[k] for k in ('BLOCK_N', 'num_warps', 'num_stages', 'splits', 'FP16_DOT')} }", flush=True)
            del k, v
            torch.cuda.empty_cache()
    Path(a.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
