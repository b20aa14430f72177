"""FP8 arithmetic: quantize / dequantize in torch (the CPU twins and the references), and the Triton kernels
of the GPU path: the W8A16 GEMV (one token row) and GEMM tile (up to 63 rows) that small batches use, and
the per-token activation quantization in front of W8A8's `torch._scaled_mm`.

Scales follow the checkpoint convention: real value = fp8 value * scale (HF's `weight_scale` and
`weight_scale_inv` both multiply). A weight's scales are kept as `scale [N, G]`: one per output
row and per group of `group` input columns, G = ceil(K / group). Per-channel scaling is G = 1
(group = K); the 128x128 block layout of DeepSeek-V3 / Qwen3-FP8 is expanded at load to one row of
block scales per output row (group = 128), which costs K/32 bytes per row (3 % of the FP8 weight)
and lets TP split a projection anywhere, not only at block boundaries.

Why W8A16 for small batches: a decode step reads every weight once and does 2 FLOPs per weight
byte per token, so at batch <= 64 the matmul is bound by HBM and the win of FP8 is reading half
the bytes. cuBLASLt's FP8 GEMM is tuned for large shapes (at 1 x 14336 x 4096 on an H200 it moves
1.4 TB/s against bf16's 3.6); these kernels stream the FP8 tile and upcast it in registers (the GEMV
multiplies in fp32, the tile runs a 16-bit tensor-core dot), so the activation never needs quantizing.
"""
from __future__ import annotations

import os

import torch

from radixserve.kernels import pdl

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def to_fp8(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Saturating cast: torch's plain cast turns |x| > 448 into NaN (e4m3fn has no infinity)."""
    m = fp8_max(dtype)
    return x.float().clamp(-m, m).to(dtype)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row (per output channel of a weight, per token of an activation): (q, scale [R, 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / fp8_max(dtype)
    return to_fp8(x.float() / scale, dtype), scale


def quantize_blocks(w: torch.Tensor, block: tuple[int, int],
                    dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """A [N, K] weight in (b0 x b1) blocks, edge blocks partial: (q [N, K], scale [ceil(N/b0), ceil(K/b1)]),
    the layout of HF's `weight_scale_inv` (what tests and benchmarks write checkpoints with)."""
    n, k = w.shape
    b0, b1 = block
    nb, kb = -(-n // b0), -(-k // b1)
    padded = w.float().new_zeros(nb * b0, kb * b1)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, b0, kb, b1)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / fp8_max(dtype)
    q = to_fp8(tiles / scale[:, None, :, None], dtype).view(nb * b0, kb * b1)[:n, :k]
    return q.contiguous(), scale


def expand_group_scale(scale: torch.Tensor, k: int) -> torch.Tensor:
    """[N, G] group scales -> [N, K] per element (group = ceil(K / G); the last group may be partial)."""
    g = scale.shape[1]
    if g == 1:
        return scale.expand(-1, k)
    group = -(-k // g)
    return scale.repeat_interleave(group, dim=1)[:, :k]


def dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [N, K] fp8 with scale [N, G] -> [N, K] in `dtype` (math in fp32)."""
    return (w.float() * expand_group_scale(scale.float(), w.shape[1])).to(dtype)


def w8a16_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
              ) -> torch.Tensor:
    """x [M, K] (16/32-bit) times the dequantized weight: what the Triton kernel computes."""
    y = x.float() @ dequantize(w, scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w8a8_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None = None,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 product `torch._scaled_mm` computes: x quantized per token (or with a static scale),
    both operands exact in fp32 after dequantizing, one scale per weight row (G = 1)."""
    if input_scale is None:
        xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    else:
        xs = input_scale.float().reshape(1, 1)
        xq = to_fp8(x.reshape(-1, x.shape[-1]).float() / xs)
    return w8a8_quantized_ref(xq, xs, w, scale, bias, x.dtype).reshape(*x.shape[:-1], -1)


def w8a8_quantized_ref(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """w8a8_ref from the quantized activation xq [M, K] with its scales xs [M, 1] (or [1, 1])."""
    y = (xq.float() * xs) @ dequantize(w, scale).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


# --------------------------------------------------------------------------------------------------
# Triton W8A16 GEMM

if HAS_TRITON:

    @triton.jit
    def _w8a16_kernel(X, W, S, B, Y, M, N, K, G, stride_xm, stride_wn, stride_sn, stride_ym, M_BUCKET,
                      GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PREC: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] output tile, the whole K per program (no split-K: enough N tiles
        at the decode shapes, and no second pass). Per-channel scales multiply the fp32 accumulator
        once at the end; group scales multiply the upcast weight tile before the dot."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < K
            x = tl.load(X + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                        other=0.0)
            w = tl.load(W + offs_n[:, None] * stride_wn + k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                        other=0.0)
            if PER_CHANNEL:
                wt = w.to(X.dtype.element_ty)
            elif GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale per row
                s = tl.load(S + offs_n * stride_sn + k0 // GROUP, mask=mask_n, other=0.0)
                wt = (w.to(tl.float32) * s[:, None]).to(X.dtype.element_ty)
            else:
                s = tl.load(S + offs_n[:, None] * stride_sn + (k // GROUP)[None, :],
                            mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                wt = (w.to(tl.float32) * s).to(X.dtype.element_ty)
            acc = tl.dot(x, tl.trans(wt), acc, input_precision=DOT_PREC)
        if PER_CHANNEL:
            s = tl.load(S + offs_n * stride_sn, mask=mask_n, other=0.0)
            acc = acc * s[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


    def _tune_configs() -> list:
        """Candidates the CUDA path autotunes over per (M bucket, N, K): narrow-and-deep to wide tiles, so
        that N = 4096 (o_proj, down_proj) and N = 28672 (gate_up) both find enough programs and bytes in
        flight. The choice is cached per shape; CUDA graphs capture after the eager warm-up tuned it."""
        out = []
        for bn, bk, warps, stages in [(16, 256, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 4),
                                      (64, 128, 4, 5)]:
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
        return out

    _w8a16_tuned = triton.autotune(configs=_tune_configs(), key=["M_BUCKET", "N", "K", "G"], warmup=3,
                                   rep=10)(_w8a16_kernel)


    @triton.jit
    def _w8a16_gemv_kernel(X, W, S, B, Y, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                           GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                           EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PDL: tl.constexpr = False, PREFETCH_K: tl.constexpr = 2048,
                           TRIGGER_END: tl.constexpr = False):
        """y[m, n-tile] for one token row m: no tensor cores (a 16-row dot tile would be 15/16 padding at
        batch 1), the upcast weight tile times the broadcast activation accumulates in a [BLOCK_N, BLOCK_K]
        fp32 register tile, reduced across K once at the end. Programs run m fastest, so the M programs
        reading the same weight tile run together and all but the first are served by L2 (the engine uses
        it at M = 1 only: from M = 2 the 16-row dot tile was as fast or faster on the H200). A variant that
        kept a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator to read each tile once for several rows reached 43-68 %
        of the copy bandwidth at M = 1 (by shape), and the 8B decode step's products took 28.9 us on average
        with it against 17.8 us with this kernel (benchmarks/results/fp8_gemv3d_sweep_h200.json), so it
        was dropped.

        PDL (kernels/pdl.py): launched as a programmatic dependent, the program first asks for the first
        PREFETCH_K bytes of each of its weight rows into L2 (rows and columns clamped into the matrix),
        then waits for the previous kernel; the loop below finds those lines in L2. TRIGGER_END: each program
        lets the next programmatic dependent (the next GEMV, where no small kernel sits between them) launch
        once its loop is done, so that GEMV's prefetch overlaps this one's last wave."""
        pid = tl.program_id(0)
        m = pid % M
        pid_n = pid // M
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        if PDL:
            lines = tl.minimum(tl.arange(0, PREFETCH_K // 128) * 128, K - 1)
            rows = tl.minimum(offs_n, N - 1)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [W + rows[:, None] * stride_wn
                                      + lines[None, :]], dtype=tl.int32, is_pure=False, pack=1)
            tl.extra.cuda.gdc_wait()
        w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]
        x_ptrs = X + m.to(tl.int64) * stride_xm + offs_k
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs).to(tl.float32)
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy="evict_first")
            else:
                mask_k = k0 + offs_k < K
                x = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_first")
            wf = w.to(tl.float32)
            if not PER_CHANNEL:
                if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale per row
                    s = tl.load(S + offs_n * stride_sn + k0 // GROUP, mask=mask_n, other=0.0)
                    wf = wf * s[:, None]
                else:
                    s = tl.load(S + offs_n[:, None] * stride_sn + ((k0 + offs_k) // GROUP)[None, :],
                                mask=mask_n[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
                    wf = wf * s
            acc += wf * x[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if TRIGGER_END:
            tl.extra.cuda.gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
        if PER_CHANNEL:
            y = y * tl.load(S + offs_n * stride_sn, mask=mask_n, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(Y + m.to(tl.int64) * stride_ym + offs_n, y.to(Y.dtype.element_ty), mask=mask_n)


    def _gemv_configs() -> list:
        """Tiles that keep 4-16 KB of weight in flight per program: a few rows by a long K run, so N = 4096
        still makes 128-512 programs. Chosen per (M, N, K) by the eager warm-up, before graphs capture; the
        8 x 1024 deep-pipelined tiles are what the graph-timed sweep found best for the Llama-3 shapes."""
        out = []
        for bn, bk, warps, stages in [(8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 3),
                                      (8, 1024, 4, 2), (8, 1024, 4, 3), (8, 1024, 4, 4), (16, 512, 8, 3),
                                      (32, 512, 8, 2), (4, 1024, 4, 3)]:
            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
        return out

    _w8a16_gemv_tuned = triton.autotune(configs=_gemv_configs(), key=["M", "N", "K", "GROUP"], warmup=3,
                                        rep=10)(_w8a16_gemv_kernel)

GEMV_MAX_M = 1  # token rows up to which the GEMV kernel replaces the 16-row tensor-core tile


def w8a16_config(m: int, n: int, k: int) -> dict:
    """Tile sizes by shape. Decode (M <= 16): 16-row tiles (tl.dot's minimum), narrow N tiles so even
    N = 4096 makes 128+ programs to keep every SM streaming, long K tiles so each iteration moves
    8-16 KB of weight. Larger M: wider tiles, the weight tile reused across more rows."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 16 if n <= 8192 else 32
    if m > 32:
        block_n = 64
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 256 if m <= 32 else 128,
            "num_warps": 4, "num_stages": 4}


def w8a16_gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(w [N, K] fp8, scale [N, G])^T (+ bias), in x's dtype."""
    M, K = x.shape
    N, G = w.shape[0], scale.shape[1]
    assert w.shape[1] == K and scale.shape[0] == N and x.stride(-1) == 1 and w.stride(-1) == 1
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    group = -(-K // G)
    if M <= GEMV_MAX_M and (config is None or config.get("gemv")):
        return _w8a16_gemv(x, w, scale, bias, y, group, config)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    if config is None and x.is_cuda:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m))  # noqa: E731
        _w8a16_tuned[grid](
            x, w, scale, bias if bias is not None else scale, y, M, N, K, G, x.stride(0), w.stride(0), scale.stride(0),
            y.stride(0), min(triton.next_power_of_2(M), 128), GROUP=group, PER_CHANNEL=G == 1,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32")
        return y
    cfg = config or w8a16_config(M, N, K)
    if G > 1 and group % cfg["BLOCK_K"] and group & (group - 1) == 0 and group >= 16:
        cfg = {**cfg, "BLOCK_K": group}  # a power-of-two group (128): tiles within one group
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))
    _w8a16_kernel[grid](
        x, w, scale, bias if bias is not None else scale, y, M, N, K, G, x.stride(0), w.stride(0), scale.stride(0),
        y.stride(0), 1, GROUP=group, PER_CHANNEL=G == 1, HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


__all__ = ["FP8_DTYPES", "HAS_TRITON", "dequantize", "expand_group_scale", "fp8_max", "quantize_blocks",
           "quantize_rows", "to_fp8", "w8a16_config", "w8a16_gemm", "w8a16_ref", "w8a8_quantized_ref", "w8a8_ref"]


#: M = 1 GEMV tiles measured best per (N, K) inside CUDA graphs on the H200 for the Llama-3-8B shapes, each
#: GEMV behind an RMSNorm that triggers it as a programmatic dependent, as in a decode step
#: (`benchmarks/fp8_gemv_sweep.py --chain`, fp8_gemv_chain_sweep_h200.json, fa69235). The eager autotuner,
#: which times one launch at a time, picked tiles 1.1 us (qkv) and 2 us (LM head) slower than these, and
#: its pick can change between runs; shapes not in the table (other models, TP shards) still autotune.
GEMV_TABLE: dict[tuple[int, int], dict] = {
    (6144, 4096): {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2, "PREFETCH_K": 1024},  # qkv
    (4096, 4096): {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2, "PREFETCH_K": 2048},  # o
    (28672, 4096): {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 4, "PREFETCH_K": 2048},  # gate_up
    (4096, 14336): {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 4, "PREFETCH_K": 2048},  # down
    (128256, 4096): {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2, "PREFETCH_K": 2048},  # LM head
}


def _w8a16_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                group: int, config: dict | None) -> torch.Tensor:
    """The decode-sized product (M <= GEMV_MAX_M): on CUDA the GEMV_TABLE tile for the shape, else
    autotuned; `config` (BLOCK_N, BLOCK_K, num_warps, num_stages, optional PREFETCH_K) overrides both (the
    sweeps, and the interpreter tests on the CPU)."""
    M, K = x.shape
    N, G = w.shape[0], scale.shape[1]
    common = dict(GROUP=group, PER_CHANNEL=G == 1, HAS_BIAS=bias is not None, TRIGGER_END=pdl.ENABLED and x.is_cuda)
    args = (x, w, scale, bias if bias is not None else scale, y, M, N, K, x.stride(0), w.stride(0), scale.stride(0),
            y.stride(0))
    if config is None and x.is_cuda:
        config = GEMV_TABLE.get((N, K)) if G == 1 else None
        if config is None:
            # EVEN_K must hold for every candidate BLOCK_K: the largest is 1024
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * M,)  # noqa: E731
            _w8a16_gemv_tuned[grid](*args, **common, EVEN_K=K % 1024 == 0, PDL=pdl.ENABLED, **pdl.launch_kwargs())
            return y
    cfg = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "PREFETCH_K": 2048, **(config or {})}
    cfg.pop("gemv", None)
    if G > 1 and group % cfg["BLOCK_K"] and group & (group - 1) == 0 and group >= 16:
        cfg["BLOCK_K"] = group  # a power-of-two group (128): tiles within one group
    launch = dict(PDL=pdl.ENABLED, **pdl.launch_kwargs()) if x.is_cuda else {}
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * M,)
    _w8a16_gemv_kernel[grid](*args, **common, EVEN_K=K % cfg["BLOCK_K"] == 0, BLOCK_N=cfg["BLOCK_N"],
                             BLOCK_K=cfg["BLOCK_K"], PREFETCH_K=cfg["PREFETCH_K"], num_warps=cfg["num_warps"],
                             num_stages=cfg["num_stages"], **launch)
    return y


# --------------------------------------------------------------------------------------------------
# Triton per-token activation quantization (W8A8's input)

if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(X, Q, S, K, stride_x, stride_q, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        """One row per program, held in registers: amax, scale = amax / max, q = x / scale saturated, the
        arithmetic of quantize_rows in one kernel instead of its six."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FP8_MAX
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(Q + row * stride_q + offs, q.to(Q.dtype.element_ty), mask=mask)
        tl.store(S + row, scale)


def quantize_rows_fused(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows for a [M, K] activation in one Triton kernel (on CUDA; the torch twin elsewhere or when a
    row does not fit one program's registers)."""
    M, K = x.shape
    if not (HAS_TRITON and (x.is_cuda or x.device.type == "cpu" and _interpreting())) or K > 32768:
        return quantize_rows(x, dtype)
    q = torch.empty((M, K), dtype=dtype, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M:
        block = triton.next_power_of_2(K)
        _quantize_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), FP8_MAX=fp8_max(dtype), BLOCK=block,
                                    num_warps=4 if block <= 4096 else (8 if block <= 8192 else 16))
    return q, s


def _interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1, the CPU tests of these kernels)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
