"""The scheduler's grammar hook: a batch's token bitmask, built on the CPU, and each request's matcher
advanced by its sampled token.

The scheduler calls `bitmask` after it has launched a forward pass and before it samples, so on a GPU
the mask is computed while the forward runs; with overlap scheduling the sampling of a batch that has
constrained rows waits until the previous step's tokens have advanced the matchers (they decide the
mask), which is still behind the forward. Rows without a grammar are all ones.
"""
from __future__ import annotations

import logging
import time

import torch

from radixserve.core import FinishReason, Req
from radixserve.grammar.backend import GrammarBackend, bitmask_words

logger = logging.getLogger(__name__)


class GrammarMasks:
    def __init__(self, backend: GrammarBackend, vocab_size: int, max_rows: int, device: torch.device) -> None:
        self.backend, self.device = backend, device
        self.words = bitmask_words(vocab_size)
        pin = device.type == "cuda"
        # One buffer is enough: every step waits (Launched.copied) for its sampled ids, which the stream
        # orders after this buffer's host-to-device copy, before the next step refills it.
        self.host = torch.full((max_rows, self.words), -1, dtype=torch.int32, pin_memory=pin)
        self.mask_s = 0.0  # time spent filling masks, and for how many rows (bench.grammar reads these)
        self.mask_rows = 0

    @staticmethod
    def constrained(reqs: list[Req]) -> bool:
        return any(r.grammar is not None for r in reqs)

    def bitmask(self, reqs: list[Req]) -> torch.Tensor | None:
        """[len(reqs), words] int32 on the device, or None when no request is constrained."""
        rows = [(r.grammar, i) for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return None
        if len(reqs) > self.host.shape[0]:
            self.host = torch.full((len(reqs), self.words), -1, dtype=torch.int32,
                                   pin_memory=self.host.is_pinned())
        host = self.host[:len(reqs)]
        host.fill_(-1)
        live = []
        for (m, i), r in zip(rows, (reqs[i] for _, i in rows)):
            if m.accepted > len(r.output_ids):  # output shrank (e.g. dropped tokens): forget them too
                m.rollback(m.accepted - len(r.output_ids))
            if not (m.terminated or m.failed or r.finished):  # those rows sample nothing that is kept
                live.append((m, i))
        t0 = time.perf_counter()
        if live:
            self.backend.fill_bitmask(live, host)
        self.mask_s += time.perf_counter() - t0
        self.mask_rows += len(live)
        return host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)

    @staticmethod
    def advance(req: Req, token: int, stop_ids: frozenset[int]) -> None:
        """Feed the sampled token to the request's matcher; a complete grammar finishes the request.
        A stop token / EOS is not fed: it ends the request anyway (the mask only allows it once the
        grammar accepts)."""
        m = req.grammar
        if m is None or token in stop_ids:
            return
        if not m.accept(token):
            logger.warning(f"request {req.rid}: token {token} rejected by its grammar; stopping it")
            req.finish_reason = FinishReason.STOP
        elif m.terminated:
            req.finish_reason = FinishReason.STOP
