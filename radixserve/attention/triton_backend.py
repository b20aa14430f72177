"""Triton attention backend: flash-decoding for decode batches, causal flash-attention for extend.

Same interface and semantics as TorchAttentionBackend (the oracle its GPU tests compare against);
the kernels live in radixserve/kernels/attention.py. On a device Triton cannot drive (CPU without
TRITON_INTERPRET=1, or triton not installed) every call is delegated to the torch backend, so
`--attention-backend triton` never breaks a CPU run.

Decode and CUDA graphs
----------------------
A decode step does no host work that depends on data: `init_forward_metadata` only records the
launch shape (batch size -> NUM_SPLITS, a pure function of shapes), and `forward` passes
fb.req_rows, fb.seq_lens and fb.req_to_token straight to the kernels, which read lengths and
slots on the device. The split scratch (fp32 partial outputs and log-sum-exps) is owned by the
backend and reused by every layer and every step. So a graph captured for batch size `bs` replays
correctly for new lengths as long as the static tensors it captured are refreshed in place.

What the CUDA graph runner must do:
  1. Recommended, once before capturing: `backend.reserve_decode(max_bs, num_heads, num_kv_heads,
     head_dim, device)` (per-rank head counts) so the scratch is sized for every bs up front.
     Without it the scratch grows during the eager warm-ups, which is also correct: growth keeps
     retired buffers alive for graphs that point at them (only memory is wasted), and growth
     during a capture logs a warning.
  2. Per captured `bs`: build a static decode ForwardBatch (is_decode=True) whose input_ids,
     positions, out_slots, req_rows, seq_lens (int64, [bs]) and logits_idx (arange(bs)) are static
     device tensors; prefix_lens/extend_lens may be static too (decode never reads them), and
     max_seq_len is ignored. Warm up eagerly (Triton compiles there), then capture `model(fb)`;
     `init_forward_metadata(fb)` may run inside or outside the capture (for decode it launches no
     device work).
  3. Per replay: copy the real batch into the first B entries of input_ids, positions, out_slots,
     req_rows and seq_lens, and fill the padding entries [B:bs] with input_ids=0, positions=0,
     out_slots=0 (the padding slot), req_rows=any valid row (e.g. 0) and seq_lens=1 (0 also
     works: that row then outputs zeros). Nothing else: no metadata rebuild, no host reads.

Extend
------
`init_forward_metadata` builds, on the device, the flat query-block table (one entry per
(request, BLOCK_M query block), its length cdiv(T, BLOCK_M) + B known from shapes) and each
request's first row in the packed q; fb.max_extend_len (a host int) only picks the block config.

Mixed batches (fb.decode_tail > 0, --enable-mixed-chunk): the prompt part goes through the extend
kernel and the decode tail through the decode kernel, each writing its rows of one output. The
extend kernel gives each request at least one BLOCK_M-row query block, so a decode request in it
computes BLOCK_M - 1 padding rows against its whole KV, and it walks the KV in one program where
the decode kernel splits it: on the H200 a 2,048-token chunk riding with 250 decode requests made
--enable-mixed-chunk 0.77x the throughput of plain chunked prefill (`burst2k`, 2cfa646).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from radixserve.attention.torch_backend import TorchAttentionBackend
from radixserve.forward_batch import ForwardBatch
from radixserve.layers.attention import Attention

try:
    from radixserve.kernels import attention as K
except ImportError:  # no triton: the torch backend serves every call
    K = None

logger = logging.getLogger(__name__)


@dataclass
class TritonDecodeMeta:
    batch_size: int  # the launch shape; lengths and slots are read from fb tensors on the device


@dataclass
class TritonExtendMeta:
    block_req: torch.Tensor  # [cdiv(T, BLOCK_M) + B] int32 request of each flat query block (-1: none)
    block_idx: torch.Tensor  # [same] int32 query block within its request
    q_starts: torch.Tensor  # [B] int32 first row of each request in the packed q
    config: dict  # BLOCK_M / BLOCK_N / num_warps / num_stages
    decode_tail: int = 0  # the last that many requests (and rows) go through the decode kernel
    # their rows and lengths, copied once per forward: a slice at an odd offset is not 16-byte aligned, and
    # Triton compiles a kernel variant per alignment (a second decode kernel, compiled mid-serving)
    tail_rows: torch.Tensor | None = None
    tail_seq_lens: torch.Tensor | None = None


def triton_usable(device: torch.device) -> bool:
    return K is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


class TritonAttentionBackend:
    """See the module docstring for the CUDA-graph contract."""

    def __init__(self) -> None:
        self._torch = TorchAttentionBackend()
        self._mid_o: torch.Tensor | None = None
        self._mid_lse: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []  # old scratch that a captured graph may still use
        self._warned = False

    # -- scratch ---------------------------------------------------------------------------------

    def reserve_decode(self, max_batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                       device: torch.device | str) -> None:
        """Allocate the split scratch for every decode batch size <= max_batch (call before capture)."""
        if K is None:
            return
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # match q.device, which always has an index
            device = torch.device("cuda", torch.cuda.current_device())
        n_o, n_lse = K.decode_scratch_numel(max_batch, num_heads, num_kv_heads, head_dim, device)
        self._ensure_scratch(n_o, n_lse, device)

    def _ensure_scratch(self, n_o: int, n_lse: int, device: torch.device) -> None:
        if self._mid_o is not None and self._mid_o.numel() >= n_o and self._mid_lse.numel() >= n_lse \
                and self._mid_o.device == device:
            return
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            logger.warning("attention scratch grows during CUDA graph capture; call reserve_decode() first")
        if self._mid_o is not None:
            self._retired += [self._mid_o, self._mid_lse]
            n_o, n_lse = max(n_o, self._mid_o.numel()), max(n_lse, self._mid_lse.numel())
        self._mid_o = torch.empty(n_o, dtype=torch.float32, device=device)
        self._mid_lse = torch.empty(n_lse, dtype=torch.float32, device=device)

    # -- interface -------------------------------------------------------------------------------

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if not triton_usable(fb.input_ids.device):
            if not self._warned:
                logger.warning("triton attention unavailable on %s: using the torch backend", fb.input_ids.device)
                self._warned = True
            self._torch.init_forward_metadata(fb)
            return
        if fb.is_decode:
            fb.attn_meta = TritonDecodeMeta(fb.batch_size)
            return
        head_dim = fb.kv_pool.k[0].shape[-1]
        cfg = K.extend_config(head_dim, fb.max_extend_len)
        tail = fb.decode_tail if fb.decode_tail < fb.batch_size else 0  # all decode: one extend pass is as good
        n_ext = fb.batch_size - tail
        block_req, block_idx, q_starts = K.extend_block_table(fb.extend_lens[:n_ext], fb.input_ids.numel() - tail,
                                                              cfg["BLOCK_M"])
        fb.attn_meta = TritonExtendMeta(block_req, block_idx, q_starts, cfg, tail)
        if tail:
            fb.attn_meta.tail_rows = fb.req_rows[n_ext:].clone()
            fb.attn_meta.tail_seq_lens = fb.seq_lens[n_ext:].clone()

    def forward(self, q: torch.Tensor, layer: Attention, fb: ForwardBatch) -> torch.Tensor:
        meta = fb.attn_meta
        if not isinstance(meta, (TritonDecodeMeta, TritonExtendMeta)):
            return self._torch.forward(q, layer, fb)
        k_buf, v_buf = fb.kv_pool.k[layer.layer_id], fb.kv_pool.v[layer.layer_id]
        k_scale, v_scale = fb.kv_pool.k_scale[layer.layer_id], fb.kv_pool.v_scale[layer.layer_id]
        if q.stride(-1) != 1:
            q = q.contiguous()
        if isinstance(meta, TritonDecodeMeta):
            return self._decode(q, k_buf, v_buf, layer, fb.req_to_token, fb.req_rows, fb.seq_lens, k_scale,
                                v_scale)
        tail = meta.decode_tail
        if not tail:
            return K.extend_attention(q, k_buf, v_buf, fb.req_to_token, fb.req_rows, fb.prefix_lens,
                                      fb.extend_lens, layer.scale, layer.sliding_window,
                                      (meta.block_req, meta.block_idx, meta.q_starts), meta.config,
                                      k_scale=k_scale, v_scale=v_scale)
        out = torch.empty_like(q)
        n_ext, t_ext = fb.batch_size - tail, q.shape[0] - tail
        K.extend_attention(q[:t_ext], k_buf, v_buf, fb.req_to_token, fb.req_rows[:n_ext], fb.prefix_lens[:n_ext],
                           fb.extend_lens[:n_ext], layer.scale, layer.sliding_window,
                           (meta.block_req, meta.block_idx, meta.q_starts), meta.config, out=out[:t_ext],
                           k_scale=k_scale, v_scale=v_scale)
        self._decode(q[t_ext:], k_buf, v_buf, layer, fb.req_to_token, meta.tail_rows, meta.tail_seq_lens,
                     k_scale, v_scale, out=out[t_ext:])
        return out

    def _decode(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layer: Attention,
                req_to_token: torch.Tensor, req_rows: torch.Tensor, seq_lens: torch.Tensor, k_scale: float,
                v_scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        B, H, D = q.shape
        splits = K.decode_num_splits(B, layer.num_kv_heads, q.device)
        if splits > 1:
            self._ensure_scratch(B * H * splits * D, B * H * splits, q.device)
        return K.decode_attention(q, k_buf, v_buf, req_to_token, req_rows, seq_lens, layer.scale,
                                  layer.sliding_window, splits, self._mid_o, self._mid_lse, out=out,
                                  k_scale=k_scale, v_scale=v_scale)
