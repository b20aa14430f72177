"""FP8 kernels vs their torch references (GPU; the same checks run on CPU under the Triton interpreter in
tests/test_fp8_kernels_interpret.py, on small shapes).

    w8a16_gemm           vs kernels.fp8.w8a16_ref (fp32 on the upcast inputs): ||out - ref|| / ||ref||
                         < 1e-2 for bf16 activations (bf16 output rounding; group scales also round the
                         dequantized tile to bf16), < 1e-5 for fp32. Output poisoned with NaN first.
    FP8 KV attention     decode/extend kernels reading an e4m3 / e5m2 pool with k/v scales vs the fp32
                         torch backend on the dequantized pool: the bf16 tolerance of test_kernels.py
                         (fp8 values are exact in bf16; the scales are applied in fp32).
    rotary + FP8 store   the Triton store vs the torch twin (KVPool.encode semantics): stored values equal
                         up to one FP8 rounding step (x * (1/s) vs x / s may round apart at a tie).
    W8A8 (_scaled_mm)    the engine's large-batch path vs kernels.fp8.w8a8_ref: < 2e-2 relative.
    per-token quantize   quantize_rows_fused vs quantize_rows: scales to 1e-6, values within one rounding step.
    fused quantize       rmsnorm / silu_and_mul with quant= vs the same kernel's 16-bit output then
                         quantize_rows_fused: bitwise equal (values and scales), residual output too.
"""
from __future__ import annotations

import pytest
import torch

from radixserve.kernels import fp8 as F8


def _helpers(*names: str):
    """test_kernels.py's case builders: a package module under pytest, a top-level one in the interpreter
    child process (tests/gpu on its path)."""
    try:
        from tests.gpu import test_kernels as tk
    except ImportError:
        import test_kernels as tk
    return tuple(getattr(tk, n) for n in names)


def check_w8a16(device: str, m: int, n: int, k: int, group: bool, dtype: torch.dtype, seed: int = 0) -> float:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    w = torch.randn(n, k, generator=g, device=device)
    if group:
        q, s = F8.quantize_blocks(w, (128, 128))
        s = s.repeat_interleave(128, 0)[:n].contiguous()
    else:
        q, s = F8.quantize_rows(w)
    bias = torch.randn(n, generator=g, device=device).to(dtype)
    ref = F8.w8a16_ref(x.float(), q, s, bias.float())
    out = F8.w8a16_gemm(x, q, s, bias)
    assert not torch.isnan(out).any()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), f"w8a16 {m}x{n}x{k} group={group} {dtype}: {err:.3g}"
    return err


def check_quantize_rows(device: str, m: int, k: int, dtype: torch.dtype, seed: int = 0) -> None:
    """The one-kernel per-token quantization vs quantize_rows: scales equal to 1e-6 relative (the same fp32
    amax / max), quantized values equal up to one FP8 rounding step (x / s rounds the same way in both; a
    value at a rounding tie may land either side), outliers saturate instead of turning NaN."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(m, k, generator=g, device=device) * torch.rand(m, 1, generator=g, device=device) * 8).to(dtype)
    q1, s1 = F8.quantize_rows_fused(x)
    q2, s2 = F8.quantize_rows(x)
    assert q1.dtype == torch.float8_e4m3fn and s1.shape == (m, 1)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)
    a, b = q1.float(), q2.float()
    assert torch.isfinite(a).all() and ((a - b).abs() <= 0.125 * b.abs() + 1e-6).all()
    assert (a == b).float().mean() > 0.99


def fp8_pool_case(case, fp8_dtype: torch.dtype, k_scale: float, v_scale: float):
    """Turn a test_kernels Case's pool into FP8 (stored = value / scale); returns the dequantized fp32 pool
    buffers the reference attends over."""
    pool = case.fb.kv_pool
    k8 = F8.to_fp8(pool.k[0].float() / k_scale, fp8_dtype)
    v8 = F8.to_fp8(pool.v[0].float() / v_scale, fp8_dtype)
    pool.k, pool.v = [k8], [v8]
    pool.k_scale, pool.v_scale, pool.dtype = [k_scale], [v_scale], fp8_dtype
    return k8.float() * k_scale, v8.float() * v_scale


def check_fp8_attention(device: str, decode: bool, fp8_dtype: torch.dtype, seed: int = 0,
                        fp16_dot: bool | None = None) -> float:
    """fp16_dot: one split with the few-split (large batch) config, its fp16 dot forced on (True) or off
    (False); None: the split count and config decode_attention picks."""
    assert_close, make_case = _helpers("assert_close", "make_case")
    from radixserve.attention.torch_backend import TorchAttentionBackend
    from radixserve.forward_batch import ForwardBatch
    from radixserve.kernels.attention import decode_attention, decode_config, extend_attention
    from radixserve.kvcache.pool import KVPool
    pre, ext = ([0, 69, 130], [1, 1, 1]) if decode else ([0, 37, 5], [5, 20, 70])
    case = make_case(pre, ext, 8, 2, 64, torch.bfloat16, device, seed=seed)
    ks, vs = 0.37, 1.9
    kd, vd = fp8_pool_case(case, fp8_dtype, ks, vs)
    fb, q, layer = case.fb, case.q, case.layer
    pool32 = KVPool(1, 1, 1, 1, torch.float32, "cpu")
    pool32.k, pool32.v = [kd], [vd]
    fb32 = ForwardBatch(**{**fb.__dict__, "kv_pool": pool32, "attn_meta": None})
    be = TorchAttentionBackend()
    be.init_forward_metadata(fb32)
    ref = be.forward(q.float(), layer, fb32)
    pool = fb.kv_pool
    if decode:
        cfg, splits = None, None
        if fp16_dot is not None:
            cfg, splits = {**decode_config(q.shape[-1], pool.k[0].dtype, 1), "FP16_DOT": fp16_dot}, 1
        out = decode_attention(q, pool.k[0], pool.v[0], fb.req_to_token, fb.req_rows, fb.seq_lens, layer.scale,
                               num_splits=splits, k_scale=ks, v_scale=vs, config=cfg)
    else:
        out = extend_attention(q, pool.k[0], pool.v[0], fb.req_to_token, fb.req_rows, fb.prefix_lens,
                               fb.extend_lens, layer.scale, k_scale=ks, v_scale=vs)
    # the torch backend reading the FP8 pool itself (KVPool.load applies the scales) agrees too
    be2 = TorchAttentionBackend()
    be2.init_forward_metadata(fb)
    assert_close(be2.forward(q.float(), layer, fb), ref, torch.float32, "torch backend on fp8 pool")
    return assert_close(out, ref, torch.bfloat16, f"fp8 kv {'decode' if decode else 'extend'} {fp8_dtype}")


def check_fp8_rotary_store(device: str, fp8_dtype: torch.dtype, seed: int = 0) -> None:
    (rope_cache,) = _helpers("rope_cache")
    from radixserve.kernels import fused
    g = torch.Generator(device=device).manual_seed(seed)
    T, H, KVH, D = 7, 4, 2, 64
    cs = rope_cache(64, D).to(device)
    pos = torch.randint(0, 64, (T,), generator=g, device=device)
    qkv = 3 * torch.randn(T, (H + 2 * KVH) * D, generator=g, device=device).to(torch.bfloat16)
    q, k, v = (t.reshape(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))
    slots = torch.randperm(T + 3, generator=g, device=device)[:T]
    outs = []
    for use_triton in (True, False):
        kc = torch.zeros(T + 3, KVH, D, dtype=fp8_dtype, device=device)
        vc = torch.zeros_like(kc)
        qo = torch.empty_like(q)
        if use_triton:
            fused.rotary_and_store_kv(pos, q, k.contiguous(), v.contiguous(), cs, kc, vc, slots, qo, 0.5, 2.0)
        else:
            cos, sin = cs[pos].unsqueeze(1).chunk(2, dim=-1)
            qo.copy_(fused._rotate_ref(q, cos, sin))
            kc[slots] = fused._cache_ref(fused._rotate_ref(k, cos, sin), 0.5, fp8_dtype)
            vc[slots] = fused._cache_ref(v, 2.0, fp8_dtype)
        outs.append((qo.float(), kc[slots].float(), vc[slots].float()))
    (q1, k1, v1), (q2, k2, v2) = outs
    torch.testing.assert_close(q1, q2, atol=2e-2, rtol=2e-2)
    step = 0.25 if fp8_dtype == torch.float8_e5m2 else 0.125  # one rounding step, relative
    for a, b in ((k1, k2), (v1, v2)):
        assert ((a - b).abs() <= step * b.abs() + 1e-3).all(), "fp8 store differs by more than one rounding step"
    assert torch.isfinite(k1).all() and torch.isfinite(v1).all()  # saturated, never NaN / inf


def check_fused_quantize(device: str, rows: int, n: int, dtype: torch.dtype, residual: bool, seed: int = 0) -> None:
    """rmsnorm(quant=) and silu_and_mul(quant=) against their unfused two-kernel path, bitwise."""
    from radixserve.kernels.fused import rmsnorm, silu_and_mul
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype).to(device)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype).to(device)
    r = (torch.randn(rows, n, generator=g)).to(dtype).to(device) if residual else None
    got = rmsnorm(x, w, 1e-6, r, quant=torch.float8_e4m3fn)
    want = rmsnorm(x, w, 1e-6, r)
    ((gq, gs), gr), (wn, wr) = (got, want) if residual else ((got, None), (want, None))
    wq, ws = F8.quantize_rows_fused(wn.reshape(rows, n))
    assert torch.equal(gs, ws) and torch.equal(gq.view(torch.uint8), wq.view(torch.uint8)), "rmsnorm quant"
    if residual:
        assert torch.equal(gr, wr), "rmsnorm quant: residual output"
    h = (torch.randn(rows, 2 * n, generator=g) * 4).to(dtype).to(device)
    gq, gs = silu_and_mul(h, quant=torch.float8_e4m3fn)
    wq, ws = F8.quantize_rows_fused(silu_and_mul(h))
    assert torch.equal(gs, ws) and torch.equal(gq.view(torch.uint8), wq.view(torch.uint8)), "silu_and_mul quant"


# --------------------------------------------------------------------------------------------------
# GPU tests

needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs a CUDA GPU with FP8 (sm_89+)")


@needs_fp8_gpu
@pytest.mark.parametrize("m", [1, 2, 4, 7, 16, 33, 64, 200])  # 1-4: the GEMV kernel
@pytest.mark.parametrize("nk", [(6144, 4096), (4096, 14336), (28672, 4096), (200, 320)])
@pytest.mark.parametrize("group", [False, True])
def test_w8a16_gpu(m, nk, group):
    check_w8a16("cuda", m, *nk, group, torch.bfloat16, seed=m)


@needs_fp8_gpu
@pytest.mark.parametrize("mk", [(1, 4096), (64, 4096), (300, 14336), (5, 200)])
def test_quantize_rows_fused_gpu(mk):
    check_quantize_rows("cuda", *mk, torch.bfloat16)


@needs_fp8_gpu
@pytest.mark.parametrize("rows,n", [(64, 4096), (300, 14336), (70, 128), (9, 200)])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_quantize_gpu(rows, n, residual):
    check_fused_quantize("cuda", rows, n, torch.bfloat16, residual)


@needs_fp8_gpu
@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kv_attention_gpu(decode, fp8_dtype):
    check_fp8_attention("cuda", decode, fp8_dtype)


@needs_fp8_gpu
@pytest.mark.parametrize("fp16_dot", [False, True])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kv_decode_dot_dtypes_gpu(fp16_dot, fp8_dtype):
    """Both dot dtypes of the FP8-pool decode kernel (bf16 upcast, fp16 upcast) against the fp32 reference."""
    check_fp8_attention("cuda", True, fp8_dtype, fp16_dot=fp16_dot)


@needs_fp8_gpu
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_rotary_store_gpu(fp8_dtype):
    check_fp8_rotary_store("cuda", fp8_dtype)


@needs_fp8_gpu
@pytest.mark.parametrize("m", [128, 1000])
def test_scaled_mm_w8a8_gpu(m):
    from radixserve.layers.quantization.fp8 import _scaled_mm_w8a8
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, generator=g, device="cuda").to(torch.bfloat16)
    q, s = F8.quantize_rows(torch.randn(1024, 4096, generator=g, device="cuda"))
    out = _scaled_mm_w8a8(x, q, s, None, None)
    ref = F8.w8a8_ref(x.float(), q, s)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("nk", [(4096, 4096), (6144, 4096), (1000, 3000)])
def test_gemv_pdl_in_cuda_graph(nk):
    """Programmatic dependent launch (kernels/pdl.py): RMSNorm -> GEMV -> SiLU-mul -> GEMV captured in a CUDA
    graph with PDL on gives exactly the graph without it (same kernels, same order of sums: the prefetch and
    the early launch change only when work starts), and stays within w8a16_ref's tolerance. Replayed with
    fresh inputs, so a GEMV that read its activation before the norm wrote it would differ."""
    from radixserve.kernels import fused, pdl
    if not pdl.supported(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+ and triton >= 3.3")
    n, k = nk
    g = torch.Generator(device="cuda").manual_seed(0)
    wa, sa = F8.quantize_rows(torch.randn(2 * n, k, generator=g, device="cuda"))
    wb, sb = F8.quantize_rows(torch.randn(k, n, generator=g, device="cuda"))
    norm_w = torch.rand(k, generator=g, device="cuda").to(torch.bfloat16)
    x = torch.randn(1, k, generator=g, device="cuda").to(torch.bfloat16)

    def step() -> torch.Tensor:
        h = fused.rmsnorm(x, norm_w, 1e-6)
        return F8.w8a16_gemm(fused.silu_and_mul(F8.w8a16_gemm(h, wa, sa)), wb, sb)

    outs = {}
    try:
        for on in (False, True):
            pdl.configure(on, torch.device("cuda"))
            step()  # autotune outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            results = []
            for seed in (1, 2):
                x.copy_(torch.randn(1, k, generator=torch.Generator(device="cuda").manual_seed(seed),
                                    device="cuda").to(torch.bfloat16))
                graph.replay()
                results.append(out.clone())
            outs[on] = results
    finally:
        pdl.configure(False, torch.device("cuda"))
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b)
    h = fused.rmsnorm(x, norm_w, 1e-6)
    ref = F8.w8a16_ref(fused.silu_and_mul(F8.w8a16_ref(h, wa, sa).to(torch.bfloat16)), wb, sb)
    assert ((outs[True][1].float() - ref).norm() / ref.norm()).item() < 2e-2
