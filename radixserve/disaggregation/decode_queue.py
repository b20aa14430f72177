"""The decode server's side of PD inside the scheduler: requests from arrival until their KV is in the pool.

```
add(req) ─▶ waiting (no slots) ─reserve─▶ transferring (slots held, KV on the way) ─poll─▶ scheduler.running
                                                       └─ failed (timeout, prefill gone): slots freed, error out
```
Slots are reserved before the transfer starts (SGLang's pre-allocation), the same way a prefill reserves
them: free pages (evicting cache) less what running requests keep for their next tokens. The KV arrives in
host memory on a transfer thread and is written into the slots here, on the scheduler's thread, which is the
only one that touches the pool. A request whose KV never comes frees its slots and fails with the transfer's
error; nothing else in the scheduler changes for it.

With --tp N every rank receives its own shard on its own thread, and the shards arrive at different times. The
ranks must still start decoding the same requests at the same step (their forward passes meet in all-reduces),
so each poll the ranks agree over a gloo group: a request decodes once its KV is in on every rank, and fails on
every rank as soon as one rank's transfer failed, with that rank's error. The agreement is one all-reduce of
a [transfers, ranks] table while transfers are in flight, and nothing while none are.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from radixserve.core import FinishReason, Req
from radixserve.disaggregation.endpoint import DecodeEndpoint
from radixserve.disaggregation.kv import import_kv
from radixserve.disaggregation.tcp import Transfer
from radixserve.disaggregation.types import TransferError
from radixserve.distributed.group import TPGroup
from radixserve.scheduler.prefill import reserved_tokens

logger = logging.getLogger(__name__)
PENDING, ARRIVED, FAILED = 0, 1, 2  # a transfer's state on one rank, and the verdict of all ranks


def verdicts(table: torch.Tensor) -> list[int]:
    """`table[i, r]`: transfer i's state on TP rank r. FAILED where any rank failed, ARRIVED where every rank has
    its KV, PENDING otherwise."""
    return [FAILED if (row == FAILED).any() else ARRIVED if (row == ARRIVED).all() else PENDING
            for row in table]


def state(t: Transfer) -> int:
    if not t.done.is_set():
        return PENDING
    return ARRIVED if t.error is None and t.payload is not None else FAILED


class Agreement:
    """What the TP ranks agree on each poll: every transfer's verdict, the same on every rank, with the error of
    a failed one (this rank's own, else that of the lowest rank that failed)."""

    def __init__(self, tp: TPGroup, device: torch.device) -> None:
        self.tp, self.group = tp, None
        if tp.size > 1:  # gloo: on CUDA the model's group is NCCL, and this must not wait for the device
            self.group = tp.group if device.type == "cpu" else dist.new_group(backend="gloo")

    def __call__(self, transfers: list[Transfer]) -> list[tuple[int, TransferError | None]]:
        own = [state(t) for t in transfers]
        errors: list[TransferError | None] = [
            (t.error or TransferError("the KV transfer ended without data")) if st == FAILED else None
            for st, t in zip(own, transfers)]
        if self.group is None or not own:
            return list(zip(own, errors))
        table = torch.zeros(len(own), self.tp.size, dtype=torch.int64)
        table[:, self.tp.rank] = torch.tensor(own, dtype=torch.int64)
        dist.all_reduce(table, group=self.group)
        agreed = verdicts(table)
        failed = [i for i, v in enumerate(agreed) if v == FAILED]
        if failed:  # rare: tell every rank why (only rank 0 answers the client)
            mine = [(str(errors[i]), errors[i].status) if errors[i] is not None else None for i in failed]
            every: list[Any] = [None] * self.tp.size
            dist.all_gather_object(every, mine, group=self.group)
            for j, i in enumerate(failed):
                if errors[i] is None:
                    rank, (text, status) = next((r, e[j]) for r, e in enumerate(every) if e[j] is not None)
                    errors[i] = TransferError(f"on decode TP rank {rank}: {text}")
                    errors[i].status = status
        return list(zip(agreed, errors))


class DecodeQueue:
    def __init__(self, sched: Any, endpoint: DecodeEndpoint) -> None:
        """`sched`: the Scheduler (its allocator, cache, request rows and running list are what this moves
        requests between)."""
        self.sched, self.endpoint = sched, endpoint
        self.agree = Agreement(sched.runner.tp, sched.runner.device)
        self.waiting: list[Req] = []
        self.transferring: list[tuple[Req, Transfer]] = []
        self.failed: list[tuple[Req, TransferError]] = []
        self.bytes_total, self.seconds_total = 0, 0.0  # KV received, and the time it was on the wire

    def __len__(self) -> int:
        return len(self.waiting) + len(self.transferring)

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                self.sched._finish(req, FinishReason.ABORT)
                return req
        for entry in self.transferring:
            if entry[0].rid == rid:
                self.transferring.remove(entry)
                entry[1].cancel()
                self.sched._finish(entry[0], FinishReason.ABORT)
                return entry[0]
        return None

    def take_failed(self) -> list[tuple[Req, TransferError]]:
        out, self.failed = self.failed, []
        return out

    def poll(self) -> list[Req]:
        """Reserve slots for waiting requests, and move those whose KV arrived into decoding. Returns the
        requests that now have their first token (to be streamed out)."""
        self._reserve()
        ready = []
        for entry, (verdict, err) in list(zip(self.transferring, self.agree([t for _, t in self.transferring]))):
            if verdict == PENDING:
                continue
            self.transferring.remove(entry)
            req, t = entry
            if verdict == FAILED:
                logger.warning(f"PD: request {req.rid} failed: {err}")
                t.cancel()  # this rank's shard may still be on its way
                self.sched._finish(req, FinishReason.ABORT)  # kv_len is 0: every reserved slot is freed
                self.failed.append((req, err))
                continue
            self._start_decoding(req, t)
            ready.append(req)
        return ready

    def _reserve(self) -> None:
        s = self.sched
        while self.waiting and s.req_to_token.free_rows and len(s.running) + len(self.transferring) < s.max_running:
            req = self.waiting[0]
            n = len(req.origin_input_ids)
            need = s.allocator.pages_needed(0, n) * s.page_size
            reserve = sum(reserved_tokens(r, s.new_token_ratio) for r in s.running)
            if need + reserve > s.allocator.free_tokens:
                s.cache.evict(need + reserve - s.allocator.free_tokens)
            if need + reserve > s.allocator.free_tokens:
                return
            slots = s.allocator.alloc_extend(0, n, 0)
            req.req_pool_idx = s.req_to_token.alloc()
            s.req_to_token.write(req.req_pool_idx, 0, slots)
            req.slots, req.kv_len, req.last_node, req.cached_len = slots.tolist(), 0, None, 0
            self.waiting.pop(0)
            self.transferring.append((req, self.endpoint.fetch(req.bootstrap, n)))

    def _start_decoding(self, req: Req, t: Transfer) -> None:
        s, p = self.sched, t.payload
        n = len(req.origin_input_ids)
        import_kv(s.runner.kv_pool, torch.tensor(req.slots[:n], dtype=torch.int64), p.kv)
        self.bytes_total += t.nbytes
        self.seconds_total += t.seconds
        req.kv_len, req.seed, req.cached_tokens = n, p.seed, p.cached_tokens
        req.output_ids.append(p.first_token)
        if p.logprob is not None and (req.sampling_params.logprobs or req.sampling_params.top_logprobs):
            req.output_logprobs.append(p.logprob)
            req.output_top_logprobs.append(p.top_logprobs or [])
        s.runner.last_token[req.req_pool_idx] = p.first_token  # what the next decode step reads as its input
        s._check_finished(req, p.first_token)
        if req.finish_reason is not None:
            s._release(req)  # the prompt's KV goes into this server's prefix cache
        else:
            s.running.append(req)
