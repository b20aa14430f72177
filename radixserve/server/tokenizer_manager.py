"""TokenizerManager: the API server's side of the pipeline (tokenize → scheduler … detokenizer → here).

Tokenization is merged into the API server process, as in SGLang: HF fast tokenizers run in Rust and
take tens of microseconds for a chat prompt, less than the extra ZMQ hop and process a separate
tokenizer worker would add, and the chat template, prompt-length checks and `echo` need the tokenizer
here anyway.

Each request registers an asyncio.Queue under its rid; one task reads the PULL socket and routes every
output to its queue. Sends go through a plain (blocking-API) PUSH socket: a PUSH below its high-water
mark never blocks, and a sync send still works from a `finally` of a cancelled task, which is where a
disconnected client's request is aborted.

Request ids: a client may name its request (`rid` on /generate), but that name only keys the request's
group here (for abort and the duplicate check). The ids the scheduler and detokenizer see are made here,
`<client rid>#<sequence number>.<choice>`, so no client can pick an id that another request uses: the
sequence number is this process's own, and the last `#` separates it from whatever the client sent.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import zmq
import zmq.asyncio

from radixserve.core import SamplingParams
from radixserve.disaggregation.types import BootstrapInfo
from radixserve.saved_tokenizer import load_saved_tokenizer
from radixserve.server import messages as m
from radixserve.server.metrics import Metrics
from radixserve.server.procs import pull, push
from radixserve.server.router import Router

logger = logging.getLogger(__name__)
CONTROL_TIMEOUT_S = 30.0


class RequestError(Exception):
    """Becomes an OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = "invalid_value", type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    @classmethod
    def server(cls, message: str, status: int = 500) -> RequestError:
        return cls(message, status, None, "server_error", "server_error")


class TokenizerManager:
    def __init__(self, addrs: m.Addresses, dp_size: int = 1, load_balance_method: str = "shortest_queue",
                 follow_bootstrap_room: bool = False) -> None:
        """With --dp-size N there is one scheduler socket per replica and `router` picks one per request
        (`follow_bootstrap_room`, a PD prefill server: a request's room picks it, see router.py)."""
        self.follow_bootstrap_room = follow_bootstrap_room
        self.actx, self.ctx = zmq.asyncio.Context(), zmq.Context()
        self.recv = pull(self.actx, addrs.api)
        self.to_scheds = [push(self.ctx, addrs.scheduler_of(d)) for d in range(dp_size)]
        self.router = Router(dp_size, load_balance_method)
        self.decode = m.decoder(m.ApiIn).decode
        self.queues: dict[str, tuple[asyncio.Queue, int]] = {}
        self.groups: dict[str, list[str]] = {}  # client-visible rid → internal rids (one per choice)
        self.control: dict[int, asyncio.Future] = {}
        self.control_ids = itertools.count()
        self.seq = itertools.count()  # makes internal request ids unique for the life of the process
        self.draining = False  # SIGTERM: finish what runs, refuse new work with 503
        self.closed = False
        self.tokenizer: Any = None
        self.ready: m.Ready | None = None
        self.dead: str | None = None
        self.metrics: Metrics | None = None  # set by create_app with --enable-metrics

    async def wait_ready(self) -> m.Ready:
        """Block until every replica's scheduler has loaded the model; then load the tokenizer it saved."""
        readies: dict[int, m.Ready] = {}
        while len(readies) < len(self.to_scheds):
            msg = self.decode(await self.recv.recv())
            if isinstance(msg, m.Ready):
                readies[msg.dp_rank] = msg
        self.ready = readies[0]
        self.tokenizer = load_saved_tokenizer(self.ready.tokenizer_dir)
        return self.ready

    async def recv_loop(self) -> None:
        while True:
            msg = self.decode(await self.recv.recv())
            if isinstance(msg, m.BatchStrOut):
                for o in msg.outs:
                    self._route(o.rid, o)
            elif isinstance(msg, m.ReqError):
                code = "context_length_exceeded" if "context length" in msg.message else "invalid_value"
                if msg.status >= 500:  # failed after admission (PD: its KV never arrived)
                    self._route(msg.rid, RequestError.server(msg.message, msg.status))
                else:
                    self._route(msg.rid, RequestError(msg.message, msg.status, None, code))
            elif isinstance(msg, (m.FlushCacheOut, m.InfoOut)):
                fut = self.control.pop(msg.req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)

    def _route(self, rid: str, item: m.StrOut | RequestError) -> None:
        entry = self.queues.get(rid)
        if entry is not None:
            entry[0].put_nowait((entry[1], item))

    def fail_all(self, reason: str, status: int = 500, dead: bool = True) -> None:
        """Every waiting request ends now with an error instead of hanging: a child process died (`dead`),
        or the shutdown grace period ran out (the requests are aborted in the scheduler as well)."""
        if dead:
            self.dead = reason
        for q, i in list(self.queues.values()):
            q.put_nowait((i, RequestError.server(reason, status)))
        for fut in self.control.values():
            if not fut.done():
                fut.set_exception(RequestError.server(reason))
        self.control.clear()

    def _check_alive(self) -> None:
        if self.dead:
            raise RequestError.server(self.dead, 503)

    @property
    def in_flight(self) -> int:
        """Client-visible requests not finished yet (a request with n choices counts once)."""
        return len(self.groups)

    # ---- generation ---------------------------------------------------------------------------------
    async def generate(self, rid: str, prompts: list[list[int]], params: list[SamplingParams],
                       bootstraps: list[BootstrapInfo] | None = None) -> AsyncIterator[tuple[int, m.StrOut]]:
        """Submit one request per (prompt, params) pair and yield (index, output) as they arrive, until all
        have finished. Leaving early (client gone, error, cancellation) aborts the unfinished ones, which
        frees their KV at once."""
        self._check_alive()
        if self.draining:
            raise RequestError("the server is shutting down and accepts no new requests; send it to another "
                               "instance", 503, None, "server_shutting_down", "server_error")
        if rid in self.groups:
            raise RequestError(f"request id {rid!r} is already in flight; pick a unique rid", 400, "rid",
                               "duplicate_rid")
        tag = f"{rid}#{next(self.seq)}"
        rids = [f"{tag}.{i}" for i in range(len(prompts))]
        q: asyncio.Queue = asyncio.Queue()
        self.groups[rid] = rids
        for i, r in enumerate(rids):
            self.queues[r] = (q, i)
        pending = set(range(len(rids)))
        timer = self.metrics.timer(len(rids)) if self.metrics is not None else None
        try:
            for i, (r, ids, sp) in enumerate(zip(rids, prompts, params)):
                room = bootstraps[i].room if bootstraps and self.follow_bootstrap_room else None
                d = self.router.route(r, ids, sp.max_new_tokens, room)
                self.to_scheds[d].send(m.encode(m.GenerateReq(r, ids, sp, bootstraps[i] if bootstraps else None)))
            while pending:
                i, out = await q.get()
                if isinstance(out, RequestError):
                    raise out
                if out.finish_reason is not None:
                    pending.discard(i)
                if timer is not None:
                    timer.on_output(i, out)
                yield i, out
                if timer is not None:  # resumed: the consumer has sent this output's chunk
                    timer.on_written(i, out)
        finally:
            for i in pending:
                self.abort_one(rids[i])
            for r in rids:
                self.queues.pop(r, None)
                self.router.finish(r)
            self.groups.pop(rid, None)

    def abort_one(self, rid: str) -> None:
        if self.dead or self.closed:  # nobody left to tell (the schedulers are gone or going)
            return
        d = self.router.replica(rid)
        for sock in self.to_scheds if d is None else [self.to_scheds[d]]:
            sock.send(m.encode(m.AbortReq(rid)))

    def abort(self, rid: str | None = None) -> int:
        """Abort a client-visible request (all its choices), or every request when rid is None. The
        requests finish with finish_reason "abort" and their streams end normally."""
        groups = list(self.groups.values()) if rid is None else [self.groups.get(rid, [])]
        rids = [r for g in groups for r in g]
        for r in rids:
            self.abort_one(r)
        return len(rids)

    # ---- control ------------------------------------------------------------------------------------
    async def _call(self, msg_type: type, replica: int = 0) -> Any:
        self._check_alive()
        req_id = next(self.control_ids)
        fut = self.control[req_id] = asyncio.get_running_loop().create_future()
        self.to_scheds[replica].send(m.encode(msg_type(req_id)))
        try:
            return await asyncio.wait_for(fut, CONTROL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError.server("the scheduler did not answer in time", 503) from None
        finally:
            self.control.pop(req_id, None)

    async def _call_all(self, msg_type: type) -> list[Any]:
        return list(await asyncio.gather(*(self._call(msg_type, d) for d in range(len(self.to_scheds)))))

    async def flush_cache(self) -> m.FlushCacheOut:
        """Every replica flushes (each has its own radix tree); the first refusal is the answer."""
        outs = await self._call_all(m.FlushCacheReq)
        return next((o for o in outs if not o.success), outs[0])

    async def get_infos(self) -> list[dict[str, Any]]:
        """Each replica's live figures, with the router's counts for it (dp_rank, num_routed_reqs, ...)."""
        return [{**o.info, **self.router.stats(d)} for d, o in enumerate(await self._call_all(m.GetInfoReq))]

    async def get_info(self) -> dict[str, Any]:
        """The live figures of the whole server: replicas' counts summed, ratios recomputed or averaged."""
        infos = await self.get_infos()
        if len(infos) == 1:
            return infos[0]
        total = {k: sum(i[k] for i in infos) for k, v in infos[0].items() if isinstance(v, (int, float))}
        for k in ("cache_hit_rate", "new_token_ratio"):
            total[k] = total.get(k, 0.0) / len(infos)
        if total.get("kv_capacity_tokens"):
            total["token_usage"] = total["kv_used_tokens"] / total["kv_capacity_tokens"]
        total.pop("dp_rank", None)
        return total

    def close(self) -> None:
        self.closed = True
        self.recv.close()
        for sock in self.to_scheds:
            sock.close()
        self.actx.term()
        self.ctx.term()
