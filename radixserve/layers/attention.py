"""Attention layer: rotary on q and k, this step's K/V into the pool (one fused kernel on GPU), then
the backend attends.

Under --enable-torch-compile the whole layer is one opaque custom op, `radixserve::attention`, so
the traced decode graph has no breaks and Inductor fuses everything around it. A ForwardBatch is
not a tensor and cannot cross an op boundary, so the op finds the step's batch in FORWARD_CONTEXT,
which the model runner binds around each compiled call (and around each CUDA graph capture; a
replay runs no Python, so nothing needs binding then).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from radixserve.forward_batch import ForwardBatch
from radixserve.kernels.fused import rope_tables, rotary_and_store_kv
from radixserve.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer_id, self.num_heads, self.num_kv_heads, self.head_dim = layer_id, num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.rotary, self.sliding_window = rotary, sliding_window

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                fb: ForwardBatch | None) -> torch.Tensor:
        """q [T, heads*head_dim] (or [T, heads, head_dim]), k, v likewise; returns [T, heads*head_dim].
        fb None: called from a compiled graph, go through the custom op."""
        if fb is None:
            return torch.ops.radixserve.attention(positions, q, k, v, self.layer_id)
        return self.attend(positions, q, k, v, fb)

    def attend(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               fb: ForwardBatch, rotate_in_place: bool = True) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        pool = fb.kv_pool
        if fb.kv_ready is not None:  # this layer's pages of a HiCache load: wait for them, not for all layers
            torch.cuda.current_stream(q.device).wait_event(fb.kv_ready[self.layer_id])
        if not q.is_cuda and fb.rope is None:
            fb.rope = rope_tables(positions, self.rotary.cos_sin)
        q = rotary_and_store_kv(positions, q, k, v, self.rotary.cos_sin, pool.k[self.layer_id], pool.v[self.layer_id],
                                fb.out_slots, None if rotate_in_place else torch.empty_like(q),
                                pool.k_scale[self.layer_id], pool.v_scale[self.layer_id], fb.rope)
        return fb.attn.forward(q, self, fb).reshape(q.shape[0], -1)


class ForwardContext:
    """The batch and attention layers a compiled graph's attention ops run against."""

    def __init__(self) -> None:
        self.batch: ForwardBatch | None = None
        self.layers: Sequence[Attention] = ()

    @contextmanager
    def bind(self, batch: ForwardBatch, layers: Sequence[Attention]) -> Iterator[None]:
        self.batch, self.layers = batch, layers
        try:
            yield
        finally:
            self.batch, self.layers = None, ()


FORWARD_CONTEXT = ForwardContext()


# The op leaves its inputs alone (q is rotated into a new buffer): declaring a mutation would make
# Inductor copy q before every call.
@torch.library.custom_op("radixserve::attention", mutates_args=())
def attention_op(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layer_id: int) -> torch.Tensor:
    ctx = FORWARD_CONTEXT
    if ctx.batch is None:
        raise RuntimeError("radixserve::attention called outside ForwardContext.bind()")
    n = ctx.batch.positions.numel()
    if n == q.shape[0]:
        return ctx.layers[layer_id].attend(positions, q, k, v, ctx.batch, rotate_in_place=False)
    # piecewise CUDA graphs (engine/piecewise.py) pad the tokens to a captured size: attend over the
    # batch's own tokens and pad the output back; the padding rows are never read
    out = ctx.layers[layer_id].attend(positions[:n], q[:n], k[:n], v[:n], ctx.batch, rotate_in_place=False)
    return torch.nn.functional.pad(out, (0, 0, 0, q.shape[0] - n))


@attention_op.register_fake
def _(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int) -> torch.Tensor:
    return q.new_empty(q.shape[0], q[0].numel())
