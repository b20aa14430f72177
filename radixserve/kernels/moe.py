"""Fused mixture-of-experts: the experts' SwiGLU MLPs for every (token, chosen expert) pair, in two grouped
GEMMs, with a torch twin.

    fused_moe(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k]) -> [T, H]
    out[t] = sum_j topk_weights[t, j] * (silu(x[t] @ gate[e]^T) * (x[t] @ up[e]^T)) @ w2[e]^T,  e = topk_ids[t, j]

w13 stacks each expert's gate rows [0, I) over its up rows [I, 2I), as MergedColumnParallelLinear does for the
dense MLP. An id < 0 marks a pair whose expert lives on another rank (expert parallelism): it contributes 0.
FP8 experts (W8A16): w13 / w2 in float8_e4m3fn with fp32 scales [E, rows, K / group_k] (one scale per row and
group of group_k input columns: 128x128 checkpoint blocks expanded over rows, or one group per row for
`--quantization fp8`); each weight tile is dequantized to the activations' dtype right after its load.

The Triton path. The T*k (token, expert) pairs are "entries" e = t*k + j. With few entries (decode), each
entry is its own block of rows (one valid row, the rest masked), so nothing needs sorting and each block reads
its expert's weights once. With many (prefill), `align_by_expert` sorts the entries by expert and pads every
expert's run to a multiple of BLOCK_M, so each block of rows belongs to one expert and the weights of an expert
are read once per block of BLOCK_M pairs. Then:
    1. gate_up: C1[e] = silu_and_mul(x[e // k] @ w13[expert]^T): one GEMM, both halves accumulated side by side
       and the activation applied before the store (the 2I-wide product never reaches memory).
    2. down: C2[e] = w[e] * (C1[e] @ w2[expert]^T), the routing weight applied in the epilogue.
    3. out[t] = sum_j C2[t*k + j], in fp32, in a fixed order (no atomics: the same result every run).
Both GEMMs run from static shapes with no host synchronisation, so they are captured in CUDA graphs.

Rounding follows the layers the unfused model would run (linear outputs rounded to the dtype, silu rounded
before the multiply, the weighted expert output rounded), so the twin and the kernel agree to the dtype's
precision; the sum over the k experts is one fp32 reduction rounded once.

Block configurations live in MOE_CONFIGS (tuned on an H200, benchmarks/moe_tune.py), chosen by tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from radixserve.kernels.fused import HAS_TRITON, _use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------------------------------
# Torch reference


def topk_softmax_ref(logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's router: softmax over all experts in fp32, the k largest, renormalised to sum to 1 when asked,
    rounded to weights_dtype (None: kept in fp32)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if weights_dtype is None else weights.to(weights_dtype)), ids


def dequantize_expert(w: torch.Tensor, scale: torch.Tensor, group_k: int, dtype: torch.dtype) -> torch.Tensor:
    """One expert's fp8 weight [rows, K] with scales [rows, ceil(K / group_k)] -> `dtype` (math in fp32)."""
    return (w.float() * scale.float().repeat_interleave(group_k, dim=-1)[:, : w.shape[-1]]).to(dtype)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, scales: tuple | None = None) -> torch.Tensor:
    """The CPU path and the kernel's oracle: per expert present, its tokens through its MLP (as HF computes
    it), each pair's weighted output kept apart, then the k outputs of every token summed in fp32.
    scales (FP8 experts): (w13_scale, w2_scale, group_k of w13, group_k of w2)."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    out_k = torch.zeros(T * k, x.shape[-1], dtype=x.dtype, device=x.device)
    w = topk_weights.reshape(-1)
    for e in torch.unique(flat[flat >= 0]).tolist():
        entries = (flat == e).nonzero().squeeze(1)
        a, b = w13[e], w2[e]
        if scales is not None:
            a = dequantize_expert(a, scales[0][e], scales[2], x.dtype)
            b = dequantize_expert(b, scales[1][e], scales[3], x.dtype)
        h = F.linear(x[entries // k], a)
        gate, up = h.chunk(2, dim=-1)
        down = F.linear(F.silu(gate) * up, b)
        out_k[entries] = (down.float() * w[entries, None].float()).to(x.dtype)
    return out_k.view(T, k, -1).float().sum(1).to(x.dtype)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries sorted by expert, each expert's run padded to a multiple of block_m.

    Returns sorted_ids [L] (entry index, or T*k for padding), expert_ids [L // block_m] (the expert of each
    block; num_experts past the end) and num_valid [1] (the padded length in use). L is a static bound,
    T*k + min(E, T*k) * (block_m - 1) rounded up to block_m, and nothing here synchronises with the host,
    so the launch it feeds can be captured in a CUDA graph. Entries with id < 0 are left out."""
    flat = topk_ids.reshape(-1).long()
    n, E, dev = flat.numel(), num_experts, flat.device
    key = torch.where(flat < 0, E, flat)  # other ranks' experts: a bucket after the last
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(key, stable=True)
    skey = key[order]
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[skey]
    length = -(-(n + min(E, n) * (block_m - 1)) // block_m) * block_m
    starts = torch.cat([ends.new_zeros(1), ends])  # bucket E starts at `length`'s dump slot below
    dest = torch.where(skey < E, starts[skey] + rank, length)
    sorted_ids = torch.full((length + 1,), n, dtype=torch.int64, device=dev).scatter_(0, dest, order)[:length]
    blocks = torch.arange(0, length, block_m, device=dev)
    expert_ids = torch.searchsorted(ends, blocks, right=True)
    return sorted_ids, expert_ids, ends[-1:]


# --------------------------------------------------------------------------------------------------
# Block configurations: (max tokens, config); the first row whose bound covers T is used.
# SORTED False: one entry per block (decode). Tuned on an H200 for Qwen3-30B-A3B (E 128, k 8, H 2048,
# I 768, bf16) with benchmarks/moe_tune.py (benchmarks/results/moe_tune_h200.json); other shapes use it too.

def _cfg(sorted_: bool, bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    return dict(SORTED=sorted_, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


MOE_CONFIGS: list[tuple[int, dict]] = [
    (1, _cfg(False, 16, 64, 128, 4, 4)),
    (4, _cfg(False, 16, 32, 128, 4, 4)),
    (16, _cfg(False, 16, 64, 128, 4, 4)),
    (32, _cfg(True, 16, 32, 128, 4, 4)),
    (64, _cfg(True, 16, 64, 128, 4, 4)),
    (256, _cfg(True, 32, 64, 64, 4, 4)),
    (1024, _cfg(True, 64, 128, 64, 8, 4)),
    (1 << 62, _cfg(True, 128, 128, 64, 8, 3)),
]


def moe_config(num_tokens: int) -> dict:
    return next(cfg for bound, cfg in MOE_CONFIGS if num_tokens <= bound)


# --------------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _topk_softmax_kernel(Logits, W, Ids, E, stride_l, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                             RENORM: tl.constexpr):
        """One token's router row: softmax (fp32), top-k by k max passes (the lowest id wins a tie), the k
        weights renormalised in fp32 (a first pass sums them) and rounded once to W's dtype: the five torch
        kernels of topk_softmax_ref in one launch."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_E)
        mask = offs < E
        x = tl.load(Logits + t * stride_l + offs, mask=mask, other=-float("inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, 0))
        p = tl.where(mask, p, 0.0)
        p = p / tl.sum(p, 0)
        total = 1.0
        if RENORM:
            total = 0.0
            q = p
            for _ in tl.static_range(TOP_K):
                v = tl.max(q, 0)
                total += v
                q = tl.where(offs == tl.min(tl.where(q == v, offs, BLOCK_E), 0), -1.0, q)
        for j in tl.static_range(TOP_K):
            v = tl.max(p, 0)
            idx = tl.min(tl.where(p == v, offs, BLOCK_E), 0)
            tl.store(Ids + t * TOP_K + j, idx.to(tl.int64))
            tl.store(W + t * TOP_K + j, (v / total).to(W.dtype.element_ty))
            p = tl.where(offs == idx, -1.0, p)

    @triton.jit
    def _moe_gemm_kernel(A, B, C, SortedIds, ExpertIds, NumValid, TopkIds, TopkW, BS,
                         N, K, num_entries, top_k, num_experts,
                         stride_am, stride_be, stride_bn, stride_cm, stride_se, stride_sn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SORTED: tl.constexpr, GATED: tl.constexpr, A_PER_TOKEN: tl.constexpr,
                         MUL_WEIGHT: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP_K: tl.constexpr):
        """C[entry, n] for the entries of one block of rows and BLOCK_N columns, against one expert's B.

        B is [E, rows, K] with unit stride along K; GATED: rows [0, N) are the gate and [N, 2N) the up
        projection, both accumulated here and combined as silu(gate) * up. A_PER_TOKEN: A's row of an entry
        is its token (entry // top_k), else the entry itself. HAS_SCALE: B is fp8 with scales BS [E, rows,
        K / GROUP_K]; BLOCK_K divides GROUP_K, so one scale per row covers each loaded tile."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs = tl.arange(0, BLOCK_M)
        if SORTED:
            if pid_m * BLOCK_M >= tl.load(NumValid):
                return
            entries = tl.load(SortedIds + pid_m * BLOCK_M + offs)
            expert = tl.load(ExpertIds + pid_m)
        else:
            entries = tl.where(offs == 0, pid_m, num_entries)
            expert = tl.load(TopkIds + pid_m)
        if (expert < 0) | (expert >= num_experts):
            return
        mask_m = entries < num_entries
        rows = entries // top_k if A_PER_TOKEN else entries
        rows = tl.where(mask_m, rows, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = B + expert.to(tl.int64) * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s_ptrs = BS + expert.to(tl.int64) * stride_se + offs_n.to(tl.int64) * stride_sn
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            mask_k = offs_k < K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if HAS_SCALE:
                group = (k0 * BLOCK_K) // GROUP_K
                s = tl.load(s_ptrs + group, mask=mask_n, other=0.0)
                b = (b.to(tl.float32) * s[None, :]).to(A.dtype.element_ty)
            acc = tl.dot(a, b, acc)
            if GATED:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if HAS_SCALE:
                    s_up = tl.load(s_ptrs + N * stride_sn + group, mask=mask_n, other=0.0)
                    b_up = (b_up.to(tl.float32) * s_up[None, :]).to(A.dtype.element_ty)
                acc_up = tl.dot(a, b_up, acc_up)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        dt = C.dtype.element_ty
        if GATED:  # as silu_and_mul on the rounded linear outputs: silu rounded, then the product
            g = acc.to(dt).to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            acc = s * acc_up.to(dt).to(tl.float32)
        if MUL_WEIGHT:
            w = tl.load(TopkW + tl.where(mask_m, entries, 0), mask=mask_m, other=0.0).to(tl.float32)
            acc = acc.to(dt).to(tl.float32) * w[:, None]
        c_ptrs = C + tl.where(mask_m, entries, 0).to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(dt), mask=mask_m[:, None] & mask_n[None, :])


def _launch(a, b, c, align, topk_ids, topk_w, n, k, top_k, num_experts, cfg, gated, a_per_token, mul_weight,
            scale=None, group_k=0):
    sorted_ids, expert_ids, num_valid = align
    entries = topk_ids.numel()
    blocks = expert_ids.numel() if cfg["SORTED"] else entries
    grid = (blocks, triton.cdiv(n, cfg["BLOCK_N"]))
    block_k = cfg["BLOCK_K"]
    if scale is not None and group_k < k:  # several groups along K: a tile must not straddle two
        block_k = min(block_k, group_k)
        if group_k % block_k or block_k < 16:
            raise ValueError(f"FP8 expert scale groups of {group_k} columns: need a multiple of 16 (128 blocks)")
    _moe_gemm_kernel[grid](
        a, b, c, sorted_ids, expert_ids, num_valid, topk_ids, topk_w, b if scale is None else scale,
        n, k, entries, top_k, num_experts,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        0 if scale is None else scale.stride(0), 0 if scale is None else scale.stride(1),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, SORTED=cfg["SORTED"],
        GATED=gated, A_PER_TOKEN=a_per_token, MUL_WEIGHT=mul_weight, HAS_SCALE=scale is not None,
        GROUP_K=max(group_k, 1), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, has_remote: bool = False, config: dict | None = None,
                     scales: tuple | None = None) -> torch.Tensor:
    """has_remote: some ids may be < 0 (expert parallelism); their rows are zeroed instead of left unwritten.
    scales: FP8 experts, as in fused_moe_ref."""
    T, top_k = topk_ids.shape
    E, two_i, H = w13.shape
    inter = two_i // 2
    assert x.shape == (T, H) and w2.shape == (E, H, inter) and x.stride(-1) == 1
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    cfg = config or moe_config(T)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()  # int32 or int64: the kernel loads either
    weights = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    if cfg["SORTED"]:
        align = align_by_expert(ids, E, cfg["BLOCK_M"])
    else:
        dummy = ids.new_zeros(1)
        align = (dummy, dummy, dummy)
    n = T * top_k
    # other ranks' pairs (id < 0) are never written: zeros, so that the sum below skips them
    empty = torch.zeros if has_remote else torch.empty
    c1 = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    c2 = empty((n, H), dtype=x.dtype, device=x.device)
    s13, s2, g13, g2 = scales if scales is not None else (None, None, 0, 0)
    if n:
        _launch(x, w13, c1, align, ids, weights, inter, H, top_k, E, cfg, True, True, False, s13, g13)
        _launch(c1, w2, c2, align, ids, weights, H, inter, top_k, E, cfg, False, False, True, s2, g2)
    return c2.view(T, top_k, H).sum(1)  # accumulated in fp32 by torch, rounded once


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's (weights [T, k], ids [T, k] int64): one Triton kernel on CUDA, the torch twin elsewhere.
    The weights are rounded once, after the renormalisation (in fp32 until then, as in the twin)."""
    if not _use_triton(logits) or logits.dim() != 2 or logits.stride(-1) != 1:
        return topk_softmax_ref(logits, top_k, renormalize, weights_dtype)
    T, E = logits.shape
    w = torch.empty((T, top_k), dtype=weights_dtype or torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    if T:
        _topk_softmax_kernel[(T,)](logits, w, ids, E, logits.stride(0), TOP_K=top_k,
                                   BLOCK_E=triton.next_power_of_2(E), RENORM=renormalize,
                                   num_warps=1 if E <= 256 else 4)
    return w, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, has_remote: bool = False, scales: tuple | None = None) -> torch.Tensor:
    """Triton on CUDA (and under TRITON_INTERPRET=1), the torch twin elsewhere. Inside torch.compile it is one
    opaque custom op (radixserve::fused_moe), so the traced graph does not break at the data-dependent
    expert loop or the kernel launches."""
    s13, s2, g13, g2 = scales if scales is not None else (None, None, 0, 0)
    if torch.compiler.is_compiling():
        return torch.ops.radixserve.fused_moe(x, w13, w2, topk_weights, topk_ids, has_remote, s13, s2, g13, g2)
    return _fused_moe_eager(x, w13, w2, topk_weights, topk_ids, has_remote, s13, s2, g13, g2)


def _fused_moe_eager(x, w13, w2, topk_weights, topk_ids, has_remote, s13, s2, g13, g2) -> torch.Tensor:
    scales = None if s13 is None else (s13, s2, g13, g2)
    if _use_triton(x) or (HAS_TRITON and x.is_cuda):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, has_remote, scales=scales)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, scales)


@torch.library.custom_op("radixserve::fused_moe", mutates_args=())
def fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor, has_remote: bool, w13_scale: torch.Tensor | None,
                 w2_scale: torch.Tensor | None, group_k13: int, group_k2: int) -> torch.Tensor:
    return _fused_moe_eager(x, w13, w2, topk_weights, topk_ids, has_remote, w13_scale, w2_scale, group_k13, group_k2)


@fused_moe_op.register_fake
def _(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
      has_remote: bool, w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None, group_k13: int,
      group_k2: int) -> torch.Tensor:
    return torch.empty_like(x)


__all__ = ["MOE_CONFIGS", "align_by_expert", "dequantize_expert", "fused_moe", "fused_moe_ref", "fused_moe_triton",
           "moe_config", "topk_softmax", "topk_softmax_ref"]
