"""CUDA graphs for decode: one graph per padded batch size, replayed with fresh inputs.

A decode step of a small batch is a few hundred tiny kernel launches; replaying a captured graph
removes the launch gaps. Inputs live in static buffers that every graph reads; a batch of size b
runs the smallest captured size >= b, with padding rows pointing at request row 0 (all slots 0,
the reserved padding page) so they compute garbage nobody reads and write only slot 0.
"""
from __future__ import annotations

import bisect
import logging

import torch

from radixserve.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24] + list(range(32, max_bs + 1, 16))
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


class CudaGraphRunner:
    def __init__(self, runner, max_bs: int) -> None:
        self.runner, self.max_bs = runner, max_bs
        self.sizes = capture_sizes(max_bs)
        dev = runner.device
        i64 = dict(dtype=torch.int64, device=dev)
        self.input_ids = torch.zeros(max_bs, **i64)
        self.positions = torch.zeros(max_bs, **i64)
        self.out_slots = torch.zeros(max_bs, **i64)
        self.req_rows = torch.zeros(max_bs, **i64)
        self.seq_lens = torch.ones(max_bs, **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None
        if hasattr(runner.attn, "reserve_decode"):  # scratch must not be (re)allocated during capture
            layer = runner.model.model.layers[0].self_attn.attn
            runner.attn.reserve_decode(max_bs, layer.num_heads, layer.num_kv_heads, layer.head_dim, dev)
        self._capture_all()

    def _fb(self, bs: int) -> ForwardBatch:
        r = self.runner
        seq = self.seq_lens[:bs]
        return ForwardBatch(
            is_decode=True, input_ids=self.input_ids[:bs], positions=self.positions[:bs],
            out_slots=self.out_slots[:bs], req_rows=self.req_rows[:bs], seq_lens=seq, prefix_lens=seq - 1,
            extend_lens=torch.ones_like(seq), logits_idx=torch.arange(bs, device=seq.device),
            max_seq_len=r.context_len, max_extend_len=1, kv_pool=r.kv_pool,
            req_to_token=r.req_to_token_pool.req_to_token, attn=r.attn)

    def _run(self, bs: int) -> torch.Tensor:
        return self.runner.run_model(self._fb(bs))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                    self._run(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.logits[bs] = self._run(bs)
            self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("Captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, bs: int) -> bool:
        return bs <= self.max_bs

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        bs = fb.batch_size
        size = self.sizes[bisect.bisect_left(self.sizes, bs)]
        if size > bs:  # padding rows: row 0, position 0, seq_len 1, written into slot 0
            for buf, val in ((self.input_ids, 0), (self.positions, 0), (self.out_slots, 0), (self.req_rows, 0),
                             (self.seq_lens, 1)):
                buf[bs:size].fill_(val)
        self.input_ids[:bs].copy_(fb.input_ids)
        self.positions[:bs].copy_(fb.positions)
        self.out_slots[:bs].copy_(fb.out_slots)
        self.req_rows[:bs].copy_(fb.req_rows)
        self.seq_lens[:bs].copy_(fb.seq_lens)
        self.graphs[size].replay()
        return self.logits[size][:bs]
