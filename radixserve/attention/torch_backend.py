"""Reference attention in plain torch: ragged batches padded to [B, max_new, max_kv].

One code path serves prefill, extend over a cached prefix, and decode (max_new == 1). It is the
oracle the Triton kernels are tested against, so it favours clarity; the only cost of padding is
memory proportional to B × max_new × max_kv, fine on CPU-sized batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radixserve.forward_batch import ForwardBatch
from radixserve.layers.attention import Attention


@dataclass
class TorchAttnMeta:
    token_req: torch.Tensor  # [T] request index of each new token
    token_off: torch.Tensor  # [T] offset of each new token within its request's new tokens
    kv_slots: torch.Tensor  # [B, max_kv] slots of every request's KV (padding -> slot 0)
    mask: torch.Tensor  # [B, 1, max_new, max_kv] True where attention is allowed
    key_pos: torch.Tensor  # [1, max_kv]
    query_pos: torch.Tensor  # [B, max_new]
    kv_span: int | None = None  # decode of one request whose KV fills slots [kv_span, kv_span + max_kv) in order


class TorchAttentionBackend:
    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        dev = fb.input_ids.device
        B, max_new, max_kv = fb.batch_size, fb.max_extend_len, fb.max_seq_len
        token_req = torch.repeat_interleave(torch.arange(B, device=dev), fb.extend_lens)
        starts = torch.cumsum(fb.extend_lens, 0) - fb.extend_lens
        token_off = torch.arange(token_req.numel(), device=dev) - starts[token_req]
        key_pos = torch.arange(max_kv, device=dev)[None, :]
        kv_slots = fb.req_to_token[fb.req_rows, :max_kv] * (key_pos < fb.seq_lens[:, None])
        query_pos = fb.prefix_lens[:, None] + torch.arange(max_new, device=dev)[None, :]  # [B, max_new]
        mask = key_pos[:, None, :] <= query_pos[:, :, None]
        # Padded query rows attend to key 0 only, so softmax never sees an all-masked row.
        valid_q = torch.arange(max_new, device=dev)[None, :] < fb.extend_lens[:, None]
        mask = mask & valid_q[:, :, None] | (~valid_q[:, :, None] & (key_pos[:, None, :] == 0))
        fb.attn_meta = TorchAttnMeta(token_req, token_off, kv_slots, mask[:, None], key_pos, query_pos,
                                     _span(kv_slots) if B == 1 and max_new == 1 else None)

    def forward(self, q: torch.Tensor, layer: Attention, fb: ForwardBatch) -> torch.Tensor:
        m: TorchAttnMeta = fb.attn_meta
        B, H, D = fb.batch_size, layer.num_heads, layer.head_dim
        if fb.max_extend_len == 1 and not layer.sliding_window:
            return self._decode(q, layer, fb)
        qp = q.new_zeros(B, fb.max_extend_len, H, D)
        qp[m.token_req, m.token_off] = q
        k, v = fb.kv_pool.load(layer.layer_id, m.kv_slots, q.dtype)  # [B, max_kv, KVH, D], FP8 scales applied
        mask = m.mask
        if layer.sliding_window:
            mask = mask & (m.key_pos[:, None, :] > m.query_pos[:, :, None] - layer.sliding_window)[:, None]
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=layer.scale, enable_gqa=True)
        return out.transpose(1, 2)[m.token_req, m.token_off]

    def _decode(self, q: torch.Tensor, layer: Attention, fb: ForwardBatch) -> torch.Tensor:
        """One new token per request (token i is request i's): no query padding, and no mask at all for a
        single request (every key up to its own is valid), which lets SDPA take its unmasked kernel."""
        m: TorchAttnMeta = fb.attn_meta
        if m.kv_span is not None:  # the allocator's usual case at batch 1: read the pool in place, no gather
            k, v = fb.kv_pool.load_range(layer.layer_id, m.kv_span, fb.max_seq_len, q.dtype)
        else:
            k, v = fb.kv_pool.load(layer.layer_id, m.kv_slots, q.dtype)  # [B, max_kv, KVH, D]
        mask = None if fb.batch_size == 1 else m.mask[:, :, :1]  # [B, 1, 1, max_kv]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=layer.scale, enable_gqa=True)
        return out.squeeze(2)


def _span(kv_slots: torch.Tensor) -> int | None:
    """The first slot when kv_slots [1, n] are consecutive (the page allocator hands a lone request ascending
    slots), else None. Checked once a step; every layer then reads its KV as a view of the pool."""
    row = kv_slots[0]
    first, n = int(row[0]), row.numel()
    if int(row[-1]) - first != n - 1 or not torch.equal(row, torch.arange(first, first + n, device=row.device)):
        return None
    return first
