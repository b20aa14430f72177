"""The Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), on tiny shapes.

Skipped when triton is not installed (CI). TRITON_INTERPRET must be set before triton is first
imported, so the checks run in a child process: this file is also that child's script. The GPU
suite (tests/gpu/test_kernels.py) covers the real shapes; this one keeps the kernels' logic
(masks, splits, causal bounds, windows, gathers, the backend glue) checked on any laptop.

Tolerances (vs fp32 torch references): bf16 2e-2, fp16 5e-3, fp32 2e-4 relative to max(1, |ref|).
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
def test_kernels_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'gpu'}"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ALL OK" in proc.stdout


def _patch_interpreter() -> None:
    """Two bugs of Triton 3.6's interpreter (the compiled GPU path has neither):
    * bf16 dot operands are multiplied as their raw uint16 bits (numpy has no bf16): widen to fp32;
    * fp32 -> bf16 casts truncate instead of rounding to nearest even (the GPU's `.to()`): round;
    * a loaded scalar is a 1-element array, which NumPy >= 2.4 refuses to int() when it is used as
      a `range` bound: take the element explicitly."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    orig_convert = interp._convert_float

    def convert_float(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return np.where(np.isnan(data), np.uint16(0x7FC0), rne).reshape(data.shape)
        return orig_convert(data, src, dst, rounding_mode)

    interp._convert_float = convert_float

    orig_patch_tensor = interp._patch_lang_tensor

    def patch_tensor(tensor, scope):
        orig_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor = patch_tensor

    orig = interp.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter()
    import torch
    from test_kernels import TOL, assert_close, make_case, reference, rope_cache, run_decode, run_extend

    from radixserve.attention.triton_backend import TritonAttentionBackend
    from radixserve.kernels import fused

    torch.manual_seed(0)
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    t0 = time.time()

    def check(name, fn):
        t = time.time()
        err = fn()
        note = f"max err {err:.2e}, " if isinstance(err, float) else ""
        print(f"ok  {name}  ({note}{time.time() - t:.1f}s)", flush=True)

    # Decode: GQA groups 3 / 1 / 4 / 2, D 64 / 128 / 48 (masked), window, pages, dtypes, 1..32 splits.
    decode = [
        ("decode g3 d64 bf16", ([0, 69, 199, 7], 9, 3, 64, bf16, None, 1)),
        ("decode g1 d64 fp16 window", ([130, 5], 2, 2, 64, f16, 50, 4)),
        ("decode g4 d128 fp32", ([300], 4, 1, 128, f32, None, 1)),
        ("decode g2 d48 bf16 window", ([40, 3], 4, 2, 48, bf16, 17, 1)),
        ("decode g3 d64 fp16 one split", ([9, 0, 130, 4, 70, 1, 2, 3, 64, 63, 65], 9, 3, 64, f16, None, 1)),
        ("decode g2 d128 bf16 few splits", ([200, 3, 130, 0, 77, 260, 5, 129], 2, 1, 128, bf16, None, 1)),
    ]
    for name, (pre, h, kvh, d, dt, win, ps) in decode:
        case = make_case(pre, [1] * len(pre), h, kvh, d, dt, "cpu", win, ps, seed=len(name))
        check(name, lambda c=case, dt=dt, n=name: assert_close(run_decode(c), reference(c), dt, n))

    # Extend: ragged, prefix 0 and > 0, blocks crossing BLOCK_M / BLOCK_N, window.
    extend = [
        ("extend g3 d64 bf16", ([0, 37, 5], [5, 20, 70], 9, 3, 64, bf16, None, 1)),
        ("extend g2 d64 fp16 window", ([64, 0], [150, 3], 4, 2, 64, f16, 40, 4)),
        ("extend g1 d32 fp32", ([10, 0], [1, 65], 2, 2, 32, f32, None, 1)),
    ]
    for name, (pre, ext, h, kvh, d, dt, win, ps) in extend:
        case = make_case(pre, ext, h, kvh, d, dt, "cpu", win, ps, seed=len(name))
        check(name, lambda c=case, dt=dt, n=name: assert_close(run_extend(c), reference(c), dt, n))

    def backend_glue():
        for ext in ([1, 1, 1], [3, 1, 40]):
            case = make_case([5, 60, 0], ext, 9, 3, 64, bf16, "cpu", seed=3)
            be = TritonAttentionBackend()
            be.init_forward_metadata(case.fb)
            assert type(case.fb.attn_meta).__name__.startswith("Triton")
            assert_close(be.forward(case.q, case.layer, case.fb), reference(case), bf16, "backend")
        for ext, tail in (([3, 40, 1, 1], 2), ([70, 1], 1)):  # mixed: prompt chunks, then decode requests
            case = make_case([5, 60, 0, 130][:len(ext)], ext, 9, 3, 64, bf16, "cpu", seed=4)
            case.fb.decode_tail = tail
            be = TritonAttentionBackend()
            be.init_forward_metadata(case.fb)
            assert case.fb.attn_meta.decode_tail == tail
            assert_close(be.forward(case.q, case.layer, case.fb), reference(case), bf16, f"mixed tail={tail}")
    check("backend decode + extend + mixed", backend_glue)

    def fused_checks():
        for dt in (bf16, f32):
            tol = {bf16: 2e-2, f32: 1e-5}[dt]
            x, r = torch.randn(5, 96, dtype=dt), torch.randn(5, 96, dtype=dt)
            w = (1 + 0.1 * torch.randn(96)).to(dt)
            torch.testing.assert_close(fused.rmsnorm(x, w, 1e-6), fused.rmsnorm_ref(x, w, 1e-6), atol=tol, rtol=tol)
            (o, res), (ro, rres) = fused.rmsnorm(x, w, 1e-6, r), fused.rmsnorm_ref(x, w, 1e-6, r)
            torch.testing.assert_close(res, rres, atol=0, rtol=0)
            torch.testing.assert_close(o, ro, atol=tol, rtol=tol)
            g = 3 * torch.randn(3, 2 * 80, dtype=dt)
            torch.testing.assert_close(fused.silu_and_mul(g), fused.silu_and_mul_ref(g), atol=tol, rtol=tol)
            T, H, KVH, D = 6, 3, 1, 32
            cs, pos = rope_cache(64, D), torch.randint(1, 64, (T,))
            qkv = torch.randn(T, (H + 2 * KVH) * D, dtype=dt)
            q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))
            rq, rk = fused.rotary_ref(pos, q.clone(), k.clone(), cs)
            kc, vc, slots = torch.full((T + 4, KVH, D), float("nan"), dtype=dt), torch.zeros(T + 4, KVH, D, dtype=dt), \
                torch.randperm(T + 4)[:T]
            q2 = q.clone()
            fused.rotary_and_store_kv(pos, q2, k, v, cs, kc, vc, slots)
            torch.testing.assert_close(q2, rq, atol=tol, rtol=tol)
            torch.testing.assert_close(kc[slots], rk, atol=tol, rtol=tol)
            torch.testing.assert_close(vc[slots], v, atol=0, rtol=0)
            q_out = torch.empty_like(q)  # out of place: q itself stays as it was
            fused.rotary_and_store_kv(pos, q, k, v, cs, kc, vc, slots, q_out=q_out)
            torch.testing.assert_close(q_out, rq, atol=tol, rtol=tol)
            torch.testing.assert_close(q, qkv[:, :H * D].view(T, H, D), atol=0, rtol=0)
    check("fused rmsnorm / silu_and_mul / rotary", fused_checks)
    assert TOL[bf16] == 2e-2
    print(f"ALL OK ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
