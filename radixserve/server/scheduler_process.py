"""The scheduler process: one Engine (model runner + scheduler) driven by ZMQ messages.

The loop drains every pending message without blocking, runs one scheduler step while there is
work, and only blocks (with a timeout) on the socket when idle, so a busy server never waits on I/O
and an idle one costs no CPU. Each step's new token ids go to the detokenizer as one message.
"""
from __future__ import annotations

import logging
import os

import zmq

from radixserve.args import ServerArgs
from radixserve.core import FinishReason, Req
from radixserve.engine.engine import Engine
from radixserve.server import messages as m
from radixserve.server.procs import init_child, pull, push

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 1000


class SchedulerLoop:
    def __init__(self, engine: Engine, recv: zmq.Socket, to_detok: zmq.Socket, to_api: zmq.Socket) -> None:
        self.engine, self.sched = engine, engine.scheduler
        self.recv, self.to_detok, self.to_api = recv, to_detok, to_api
        self.decode = m.decoder(m.SchedulerIn).decode
        self.sent: dict[str, int] = {}  # rid → how many of its output ids were already forwarded

    def run(self) -> None:
        while True:
            if self.recv.poll(0 if self.sched.has_work else IDLE_POLL_MS):
                self.drain()
            if self.sched.has_work:
                self.emit(self.sched.step())

    def drain(self) -> None:
        while True:
            try:
                raw = self.recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(self.decode(raw))

    def handle(self, msg: m.SchedulerIn) -> None:
        if isinstance(msg, m.GenerateReq):
            req = Req(msg.input_ids, msg.sampling_params, rid=msg.rid)
            try:
                self.sched.add_request(req)
            except ValueError as e:
                self.to_api.send(m.encode(m.ReqError(msg.rid, str(e))))
                return
            self.sent[req.rid] = 0
        elif isinstance(msg, m.AbortReq):
            req = self.sched.abort(msg.rid)
            if req is not None:
                self.emit([req])
        elif isinstance(msg, m.FlushCacheReq):
            # Resetting the tree frees slots that running requests may hold locks on: SGLang refuses too.
            busy = self.sched.has_work
            if not busy:
                self.sched.cache.reset()
            text = ("Cache not flushed: requests are running." if busy else "Cache flushed.")
            self.to_api.send(m.encode(m.FlushCacheOut(msg.req_id, not busy, text)))
        elif isinstance(msg, m.GetInfoReq):
            self.to_api.send(m.encode(m.InfoOut(msg.req_id, self.live_info())))

    def emit(self, reqs: list[Req]) -> None:
        outs = []
        for req in reqs:
            start = self.sent.get(req.rid)
            if start is None:
                continue
            sp, ids = req.sampling_params, req.output_ids
            if req.finished:
                del self.sent[req.rid]
            else:
                self.sent[req.rid] = len(ids)
            want_lp = sp.logprobs or sp.top_logprobs > 0
            outs.append(m.TokenOut(
                rid=req.rid, new_ids=ids[start:], prompt_tokens=len(req.origin_input_ids),
                cached_tokens=req.cached_tokens, completion_tokens=len(ids),
                finish_reason=req.finish_reason.value if req.finished else None,
                drop_last=req.ends_with_stop_token,
                stop_text_len=req.stop_text_len,
                logprobs=req.output_logprobs[start:] if want_lp else None,
                top_logprobs=req.output_top_logprobs[start:] if sp.top_logprobs > 0 else None,
                stop=sp.stop if start == 0 else [], skip_special_tokens=sp.skip_special_tokens))
        if outs:
            self.to_detok.send(m.encode(m.BatchTokenOut(outs)))

    def live_info(self) -> dict:
        s, a = self.sched, self.sched.allocator
        return {
            "kv_capacity_tokens": a.capacity_tokens, "kv_free_tokens": a.free_tokens,
            "kv_cached_tokens": s.cache.evictable_size, "kv_used_tokens": s.used_tokens,
            "token_usage": s.stats.token_usage(s.used_tokens),
            "num_running_reqs": len(s.running) + (s.chunked is not None), "num_queue_reqs": len(s.waiting),
            "cache_hit_rate": s.cache.hit_rate, "last_gen_throughput": s.stats.last_gen_throughput,
            "new_token_ratio": s.new_token_ratio, "num_retractions": s.stats.num_retractions,
            "prompt_tokens_total": s.stats.prompt_tokens_total,
            "generation_tokens_total": s.stats.generation_tokens_total,
            "cached_tokens_total": s.stats.cached_tokens_total,
        }


def memory_info(engine: Engine) -> dict:
    r = engine.runner
    return {"max_total_num_tokens": r.memory.max_total_num_tokens,
            "max_running_requests": r.max_running_requests, "context_len": r.context_len,
            "available_gpu_mem": round(r.memory.available_mem_gb, 2),
            "vocab_size": r.cfg.vocab_size, "model_path": engine.src.path}


def run_scheduler(args: ServerArgs, addrs: m.Addresses, parent_pid: int) -> None:
    """Process entry point. Any exception is logged with its traceback and ends the process with code 1;
    the parent's watchdog then reports the dead scheduler and stops the server."""
    init_child(args.log_level, " TP0", parent_pid)
    try:
        engine = Engine(args)
        tok_dir = os.path.join(addrs.run_dir, "tokenizer")
        engine.tokenizer.save_pretrained(tok_dir)
        ctx = zmq.Context()
        recv, to_api = pull(ctx, addrs.scheduler), push(ctx, addrs.api)
        to_detok = push(ctx, addrs.detokenizer)
        to_detok.send(m.encode(m.DetokInit(tok_dir)))
        to_api.send(m.encode(m.Ready(tok_dir, engine.model_name, memory_info(engine))))
        SchedulerLoop(engine, recv, to_detok, to_api).run()
    except Exception:
        logger.exception("Scheduler hit an exception")
        raise SystemExit(1)
