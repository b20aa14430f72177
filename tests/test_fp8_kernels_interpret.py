"""The FP8 Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), on small shapes:
the W8A16 GEMM (per-channel and 128-block scales, partial tiles), the FP8 KV store in the fused
rotary kernel, and the decode / extend attention kernels reading an FP8 pool with scales. The checks
and tolerances are tests/gpu/test_fp8_kernels.py's. Skipped when triton is not installed (CI), like
tests/test_kernels_interpret.py, whose interpreter patches this reuses.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fp8_kernels_under_triton_interpreter():
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "gpu"), str(ROOT / "tests"),
                            os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ALL OK" in proc.stdout


def _patch_fp8_casts() -> None:
    """Triton 3.6's interpreter rounds fp32 -> fp8 wrongly when rounding carries into the exponent
    (-1.9375 -> e4m3 gives -1.0, not -2.0; the GPU's cvt instruction is right): cast through torch,
    which rounds to nearest even like the hardware."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter as interp
    orig = interp._convert_float
    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}

    def convert_float(data, src, dst, rounding_mode):
        if src == tl.float32 and dst in fp8:
            t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            return t.to(fp8[dst]).view(torch.uint8).numpy().reshape(data.shape)
        return orig(data, src, dst, rounding_mode)

    interp._convert_float = convert_float


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from test_kernels_interpret import _patch_interpreter
    _patch_interpreter()
    _patch_fp8_casts()
    import torch
    from test_fp8_kernels import (
        check_fp8_attention,
        check_fp8_rotary_store,
        check_fused_quantize,
        check_quantize_rows,
        check_w8a16,
    )
    t0 = time.time()
    for m, n, k, group, dt in [(1, 48, 320, False, torch.float32), (5, 200, 300, True, torch.float32),
                               (3, 64, 256, False, torch.bfloat16), (20, 40, 160, True, torch.bfloat16),
                               (4, 40, 300, True, torch.float32), (2, 24, 1100, False, torch.float32)]:
        err = check_w8a16("cpu", m, n, k, group, dt)
        print(f"ok  w8a16 {m}x{n}x{k} group={group} {dt}  (rel err {err:.2e})", flush=True)
    for m, k, dt in [(3, 300, torch.float32), (2, 64, torch.bfloat16)]:
        check_quantize_rows("cpu", m, k, dt)
        print(f"ok  quantize_rows_fused {m}x{k} {dt}", flush=True)
    for rows, n, dt, res in [(3, 300, torch.float32, True), (5, 64, torch.bfloat16, False),
                             (2, 256, torch.bfloat16, True)]:
        check_fused_quantize("cpu", rows, n, dt, res)
        print(f"ok  fused rmsnorm / silu quantize {rows}x{n} {dt} residual={res}", flush=True)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        check_fp8_rotary_store("cpu", fp8)
        print(f"ok  rotary + fp8 store {fp8}", flush=True)
        for decode in (True, False):
            err = check_fp8_attention("cpu", decode, fp8)
            print(f"ok  fp8 kv {'decode' if decode else 'extend'} {fp8}  (max err {err:.2e})", flush=True)
        for fp16_dot in (False, True):
            err = check_fp8_attention("cpu", True, fp8, fp16_dot=fp16_dot)
            print(f"ok  fp8 kv decode {fp8} fp16_dot={fp16_dot}  (max err {err:.2e})", flush=True)
    print(f"ALL OK ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
