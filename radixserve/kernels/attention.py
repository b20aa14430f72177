"""Triton attention kernels over the paged KV pool: flash-decoding for decode, a causal
flash-attention for extend/prefill. Both read K/V through `req_to_token` slot gathers, so any page
size works (slots are per token) and the prefix and the freshly stored tokens are read alike.

Decode (one query token per request)
    Decode is memory bound: every step streams the whole KV of every request once. Two choices
    follow from that:
    * GQA grouping. One program serves all G query heads that share a KV head, so each K/V tile
      is loaded once and used G times (tl.dot of a [G, D] query block with the [BLOCK_N, D] tile).
      tl.dot needs M >= 16, so the G rows are padded to BLOCK_H = max(16, next_pow2(G)); the extra
      rows are masked and cost only tensor-core time, which decode has to spare.
    * Split-K along the sequence (flash-decoding). With B * KV_HEADS programs alone a small batch
      cannot fill 132 SMs, so stage 1 runs on a (B, KV_HEADS, NUM_SPLITS) grid, each program
      producing a partial (log-sum-exp, normalised acc) for its span, and stage 2 merges the
      splits. NUM_SPLITS depends only on the batch size and the head count (host-known shapes),
      never on seq_lens: the launch has no host sync and a CUDA graph captured for a batch size
      replays correctly for any lengths. Each split covers ceil(span / NUM_SPLITS) tokens rounded
      up to BLOCK_N, computed on the device; trailing splits of short sequences are simply empty
      (they write lse = -inf and stage 2 skips reading them). With a single split (large batches)
      stage 1 writes the final output directly and stage 2 is not launched.

Extend (ragged prefill, possibly over a cached prefix)
    Compute bound: the grid is (head, query block) with the query blocks of all requests packed
    into one flat axis, mapped to (request, block) by a small on-device table built once per batch
    (`extend_block_table`). Its length is cdiv(T, BLOCK_M) + B, an upper bound known from shapes,
    so nothing is read back to the host; surplus programs exit at once. Blocks of one request are
    issued last-first (the longest causal rows start first, which shortens the tail). Head is the
    fastest grid axis so the programs of one GQA group run together and hit the same K/V in L2.
    Keys strictly before the block's first query position need no causal mask (first loop); only
    the diagonal blocks pay for it (second loop).

All softmax math is fp32 in the log2 domain (scale * log2(e) folded into the logits, exp2).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from radixserve.kernels import pdl

LOG2E = 1.4426950408889634
MAX_DECODE_SPLITS = 64


# --------------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _gather_rows(base, rows, stride, offs_d, row_mask, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_ROW_MASK: tl.constexpr):
    """Load tile[i, :] = base[rows[i] * stride + 0:D]. Masks are built only where needed so the
    common case (D a power of two, full block) compiles to unmasked, vectorised loads."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if BLOCK_D == D:
        if HAS_ROW_MASK:
            tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    else:
        if HAS_ROW_MASK:
            tile = tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return tile


@triton.jit
def _softmax_step(qk, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One online-softmax update with logits `qk` (log2 domain, masked entries -inf). Rows whose
    logits are all -inf so far (possible under a sliding window) keep m = -inf without NaNs."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return m_new, l_i, acc


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run in tf32 otherwise; 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device | str | None) -> int:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    return 8  # interpreter on CPU: a few splits still exercise the merge, without 1000s of programs


# --------------------------------------------------------------------------------------------------
# Decode


def decode_num_splits(batch: int, kv_heads: int, device: torch.device | str | None = None) -> int:
    """NUM_SPLITS for a decode batch: enough (B, KV_HEAD, split) programs for ~4 per SM (several
    resident CTAs per SM hide the gather latency), a power of two (stage 2 reduces with one
    tl.arange), at most MAX_DECODE_SPLITS. A function of shapes only, so graph-capturable."""
    want = -(-4 * _num_sms(device) // max(batch * kv_heads, 1))
    return max(1, min(MAX_DECODE_SPLITS, triton.next_power_of_2(want)))


def decode_scratch_numel(max_batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                         device: torch.device | str | None = None) -> tuple[int, int]:
    """Elements of the fp32 (mid_o, mid_lse) scratch that any batch <= max_batch needs. B * splits
    is not monotone in B, so take the max over all batch sizes (cheap: a Python loop)."""
    worst = max(b * decode_num_splits(b, num_kv_heads, device) for b in range(1, max_batch + 1))
    return worst * num_heads * head_dim, worst * num_heads


@triton.jit
def _decode_stage1(Q, K, V, Out, MidO, MidLse, ReqToToken, ReqRows, SeqLens,
                   stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                   stride_ob, stride_oh, stride_r2t, sm_scale_log2, window, v_scale,
                   NUM_HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr = False,
                   FP16_DOT: tl.constexpr = False):
    pdl.trigger(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    row = tl.load(ReqRows + b)
    kv_lo = 0
    if HAS_WINDOW:  # the query (position seq_len - 1) sees keys > seq_len - 1 - window
        kv_lo = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = kv_lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * G + offs_g
    mask_g = offs_g < G
    q = _gather_rows(Q + b * stride_qb, heads, stride_qh, offs_d, mask_g, D, BLOCK_D, True)
    if FP16_DOT:  # an FP8 pool: e4m3/e5m2 -> fp16 is one exact conversion, bf16 q -> fp16 is exact in range
        q = q.to(tl.float16)
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    r2t = ReqToToken + row * stride_r2t

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < end
        slots = tl.load(r2t + pos, mask=mask_n, other=0)
        k = _gather_rows(k_base, slots, stride_ks, offs_d, mask_n, D, BLOCK_D, True).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        v = _gather_rows(v_base, slots, stride_vs, offs_d, mask_n, D, BLOCK_D, True).to(q.dtype)
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (v_scale / l_safe)[:, None]
    mask_out = mask_g[:, None] & (offs_d[None, :] < D)
    if NUM_SPLITS == 1:
        o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_out)
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        mid = (b * NUM_HEADS + heads) * NUM_SPLITS + split  # [BLOCK_H] rows of mid_lse
        tl.store(MidLse + mid, lse, mask=mask_g)
        tl.store(MidO + mid[:, None] * D + offs_d[None, :], out, mask=mask_out)


@triton.jit
def _decode_stage2(Out, MidO, MidLse, stride_ob, stride_oh, NUM_HEADS: tl.constexpr, D: tl.constexpr,
                   BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    """Merge the splits of one (request, head): out = sum_s w_s * o_s / sum_s w_s, w_s = 2^(lse_s - max)."""
    pdl.trigger(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mid = (b * NUM_HEADS + h) * NUM_SPLITS + offs_s
    lse = tl.load(MidLse + mid)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # seq_len 0 (graph padding): output zeros, not NaN
    w = tl.exp2(lse - m)
    live = lse > float("-inf")  # empty splits were not written this step: do not even read them
    o = tl.load(MidO + mid[:, None] * D + offs_d[None, :], mask=live[:, None] & (offs_d[None, :] < D),
                other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)


def decode_config(head_dim: int, kv_dtype: torch.dtype | None = None, num_splits: int = 1) -> dict:
    """Stage-1 launch config. Split-heavy launches (small batches: many programs over short spans) keep
    BLOCK_N 64, so a 128-dim K and V tile are 16 KB each in bf16 and two pipeline stages fit with several
    CTAs per SM; for D <= 64 a 128-token tile moves the same bytes per iteration. With few splits (batch
    >= ~17 at 8 KV heads), each program streams a whole sequence and 128-token tiles pay: on the H200 at
    batch 256 over 300-1500 tokens, 0.236 against 0.298 ms in bf16 (90.8 % of the copy bandwidth), and for
    an FP8 pool, with three stages and the fp16 dot, 0.206 against 0.290 ms
    (benchmarks/results/decode_attn_sweep_h200.json; benchmarks/decode_attn_sweep.py re-times it), and with
    two warps instead of four 0.181 ms (decode_attn_sweep_large_batch_h200.json; bf16 stays best at four)."""
    fp8 = kv_dtype is not None and kv_dtype.itemsize == 1
    if head_dim <= 64 or num_splits <= 4:
        return {"BLOCK_N": 128, "num_warps": 2 if fp8 else 4, "num_stages": 3 if fp8 else 2, "FP16_DOT": fp8}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
                     req_rows: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     sliding_window: int | None = None, num_splits: int | None = None,
                     mid_o: torch.Tensor | None = None, mid_lse: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, config: dict | None = None, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """Attention of one new token per request over its paged KV.

    An FP8 pool is read as stored and upcast in registers: k_scale folds into the softmax scale and
    v_scale into the output (a stored value times its scale is the real one; KVPool).

    q [B, H, D]; k_buf/v_buf [num_slots, KVH, D] (one layer of the pool); req_to_token [rows, ctx]
    int64; req_rows, seq_lens [B] int64 (seq_len counts the new token, already stored). mid_o /
    mid_lse: optional flat fp32 scratch of at least B*H*S*D / B*H*S elements (S = num_splits),
    which must outlive a captured CUDA graph. Returns out [B, H, D] in q's dtype.
    """
    B, H, D = q.shape
    KVH = k_buf.shape[1]
    assert H % KVH == 0 and k_buf.shape[2] == D and q.stride(-1) == 1
    assert k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1 and req_to_token.stride(-1) == 1
    G = H // KVH
    S = num_splits or decode_num_splits(B, KVH, q.device)
    if out is None:
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if S > 1:
        if mid_o is None:
            mid_o = torch.empty(B * H * S * D, dtype=torch.float32, device=q.device)
            mid_lse = torch.empty(B * H * S, dtype=torch.float32, device=q.device)
        assert mid_o.numel() >= B * H * S * D and mid_lse.numel() >= B * H * S
    else:
        mid_o = mid_lse = out  # unused by the kernel
    if B == 0:
        return out
    cfg = config or decode_config(D, k_buf.dtype, S)
    block_d = triton.next_power_of_2(D)
    has_window = bool(sliding_window) and sliding_window > 0
    _decode_stage1[(B, KVH, S)](
        q, k_buf, v_buf, out, mid_o, mid_lse, req_to_token, req_rows, seq_lens,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0), scale * k_scale * LOG2E,
        int(sliding_window) if has_window else 0, float(v_scale),
        NUM_HEADS=H, G=G, D=D, BLOCK_H=max(16, triton.next_power_of_2(G)), BLOCK_D=block_d,
        BLOCK_N=cfg["BLOCK_N"], NUM_SPLITS=S, HAS_WINDOW=has_window, DOT_PREC=_dot_precision(q.dtype),
        PDL=pdl.ENABLED, FP16_DOT=bool(cfg.get("FP16_DOT")) and k_buf.element_size() == 1 and q.dtype != torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if S > 1:
        _decode_stage2[(B, H)](out, mid_o, mid_lse, out.stride(0), out.stride(1), NUM_HEADS=H, D=D,
                               BLOCK_D=block_d, NUM_SPLITS=S, PDL=pdl.ENABLED,
                               num_warps=4 if S * block_d <= 4096 else 8)
    return out


# --------------------------------------------------------------------------------------------------
# Extend


def extend_config(head_dim: int, max_extend_len: int | None = None) -> dict:
    """Block sizes for the extend kernel on Hopper: BLOCK_M 128 x BLOCK_N 64 with 8 warps keeps the
    [128, D] fp32 accumulator at <= 64 registers/thread for D <= 128 and the Q tile + 2 stages of
    K/V well under the shared-memory limit. Short extends (mostly decode-like chunks) and large
    heads use BLOCK_M 64 / 4 warps to avoid idle rows and register spills."""
    small = head_dim > 128 or (max_extend_len is not None and max_extend_len <= 64)
    return {"BLOCK_M": 64 if small else 128, "BLOCK_N": 64, "num_warps": 4 if small else 8, "num_stages": 2}


def extend_block_table(extend_lens: torch.Tensor, num_tokens: int, block_m: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block_req, block_idx, q_starts), all on extend_lens' device with no host sync.

    Flat program p < cdiv(T, BLOCK_M) + B handles query block block_idx[p] of request block_req[p]
    (-1: nothing to do). Blocks of a request are listed last-first. q_starts[b] = first row of
    request b in the packed q."""
    B = extend_lens.numel()
    dev = extend_lens.device
    ext = extend_lens.to(torch.int64)
    nblk = (ext + block_m - 1) // block_m
    cum = torch.cumsum(nblk, 0)
    pid = torch.arange(-(-num_tokens // block_m) + B, device=dev)
    req = torch.searchsorted(cum, pid, right=True)
    live = req < B
    req_c = req.clamp(max=max(B - 1, 0))
    local = pid - (cum - nblk)[req_c]
    block_idx = (nblk[req_c] - 1 - local).to(torch.int32)
    block_req = torch.where(live, req_c, -1).to(torch.int32)
    q_starts = (torch.cumsum(ext, 0) - ext).to(torch.int32)
    return block_req, block_idx, q_starts


@triton.jit
def _extend_kernel(Q, K, V, Out, ReqToToken, ReqRows, PrefixLens, ExtendLens, QStarts, BlockReq, BlockIdx,
                   stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
                   stride_r2t, sm_scale_log2, window, v_scale,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    h = tl.program_id(0)
    pid = tl.program_id(1)
    b = tl.load(BlockReq + pid)
    if b < 0:
        return
    mblk = tl.load(BlockIdx + pid)
    prefix = tl.load(PrefixLens + b).to(tl.int32)
    ext = tl.load(ExtendLens + b).to(tl.int32)
    q0 = tl.load(QStarts + b)
    row = tl.load(ReqRows + b)
    kvh = h // G

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ext
    q = _gather_rows(Q + h * stride_qh, q0 + offs_m, stride_qt, offs_d, mask_m, D, BLOCK_D, True)
    q_pos = prefix + offs_m  # absolute positions of this block's queries
    first = prefix + mblk * BLOCK_M
    hi = tl.minimum(first + BLOCK_M, prefix + ext)  # keys < hi are visible to some row
    mid = (first // BLOCK_N) * BLOCK_N  # keys < mid are visible to every row (causally)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(first - window + 1, 0) // BLOCK_N) * BLOCK_N
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    r2t = ReqToToken + row * stride_r2t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Off-diagonal blocks: whole tiles below the first query position, no causal mask.
    for n0 in range(lo, mid, BLOCK_N):
        pos = n0 + offs_n
        slots = tl.load(r2t + pos)
        k = _gather_rows(k_base, slots, stride_ks, offs_d, offs_n, D, BLOCK_D, False).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        if HAS_WINDOW:
            qk = tl.where(pos[None, :] > q_pos[:, None] - window, qk, float("-inf"))
        v = _gather_rows(v_base, slots, stride_vs, offs_d, offs_n, D, BLOCK_D, False).to(q.dtype)
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, DOT_PREC)
    # Diagonal blocks: causal (and window) mask; padded query rows see keys < hi, so no NaN rows.
    for n0 in range(mid, hi, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < hi
        slots = tl.load(r2t + pos, mask=mask_n, other=0)
        k = _gather_rows(k_base, slots, stride_ks, offs_d, mask_n, D, BLOCK_D, True).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        allowed = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        if HAS_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(allowed, qk, float("-inf"))
        v = _gather_rows(v_base, slots, stride_vs, offs_d, mask_n, D, BLOCK_D, True).to(q.dtype)
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, DOT_PREC)

    out = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    o_ptrs = Out + (q0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < D))


def extend_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, req_to_token: torch.Tensor,
                     req_rows: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     scale: float, sliding_window: int | None = None,
                     table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     config: dict | None = None, out: torch.Tensor | None = None, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of the packed new tokens q [T, H, D] (request b's rows sit at positions
    prefix_lens[b] + 0..extend_lens[b]-1) over each request's KV in the pool (prefix + new tokens,
    all already stored). `table`/`config` come from extend_block_table / extend_config (built once
    per batch by the backend); without them they are derived here. FP8 pools: as decode_attention.
    Returns [T, H, D]."""
    T, H, D = q.shape
    KVH = k_buf.shape[1]
    assert H % KVH == 0 and k_buf.shape[2] == D and q.stride(-1) == 1
    assert k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1 and req_to_token.stride(-1) == 1
    cfg = config or extend_config(D)
    if table is None:
        table = extend_block_table(extend_lens, T, cfg["BLOCK_M"])
    block_req, block_idx, q_starts = table
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    has_window = bool(sliding_window) and sliding_window > 0
    _extend_kernel[(H, block_req.numel())](
        q, k_buf, v_buf, out, req_to_token, req_rows, prefix_lens, extend_lens, q_starts, block_req, block_idx,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0), scale * k_scale * LOG2E,
        int(sliding_window) if has_window else 0, float(v_scale),
        G=H // KVH, D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=triton.next_power_of_2(D),
        HAS_WINDOW=has_window, DOT_PREC=_dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


__all__ = ["MAX_DECODE_SPLITS", "decode_attention", "decode_config", "decode_num_splits", "decode_scratch_numel",
           "extend_attention", "extend_block_table", "extend_config"]
