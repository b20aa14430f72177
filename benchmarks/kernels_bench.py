"""Kernel micro-benchmarks: each Triton kernel vs its torch reference on the GPU.

    python benchmarks/kernels_bench.py --output benchmarks/results/kernels_h100.json [--sweep-splits]

Times are triton.testing.do_bench medians (ms). Memory-bound kernels report achieved bandwidth
(bytes that must move / time) next to the device-copy ceiling measured in the same process
(radixserve.bench.roofline.copy_bandwidth), so `% copy` is the fraction of the practical HBM
roofline. Extend attention is compute bound and reports causal TFLOP/s instead.

Shapes (Llama-3.1-8B, bf16): decode 32 q heads / 8 KV heads / D 128, B in (1, 32, 128, 256) x
KV length 1024 and 4096, KV slots a random permutation of the pool (page size 1, the worst case
for the gathers); extend 8 requests x 2048 new tokens, no prefix; rmsnorm (+residual), silu_and_mul
and rotary at T = 8192 tokens x hidden 4096 (silu_and_mul: [8192, 2 x 4096] -> [8192, 4096];
rotary: 32 q + 8 k heads of 128).

--sweep-splits also times decode for every NUM_SPLITS power of two, to tune
radixserve.kernels.attention.decode_num_splits on the device at hand; --sweep-configs times decode
and extend over block sizes / warps / stages (decode_config, extend_config).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from radixserve.attention.torch_backend import TorchAttentionBackend
from radixserve.bench.roofline import copy_bandwidth, device_name, git_commit
from radixserve.forward_batch import ForwardBatch
from radixserve.kernels import attention as KA
from radixserve.kernels import fused
from radixserve.kvcache.pool import KVPool
from radixserve.layers.attention import Attention

H, KVH, D, HIDDEN = 32, 8, 128, 4096
DT = torch.bfloat16
DEV = "cuda"


def bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def attn_batch(prefix: list[int], extend: list[int]) -> tuple[ForwardBatch, torch.Tensor, Attention]:
    """A batch whose KV (prefix + new tokens) sits at random slots of a pool sized to fit it."""
    B = len(prefix)
    seq = [p + e for p, e in zip(prefix, extend)]
    n = sum(seq)
    pool = KVPool(1, n + 1, KVH, D, DT, DEV)
    pool.k[0].normal_()
    pool.v[0].normal_()
    r2t = torch.zeros((B, max(seq)), dtype=torch.int64, device=DEV)
    perm = torch.randperm(n, device=DEV) + 1
    off = 0
    for b, s in enumerate(seq):
        r2t[b, :s] = perm[off:off + s]
        off += s
    pre = torch.tensor(prefix, device=DEV)
    ext = torch.tensor(extend, device=DEV)
    T = sum(extend)
    fb = ForwardBatch(is_decode=all(e == 1 for e in extend), input_ids=torch.zeros(T, dtype=torch.int64, device=DEV),
                      positions=torch.zeros(T, dtype=torch.int64, device=DEV),
                      out_slots=torch.zeros(T, dtype=torch.int64, device=DEV),
                      req_rows=torch.arange(B, device=DEV), seq_lens=pre + ext, prefix_lens=pre, extend_lens=ext,
                      logits_idx=torch.cumsum(ext, 0) - 1, max_seq_len=max(seq), max_extend_len=max(extend),
                      kv_pool=pool, req_to_token=r2t)
    return fb, torch.randn(T, H, D, device=DEV, dtype=DT), Attention(0, H, KVH, D)


def torch_attention(fb, q, layer) -> float | None:
    try:
        ref = TorchAttentionBackend()
        ref.init_forward_metadata(fb)
        return bench(lambda: ref.forward(q, layer, fb))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def row(rows: list[dict], name: str, shape: str, ms: float, ref_ms: float | None, nbytes: float | None = None,
        flops: float | None = None, copy_bw: float | None = None, **extra) -> None:
    r = {"kernel": name, "shape": shape, "triton_ms": round(ms, 4),
         "torch_ms": None if ref_ms is None else round(ref_ms, 4),
         "speedup": None if ref_ms is None else round(ref_ms / ms, 2)}
    if nbytes is not None:
        r["GB/s"] = round(nbytes / ms / 1e6, 1)
        r["pct_of_copy_bw"] = round(100 * nbytes / (ms * 1e-3) / copy_bw, 1)
    if flops is not None:
        r["TFLOP/s"] = round(flops / ms / 1e9, 1)
    r.update(extra)
    rows.append(r)
    perf = (f"{r['GB/s']:8.0f} GB/s ({r['pct_of_copy_bw']:5.1f}% copy)" if nbytes is not None else
            f"{r['TFLOP/s']:8.1f} TFLOP/s" if flops is not None else "")
    ref_s = "      -" if ref_ms is None else f"{ref_ms:9.3f}"
    sp = "    -" if ref_ms is None else f"{ref_ms / ms:6.2f}x"
    print(f"{name:<22} {shape:<26} {ms:9.3f} {ref_s} {sp}  {perf}", flush=True)


def sweep_configs(run, space: dict) -> dict:
    """Time run(config) over the product of `space`; configs that do not fit (shared memory,
    registers) are recorded as None. Returns {"best": config, "best_ms": ms, "all": [...]}."""
    results = []
    for values in itertools.product(*space.values()):
        cfg = dict(zip(space, values))
        try:
            ms = round(bench(lambda cfg=cfg: run(cfg)), 4)
        except Exception as e:  # noqa: BLE001 - triton raises several resource errors
            ms = None
            cfg["error"] = type(e).__name__
        results.append({**cfg, "ms": ms})
    ok = [r for r in results if r["ms"] is not None]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    return {"best": best, "all": results}


def bench_decode(rows, copy_bw, sweep: bool, skip_torch: bool, configs: bool) -> None:
    for B in (1, 32, 128, 256):
        for seq in (1024, 4096):
            _decode_case(rows, copy_bw, sweep, skip_torch, configs, B, seq)
            torch.cuda.empty_cache()


def _decode_case(rows, copy_bw, sweep: bool, skip_torch: bool, configs: bool, B: int, seq: int) -> None:
    fb, q, layer = attn_batch([seq - 1] * B, [1] * B)
    k, v = fb.kv_pool.k[0], fb.kv_pool.v[0]
    splits = KA.decode_num_splits(B, KVH, q.device)
    mid_o = torch.empty(B * H * KA.MAX_DECODE_SPLITS * D, device=DEV)  # room for any split count (sweep)
    mid_lse = torch.empty(B * H * KA.MAX_DECODE_SPLITS, device=DEV)

    def run(s: int = splits, cfg: dict | None = None) -> torch.Tensor:
        return KA.decode_attention(q, k, v, fb.req_to_token, fb.req_rows, fb.seq_lens, layer.scale, None, s,
                                   mid_o, mid_lse, config=cfg)
    # Must move: K and V of every token, its slot index, q in and out.
    nbytes = B * seq * (2 * KVH * D * 2 + 8) + 2 * q.numel() * 2
    ms = bench(run)
    ref_ms = None if skip_torch else torch_attention(fb, q, layer)
    extra = {"num_splits": splits}
    if sweep:
        sweep_ms = {}
        s = 1
        while s <= KA.MAX_DECODE_SPLITS:
            sweep_ms[s] = round(bench(lambda s=s: run(s)), 4)
            s *= 2
        extra["sweep_ms"] = sweep_ms
        extra["best_splits"] = min(sweep_ms, key=sweep_ms.get)
    if configs:
        extra["config"] = KA.decode_config(D, DT, splits)
        extra["config_sweep"] = sweep_configs(lambda cfg: run(splits, cfg), {
            "BLOCK_N": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]})
        print(f"  best decode config: {extra['config_sweep']['best']}")
    row(rows, "decode_attention", f"B={B} kv={seq}", ms, ref_ms, nbytes, copy_bw=copy_bw, **extra)


def bench_extend(rows, skip_torch: bool, configs: bool) -> None:
    B, L = 8, 2048
    fb, q, layer = attn_batch([0] * B, [L] * B)
    cfg = KA.extend_config(D, L)
    table = KA.extend_block_table(fb.extend_lens, q.shape[0], cfg["BLOCK_M"])
    k, v = fb.kv_pool.k[0], fb.kv_pool.v[0]
    ms = bench(lambda: KA.extend_attention(q, k, v, fb.req_to_token, fb.req_rows, fb.prefix_lens, fb.extend_lens,
                                           layer.scale, None, table, cfg))
    flops = B * 4 * H * D * (L * (L + 1) / 2)  # QK^T and PV over the causal triangle
    ref_ms = None if skip_torch else torch_attention(fb, q, layer)
    extra: dict = {"config": cfg}
    if configs:
        tables = {bm: KA.extend_block_table(fb.extend_lens, q.shape[0], bm) for bm in (64, 128)}
        extra["config_sweep"] = sweep_configs(
            lambda c: KA.extend_attention(q, k, v, fb.req_to_token, fb.req_rows, fb.prefix_lens, fb.extend_lens,
                                          layer.scale, None, tables[c["BLOCK_M"]], c),
            {"BLOCK_M": [64, 128], "BLOCK_N": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3]})
        print(f"  best extend config: {extra['config_sweep']['best']}")
    row(rows, "extend_attention", f"{B}x{L} causal", ms, ref_ms, flops=flops, **extra)


def bench_fused(rows, copy_bw) -> None:
    T, N = 8192, HIDDEN
    x = torch.randn(T, N, device=DEV, dtype=DT)
    r = torch.randn(T, N, device=DEV, dtype=DT)
    w = torch.ones(N, device=DEV, dtype=DT)
    e = 2  # bytes per bf16
    row(rows, "rmsnorm", f"{T}x{N}", bench(lambda: fused.rmsnorm(x, w, 1e-6)),
        bench(lambda: fused.rmsnorm_ref(x, w, 1e-6)), 2 * T * N * e, copy_bw=copy_bw)
    row(rows, "rmsnorm+residual", f"{T}x{N}", bench(lambda: fused.rmsnorm(x, w, 1e-6, r)),
        bench(lambda: fused.rmsnorm_ref(x, w, 1e-6, r)), 4 * T * N * e, copy_bw=copy_bw)
    g = torch.randn(T, 2 * N, device=DEV, dtype=DT)
    row(rows, "silu_and_mul", f"{T}x{2 * N}->{T}x{N}", bench(lambda: fused.silu_and_mul(g)),
        bench(lambda: fused.silu_and_mul_ref(g)), 3 * T * N * e, copy_bw=copy_bw)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(8192, device=DEV, dtype=torch.float32), inv)
    cs = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # a real cache: in-place rotation stays bounded
    pos = torch.randint(0, 8192, (T,), device=DEV)
    qkv = torch.randn(T, (H + 2 * KVH) * D, device=DEV, dtype=DT)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))
    rope_bytes = 2 * T * (H + KVH) * D * e + T * (D * 4 + 8)  # q, k in + out; cos/sin row + position
    row(rows, "rotary_", f"T={T} q{H}/k{KVH}x{D}", bench(lambda: fused.rotary_(pos, q, k, cs)),
        bench(lambda: fused.rotary_ref(pos, q, k, cs)), rope_bytes, copy_bw=copy_bw)
    kc = torch.empty(T, KVH, D, device=DEV, dtype=DT)
    vc = torch.empty_like(kc)
    slots = torch.randperm(T, device=DEV)

    def unfused():
        qr, kr = fused.rotary_ref(pos, q, k, cs)
        kc[slots], vc[slots] = kr, v
        return qr
    store_bytes = rope_bytes + 2 * T * KVH * D * e  # + v in, k and v into the cache; k not written back
    row(rows, "rotary_and_store_kv", f"T={T} q{H}/k{KVH}x{D}",
        bench(lambda: fused.rotary_and_store_kv(pos, q, k, v, cs, kc, vc, slots)), bench(unfused), store_bytes,
        copy_bw=copy_bw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="JSON file to write")
    ap.add_argument("--sweep-splits", action="store_true", help="time decode at every NUM_SPLITS")
    ap.add_argument("--sweep-configs", action="store_true",
                    help="time decode/extend over block sizes, warps and stages (tuning; slow)")
    ap.add_argument("--skip-torch", action="store_true", help="skip the torch attention references (slow, big)")
    ap.add_argument("--only", choices=["decode", "extend", "fused"], nargs="*", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "kernels_bench needs a CUDA GPU"
    import triton
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(DEV)
    print(f"{device_name(DEV)}: device copy {copy_bw / 1e9:.0f} GB/s")
    print(f"{'kernel':<22} {'shape':<26} {'triton ms':>9} {'torch ms':>9} {'speedup':>7}  achieved")
    rows: list[dict] = []
    only = set(args.only or ["decode", "extend", "fused"])
    with torch.inference_mode():
        if "decode" in only:
            bench_decode(rows, copy_bw, args.sweep_splits, args.skip_torch, args.sweep_configs)
        if "extend" in only:
            bench_extend(rows, args.skip_torch, args.sweep_configs)
        if "fused" in only:
            bench_fused(rows, copy_bw)
    result = {"device": device_name(DEV), "commit": git_commit(), "torch": torch.__version__,
              "triton": triton.__version__, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "copy_GBps": round(copy_bw / 1e9, 1), "timing": "triton.testing.do_bench median, ms",
              "results": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
