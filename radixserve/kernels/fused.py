"""Fused elementwise kernels for the layers around attention, each with a torch twin.

Every function here has the semantics of the layer it replaces, rounding steps included:
    rmsnorm       layers/norm.py RMSNorm.forward (residual add in the input dtype, norm in fp32,
                  cast back, then the weight multiply in the promoted dtype, as HF does)
    silu_and_mul  layers/activation.py (silu rounded to the input dtype, then the multiply)
    rotary_and_store_kv   rotary (HF rotate-half, fp32 math, cast back) on q and k, the KV-pool store of
                  the rotated k and of v, in one pass

rmsnorm and silu_and_mul can also hand their output to an FP8 W8A8 matmul already quantized per token
(`quant=`): the rounded output row, its amax, scale = amax / fp8 max, q = out / scale saturated -- the
arithmetic of kernels/fp8.quantize_rows on the rounded output, so the result is bitwise what the separate
quantize kernel gives, without writing the 16-bit output and reading it back.

The Triton path runs for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1, which is how
the kernels are validated without a GPU); anything else takes the torch reference, so these are
safe to call on every device. All of them are memory bound: the point of fusing is to read and
write each byte once (the residual add, the norm and the weight in one pass; rotary over all q and
k heads of a token in one program, sharing the cos/sin row).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from radixserve.kernels import pdl

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch references below serve every call
    HAS_TRITON = False


def _use_triton(t: torch.Tensor) -> bool:
    """Inside torch.compile the torch twins are traced instead, so Inductor can fuse them with their
    neighbours (an opaque Triton call would stay a separate kernel)."""
    return HAS_TRITON and not torch.compiler.is_compiling() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


class _OpaqueTrace:
    """While on, a torch.compile trace records rmsnorm and silu_and_mul as opaque custom ops that run the
    Triton kernels, instead of tracing their torch twins. The piecewise CUDA graphs' backend generates no
    kernels: the twins would run there as separate aten ops (RMSNorm with its residual add as seven), which
    made a 512-token prefill 2 ms slower on the H200 than the eager model's fused kernels."""
    on = False

    def __enter__(self) -> None:
        self.prev, _OpaqueTrace.on = _OpaqueTrace.on, True

    def __exit__(self, *exc: object) -> None:
        _OpaqueTrace.on = self.prev


opaque_trace = _OpaqueTrace


def _trace_opaque(t: torch.Tensor) -> bool:
    return HAS_TRITON and _OpaqueTrace.on and t.is_cuda and torch.compiler.is_compiling()


@torch.library.custom_op("radixserve::rmsnorm", mutates_args=())
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rmsnorm_triton(x, weight, eps, None, None, None, None)


@_rmsnorm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("radixserve::rmsnorm_add", mutates_args=())
def _rmsnorm_add_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rmsnorm_triton(x, weight, eps, residual, None, None, None)


@_rmsnorm_add_op.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape)


@torch.library.custom_op("radixserve::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul(x)


@_silu_and_mul_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


# --------------------------------------------------------------------------------------------------
# Torch references (the exact semantics of radixserve/layers/*)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None:
        x = x + residual
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # torch's fused kernel: one op, not five
        out = F.rms_norm(x, (x.shape[-1],), weight, eps)
        return out if residual is None else (out, x)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight * xf.to(x.dtype)) if x.dtype != torch.float32 else weight * xf
    return out if residual is None else (out, x)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max) if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else 0.0


def _cache_ref(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x in a KV cache of `dtype` (the semantics of KVPool.encode)."""
    m = _fp8_max(dtype)
    if not m:
        return x.to(dtype)
    return (x.float() / scale).clamp(-m, m).to(dtype)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor):
    """Out of place: returns the rotated (q, k) like RotaryEmbedding.forward."""
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    return _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)


# --------------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _quantize_tile(y, mask, rows, cols, Q, S, stride_q, n_rows, FP8_MAX: tl.constexpr):
        """Per-row FP8 of a [BLOCK_R, BLOCK_N] fp32 tile (already rounded to the activation dtype):
        kernels/fp8._quantize_rows_kernel's arithmetic."""
        y = tl.where(mask, y, 0.0)
        scale = tl.maximum(tl.max(tl.abs(y), 1), 1e-12) / FP8_MAX
        q = tl.minimum(tl.maximum(y / scale[:, None], -FP8_MAX), FP8_MAX)
        tl.store(Q + rows[:, None] * stride_q + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + rows, scale, mask=rows < n_rows)

    @triton.jit
    def _rmsnorm_kernel(X, R, W, Out, ResOut, n_rows, N, stride_x, stride_r, stride_o, stride_ro, eps,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr,
                        PDL: tl.constexpr = False, Q=None, S=None, FP8_MAX: tl.constexpr = 0.0):
        """BLOCK_R whole rows per program: wide rows (hidden 4096) take one program each, narrow
        ones (per-head q/k norm, D = 128) are batched so each program still moves ~8 KB. FP8_MAX > 0:
        the output goes to Q/S quantized per row instead (Out only names the dtype it is rounded to)."""
        pdl.trigger(PDL)
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded like torch's add
            tl.store(ResOut + rows[:, None] * stride_ro + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 1) / N + eps)
        normed = (xf * inv[:, None]).to(X.dtype.element_ty)
        w = tl.load(W + cols, mask=cols < N, other=0.0)
        out = w.to(tl.float32)[None, :] * normed.to(tl.float32)
        if FP8_MAX > 0:
            _quantize_tile(out.to(Out.dtype.element_ty).to(tl.float32), mask, rows, cols, Q, S, stride_o, n_rows,
                           FP8_MAX)
        else:
            tl.store(Out + rows[:, None] * stride_o + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Out, N, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl.trigger(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty)  # F.silu rounds to the dtype first
        tl.store(Out + row * stride_o + cols, (s.to(tl.float32) * u).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_quant_kernel(X, Q, S, N, stride_x, stride_q, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                                   PDL: tl.constexpr = False):
        """silu_and_mul of one whole row per program, rounded to X's dtype, then quantized per row."""
        pdl.trigger(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty)
        y = (s.to(tl.float32) * u).to(X.dtype.element_ty).to(tl.float32)
        _quantize_tile(y[None, :], mask[None, :], row + tl.arange(0, 1), cols, Q, S, stride_q, row + 1, FP8_MAX)

    @triton.jit
    def _to_cache(x, inv_scale, Dst, FP8_MAX: tl.constexpr):
        """x (already rounded to the activation dtype) in the cache's format: FP8 caches store
        x / scale, saturated to +-FP8_MAX (FP8_MAX 0: a 16/32-bit cache, a plain cast)."""
        if FP8_MAX > 0:
            y = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -FP8_MAX), FP8_MAX)
            return y.to(Dst.dtype.element_ty)
        return x.to(Dst.dtype.element_ty)

    @triton.jit
    def _rotate_heads(Src, Dst, src_off, dst_off, stride_src_h, stride_dst_h, n_heads, cos, sin, inv_scale,
                      HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, FP8_MAX: tl.constexpr):
        """Rotate-half of all heads of one token: [BLOCK_H, HALF] tiles for each half, fp32 math."""
        offs_h = tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_HALF)
        mask = (offs_h < n_heads)[:, None] & (offs_r < HALF)[None, :]
        src = Src + src_off + offs_h[:, None] * stride_src_h + offs_r[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(Src.dtype.element_ty)
        o2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(Src.dtype.element_ty)
        dst = Dst + dst_off + offs_h[:, None] * stride_dst_h + offs_r[None, :]
        tl.store(dst, _to_cache(o1, inv_scale, Dst, FP8_MAX), mask=mask)
        tl.store(dst + HALF, _to_cache(o2, inv_scale, Dst, FP8_MAX), mask=mask)

    @triton.jit
    def _rotary_kernel(Positions, CosSin, Q, QOut, K, V, KCache, VCache, Slots,
                       stride_cs, stride_qt, stride_qh, stride_qot, stride_qoh, stride_kt, stride_kh,
                       stride_vt, stride_vh, stride_kct, stride_kch, stride_vct, stride_vch, n_q_heads, n_k_heads,
                       k_inv_scale, v_inv_scale, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                       BLOCK_HK: tl.constexpr, FP8_MAX: tl.constexpr, PDL: tl.constexpr = False):
        """One program per token: rotated q into QOut, rotated k and plain v into the cache row Slots[t]."""
        pdl.trigger(PDL)
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(Positions + t).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_HALF)
        cos = tl.load(CosSin + pos * stride_cs + offs_r, mask=offs_r < HALF, other=0.0)
        sin = tl.load(CosSin + pos * stride_cs + HALF + offs_r, mask=offs_r < HALF, other=0.0)
        _rotate_heads(Q, QOut, t * stride_qt, t * stride_qot, stride_qh, stride_qoh, n_q_heads, cos, sin, 1.0,
                      HALF, BLOCK_HQ, BLOCK_HALF, 0)
        slot = tl.load(Slots + t).to(tl.int64)
        _rotate_heads(K, KCache, t * stride_kt, slot * stride_kct, stride_kh, stride_kch, n_k_heads,
                      cos, sin, k_inv_scale, HALF, BLOCK_HK, BLOCK_HALF, FP8_MAX)
        offs_h = tl.arange(0, BLOCK_HK)
        offs_d = tl.arange(0, 2 * BLOCK_HALF)
        mask = (offs_h < n_k_heads)[:, None] & (offs_d < 2 * HALF)[None, :]
        v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        tl.store(VCache + slot * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :],
                 _to_cache(v, v_inv_scale, VCache, FP8_MAX), mask=mask)


# --------------------------------------------------------------------------------------------------
# Public API


def _quantize_rows_twin(y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from radixserve.kernels.fp8 import quantize_rows
    y2 = y.reshape(-1, y.shape[-1])
    return quantize_rows(y2, dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
            quant: torch.dtype | None = None):
    """RMSNorm over the last dim. Without `residual`: returns normed(x). With it: returns
    (normed(x + residual), x + residual) — the drop-in for RMSNorm.forward. Out of place; `out` /
    `residual_out` (contiguous, x's shape; out in the promoted dtype of weight and x) may be given
    to reuse buffers — residual_out may alias residual (each row is read before it is written).
    quant (an FP8 dtype): normed(...) comes back as (q [rows, N], scale [rows, 1] fp32), quantized per row."""
    if quant is not None:
        return _rmsnorm_quant(x, weight, eps, residual, quant)
    if _trace_opaque(x) and out is None and residual_out is None and (residual is None or residual.dtype == x.dtype):
        if residual is None:
            return torch.ops.radixserve.rmsnorm(x, weight, eps)
        return tuple(torch.ops.radixserve.rmsnorm_add(x, residual, weight, eps))
    if not _use_triton(x) or (residual is not None and residual.dtype != x.dtype):
        res = rmsnorm_ref(x, weight, eps, residual)
        if out is None and residual_out is None:
            return res
        normed, new_res = (res, None) if residual is None else res
        normed = out.copy_(normed) if out is not None else normed
        if residual is None:
            return normed
        return normed, (residual_out.copy_(new_res) if residual_out is not None else new_res)
    return _rmsnorm_triton(x, weight, eps, residual, out, residual_out, None)


def _rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                   quant: torch.dtype):
    if not _use_triton(x) or (residual is not None and residual.dtype != x.dtype) or x.shape[-1] > 32768:
        res = rmsnorm_ref(x, weight, eps, residual)
        normed, new_res = (res, None) if residual is None else res
        q = _quantize_rows_twin(normed, quant)
        return q if residual is None else (q, new_res)
    return _rmsnorm_triton(x, weight, eps, residual, None, None, quant)


def _rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                    out: torch.Tensor | None, residual_out: torch.Tensor | None, quant: torch.dtype | None):
    """The Triton launch of rmsnorm: the normed rows into `out`, or quantized per row (quant) into (q, scale)."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if quant is not None:
        q = torch.empty((rows, N), dtype=quant, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        # Out is not written: it only names the dtype the normed rows are rounded to before quantizing
        out2 = x2 if out_dtype == x.dtype else torch.empty(1, dtype=out_dtype, device=x.device)
        stride_o, fp8_max = q.stride(0), _fp8_max(quant)
    else:
        q = scale = None
        if out is None:
            out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        out2 = out.view(-1, N)
        stride_o, fp8_max = out2.stride(0), 0.0
    if residual is not None:
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = residual_out if residual_out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ro2 = res_out.view(-1, N)
    else:
        r2 = ro2 = res_out = x2  # unused by the kernel
    if rows:
        block_n = triton.next_power_of_2(N)
        block_r = max(1, min(64, 4096 // block_n))
        tile = block_r * block_n
        _rmsnorm_kernel[(triton.cdiv(rows, block_r),)](
            x2, r2, weight, out2, ro2, rows, N, x2.stride(0), r2.stride(0), stride_o, ro2.stride(0), eps,
            BLOCK_R=block_r, BLOCK_N=block_n, HAS_RES=residual is not None, PDL=pdl.ENABLED, Q=q, S=scale,
            FP8_MAX=fp8_max, num_warps=4 if tile <= 4096 else (8 if tile <= 8192 else 16))
    normed = out if quant is None else (q, scale)
    return normed if residual is None else (normed, res_out)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, quant: torch.dtype | None = None):
    """silu(x[..., :N]) * x[..., N:] for x [..., 2N]; returns [..., N] (into `out` if given, contiguous).
    quant (an FP8 dtype): returns (q [rows, N], scale [rows, 1] fp32) instead, the rows quantized as rmsnorm's."""
    if quant is not None:
        N = x.shape[-1] // 2
        x2 = x.reshape(-1, 2 * N)
        if not _use_triton(x) or N > 32768:
            return _quantize_rows_twin(silu_and_mul_ref(x2), quant)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        q = torch.empty((x2.shape[0], N), dtype=quant, device=x.device)
        scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
        if x2.shape[0] and N:
            block = triton.next_power_of_2(N)
            _silu_and_mul_quant_kernel[(x2.shape[0],)](x2, q, scale, N, x2.stride(0), q.stride(0), BLOCK=block,
                                                       FP8_MAX=_fp8_max(quant), PDL=pdl.ENABLED,
                                                       num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16))
        return q, scale
    if _trace_opaque(x) and out is None:
        return torch.ops.radixserve.silu_and_mul(x)
    if not _use_triton(x):
        return silu_and_mul_ref(x) if out is None else out.copy_(silu_and_mul_ref(x))
    N = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, N)
    if x2.shape[0] and N:
        block = min(1024, triton.next_power_of_2(N))  # 8 bf16 per thread at 4 warps: 16-byte accesses
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(N, block))](
            x2, out2, N, x2.stride(0), out2.stride(0), BLOCK=block, PDL=pdl.ENABLED, num_warps=4)
    return out


def _rotary_launch(positions, q, q_out, k, v, cos_sin, k_cache, v_cache, slots, k_scale, v_scale) -> None:
    T, HQ, D = q.shape
    HK = k.shape[1]
    assert D % 2 == 0 and cos_sin.shape[-1] == D and k.shape[2] == D and k.shape[0] == T
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin.stride(-1) == 1
    if T == 0:
        return
    half = D // 2
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(T,)](
        positions, cos_sin, q, q_out, k, v, k_cache, v_cache, slots, cos_sin.stride(0),
        q.stride(0), q.stride(1), q_out.stride(0), q_out.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), HQ, HK,
        1.0 / k_scale, 1.0 / v_scale, HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=triton.next_power_of_2(HQ),
        BLOCK_HK=triton.next_power_of_2(HK), FP8_MAX=_fp8_max(k_cache.dtype), PDL=pdl.ENABLED,
        num_warps=4 if triton.next_power_of_2(HQ) * block_half <= 2048 else 8)


def rope_tables(positions: torch.Tensor, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU rotation's factors at `positions`: (cos, signed sin), each [T, 1, 2, D/2] float32, so that
    rotate-half is x * cos + x.flip(halves) * sin (`_rotate_cpu`). Every layer rotates the same positions,
    so the model computes them once a forward (ForwardBatch.rope)."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # [T, D/2]
    return torch.stack([cos, cos], dim=1)[:, None], torch.stack([-sin, sin], dim=1)[:, None]


def _rotate_cpu(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """HF rotate-half on x [T, H, D] in four ops: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], the same
    float32 arithmetic as _rotate_ref (x2 * -sin is x2 * sin negated exactly)."""
    t, h, d = x.shape
    xv = x.float().view(t, h, 2, d // 2)
    return torch.addcmul(xv * tables[0], xv.flip(2), tables[1]).view(t, h, d).to(x.dtype)


def rotary_and_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slots: torch.Tensor, q_out: torch.Tensor | None = None, k_scale: float = 1.0,
                        v_scale: float = 1.0, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotate q into q_out (default: in place) and write rotated k and plain v into k_cache/v_cache
    [num_slots, KVH, D] at `slots` [T] (cast to the cache dtype; an FP8 cache gets k / k_scale and
    v / v_scale, saturated: KVPool.encode), i.e. rotary + KVPool.store in one pass. k itself is left
    unrotated (the attention kernels read K from the cache only). Returns q_out. `tables`: rope_tables of
    `positions`, when the caller has them (CPU only)."""
    q_out = q if q_out is None else q_out
    if not _use_triton(q):  # q and k rotated as one tensor: on CPU each op costs microseconds of dispatch
        rotated = _rotate_cpu(torch.cat([q, k], dim=1), tables or rope_tables(positions, cos_sin))
        q_out.copy_(rotated[:, :q.shape[1]])
        k_cache[slots] = _cache_ref(rotated[:, q.shape[1]:], k_scale, k_cache.dtype)
        v_cache[slots] = _cache_ref(v, v_scale, v_cache.dtype)
        return q_out
    assert v.shape == k.shape and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert q_out.shape == q.shape and q_out.stride(-1) == 1
    _rotary_launch(positions, q, q_out, k, v, cos_sin, k_cache, v_cache, slots, k_scale, v_scale)
    return q_out


__all__ = ["HAS_TRITON", "rmsnorm", "rmsnorm_ref", "rope_tables", "rotary_and_store_kv", "rotary_ref",
           "silu_and_mul", "silu_and_mul_ref"]
