"""The fused-MoE Triton kernel on CPU through Triton's interpreter (TRITON_INTERPRET=1), on tiny shapes.

Skipped when triton is not installed (CI). As in test_kernels_interpret.py, the checks run in a child process
(TRITON_INTERPRET must be set before triton is imported) with that file's interpreter patches. Both paths
(one entry per block; entries sorted by expert and padded), ragged N and K against the block sizes, other
ranks' experts (ids < 0), fp32 / bf16 and FP8 weights with group scales are compared with kernels/moe.py's
torch twin in fp32.
tests/gpu/test_moe_kernel.py covers the real shapes and the tuned configs.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_moe_under_triton_interpreter():
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ALL OK" in proc.stdout


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from test_kernels_interpret import _patch_interpreter
    _patch_interpreter()
    import torch

    from radixserve.kernels.moe import fused_moe, fused_moe_ref, fused_moe_triton
    from radixserve.layers.moe import route

    torch.manual_seed(0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
    cases = [  # T, H, I, E, k, dtype, sorted, BLOCK_M, BLOCK_N, BLOCK_K
        (3, 64, 32, 8, 2, torch.float32, False, 16, 32, 32),
        (5, 48, 40, 6, 3, torch.float32, True, 16, 32, 32),  # N and K not multiples of the blocks
        (21, 64, 48, 4, 2, torch.bfloat16, True, 16, 32, 64),  # several blocks per expert
        (2, 32, 16, 4, 4, torch.bfloat16, False, 16, 16, 16),  # k = E: every expert
    ]
    for T, H, inter, E, k, dt, srt, bm, bn, bk in cases:
        x = torch.randn(T, H).to(dt)
        w13, w2 = (torch.randn(E, 2 * inter, H) / 6).to(dt), (torch.randn(E, H, inter) / 6).to(dt)
        w, ids = route(torch.randn(T, E), k, True, None)
        cfg = dict(SORTED=srt, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=1)
        for remote in (False, True):
            use = torch.where(ids % 2 == 1, -1, ids) if remote else ids  # odd experts on the other rank
            out = fused_moe_triton(x, w13, w2, w, use, has_remote=remote, config=cfg)
            ref = fused_moe_ref(x.float(), w13.float(), w2.float(), w, use)
            assert out.dtype == dt and out.shape == (T, H)
            err = float((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1))
            assert err < tol[dt], (T, H, inter, E, k, dt, srt, remote, err)
            print(f"ok  T={T} H={H} I={inter} E={E} k={k} {dt} sorted={srt} remote={remote}  err {err:.1e}")
    # the router in one kernel: the same experts and weights as HF's softmax / top-k / renormalise
    from radixserve.kernels.moe import topk_softmax, topk_softmax_ref
    for T, E, k, renorm, wdt in [(5, 8, 2, True, torch.bfloat16), (3, 60, 4, False, torch.float32),
                                 (4, 128, 8, True, None)]:
        logits = torch.randn(T, E) * 3
        w, ids = topk_softmax(logits, k, renorm, wdt)
        w_ref, ids_ref = topk_softmax_ref(logits, k, renorm, wdt)
        assert torch.equal(ids, ids_ref) and w.dtype == w_ref.dtype, (ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-5 if wdt != torch.bfloat16 else 1e-2, atol=1e-6)
    print("ok  topk_softmax")
    # FP8 experts (W8A16): 32-column scale groups with a partial last group, and one group per row
    from radixserve.kernels.fp8 import quantize_blocks, quantize_rows
    for T, H, inter, E, k, srt, grouped in [(4, 64, 48, 4, 2, False, True), (9, 64, 48, 4, 2, True, True),
                                            (5, 32, 16, 4, 2, True, False)]:
        x = torch.randn(T, H).bfloat16()
        w13f, w2f = torch.randn(E, 2 * inter, H) / 6, torch.randn(E, H, inter) / 6
        if grouped:
            parts13 = [quantize_blocks(w13f[e], (32, 32)) for e in range(E)]
            parts2 = [quantize_blocks(w2f[e], (32, 32)) for e in range(E)]
            s13 = torch.stack([s.repeat_interleave(32, 0)[: 2 * inter] for _, s in parts13])
            s2 = torch.stack([s.repeat_interleave(32, 0)[:H] for _, s in parts2])
            scales = (s13, s2, 32, 32)
        else:
            parts13 = [quantize_rows(w13f[e]) for e in range(E)]
            parts2 = [quantize_rows(w2f[e]) for e in range(E)]
            scales = (torch.stack([s for _, s in parts13]), torch.stack([s for _, s in parts2]), H, inter)
        w13, w2 = torch.stack([q for q, _ in parts13]), torch.stack([q for q, _ in parts2])
        w, ids = route(torch.randn(T, E), k, True, None)
        cfg = dict(SORTED=srt, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1)
        out = fused_moe_triton(x, w13, w2, w, ids, config=cfg, scales=scales)
        ref = fused_moe_ref(x.float(), w13, w2, w, ids, scales)
        err = float((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1))
        assert err < 2e-2, (T, srt, grouped, err)
        print(f"ok  fp8 T={T} sorted={srt} grouped={grouped}  err {err:.1e}")
    # the public entry point picks the Triton path (table config) under the interpreter too
    x = torch.randn(2, 32)
    w13, w2 = torch.randn(4, 64, 32) / 6, torch.randn(4, 32, 32) / 6
    w, ids = route(torch.randn(2, 4), 2, False, None)
    torch.testing.assert_close(fused_moe(x, w13, w2, w, ids), fused_moe_ref(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)
    print("ALL OK")


if __name__ == "__main__":
    main()
