"""The scheduler process: one Engine (model runner + scheduler) driven by ZMQ messages.

The loop drains every pending message without blocking, runs one scheduler step while there is
work, and only blocks (with a timeout) on the socket when idle, so a busy server never waits on I/O
and an idle one costs no CPU. Each step's new token ids go to the detokenizer as one message.

With --tp N there is one such process per rank (distributed/bootstrap.py): rank 0 reads ZMQ and broadcasts
each iteration's messages to the other ranks, every rank handles them and steps its own identical
scheduler, and only rank 0 answers the API server and feeds the detokenizer.
"""
from __future__ import annotations

import logging
import os
import time

import torch.distributed as dist
import zmq

from radixserve.args import ServerArgs
from radixserve.core import Req
from radixserve.distributed.bootstrap import InputBroadcast, RankSpec, host_share, init_rank
from radixserve.engine_unit import Engine
from radixserve.server import messages as m
from radixserve.server.procs import init_child, pull, push

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 1000
KV_POLL_MS = 2  # PD decode with nothing to run but transfers: how often to look at them


class LeaderGone(Exception):
    """TP rank 0 disappeared while this rank waited for its input: the server shut down (or died)."""


class SchedulerLoop:
    """`recv`, `to_detok` and `to_api` are None on TP ranks > 0: they get their input from `bcast` and send
    nothing."""

    def __init__(self, engine: Engine, recv: zmq.Socket | None, to_detok: zmq.Socket | None,
                 to_api: zmq.Socket | None, bcast: InputBroadcast | None = None) -> None:
        self.engine, self.sched = engine, engine.scheduler
        self.recv, self.to_detok, self.to_api, self.bcast = recv, to_detok, to_api, bcast
        self.decode = m.decoder(m.SchedulerIn).decode
        self.sent: dict[str, int] = {}  # rid → how many of its output ids were already forwarded
        # --stream-interval N: a request's tokens go out every N of them (its first and last at once)
        self.stream_interval = engine.args.stream_interval
        self.time_stats = engine.args.enable_request_time_stats_logging

    def run(self) -> None:
        while True:
            for raw in self.receive():
                self.handle(self.decode(raw))
            if self.sched.has_work:
                self.emit(self.sched.step())
            if self.sched.pd_decode is not None:  # PD: requests whose KV never arrived fail with the reason
                for req, err in self.sched.pd_decode.take_failed():
                    self.sent.pop(req.rid, None)
                    self.reply(m.ReqError(req.rid, str(err), err.status))

    def receive(self) -> list[bytes]:
        """This iteration's input frames, the same on every TP rank. Rank 0 blocks (up to IDLE_POLL_MS) only
        when idle, so the other ranks, blocked in the broadcast meanwhile, hear from it at least as often."""
        s = self.sched
        wait = KV_POLL_MS if s.waiting_for_kv and not s.running and not s.waiting else 0 if s.has_work else IDLE_POLL_MS
        frames = self.drain() if self.recv is not None and self.recv.poll(wait) else []
        if self.bcast is None:
            return frames
        if self.recv is not None:
            return self.bcast.share(frames)
        try:
            return self.bcast.share()
        except RuntimeError as e:  # gloo: the connection to rank 0 closed
            raise LeaderGone(str(e)) from e

    def drain(self) -> list[bytes]:
        frames: list[bytes] = []
        while True:
            try:
                frames.append(self.recv.recv(zmq.NOBLOCK))
            except zmq.Again:
                return frames

    def reply(self, msg: m.ApiIn) -> None:
        if self.to_api is not None:
            self.to_api.send(m.encode(msg))

    def handle(self, msg: m.SchedulerIn) -> None:
        if isinstance(msg, m.GenerateReq):
            req = Req(msg.input_ids, msg.sampling_params, rid=msg.rid, bootstrap=msg.bootstrap)
            if self.time_stats:
                req.hops = [time.perf_counter()]
            try:
                self.sched.add_request(req)
            except ValueError as e:
                self.reply(m.ReqError(msg.rid, str(e)))
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
            self.reply(m.FlushCacheOut(msg.req_id, not busy, text))
        elif isinstance(msg, m.GetInfoReq):
            self.reply(m.InfoOut(msg.req_id, self.live_info()))

    def emit(self, reqs: list[Req]) -> None:
        if self.to_detok is None:
            return
        outs = []
        for req in reqs:
            start = self.sent.get(req.rid)
            if start is None:
                continue
            sp, ids = req.sampling_params, req.output_ids
            if start and not req.finished and len(ids) - start < self.stream_interval:
                continue
            if req.finished:
                del self.sent[req.rid]
            else:
                self.sent[req.rid] = len(ids)
            want_lp = sp.logprobs or sp.top_logprobs > 0
            prompt_lp = start == 0 and req.input_logprobs_done  # computed over the prefill, sent once
            hops = None
            if req.hops is not None:  # the first output carries the scheduler's stamps, later ones their send time
                hops = req.hops + [time.perf_counter()] if start == 0 else [time.perf_counter()]
            outs.append(m.TokenOut(
                rid=req.rid, new_ids=ids[start:], prompt_tokens=len(req.origin_input_ids),
                cached_tokens=req.cached_tokens, completion_tokens=len(ids),
                finish_reason=req.finish_reason.value if req.finished else None,
                drop_last=req.ends_with_stop_token,
                stop_text_len=req.stop_text_len,
                logprobs=req.output_logprobs[start:] if want_lp else None,
                top_logprobs=req.output_top_logprobs[start:] if sp.top_logprobs > 0 else None,
                input_logprobs=req.input_logprobs if prompt_lp else None,
                input_top_logprobs=req.input_top_logprobs if prompt_lp and sp.top_logprobs > 0 else None,
                stop=sp.stop if start == 0 else [], skip_special_tokens=sp.skip_special_tokens, hops=hops,
                no_stop_trim=sp.no_stop_trim and start == 0))
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
            **s.stats.hit_tiers(), **s.cache.host_info(),  # HiCache: hits by tier, host pool use
            **s.stats.queue_time_snapshot(),
            **({} if s.pd_decode is None else {  # PD decode: requests waiting for KV, and what has arrived
                "num_pd_waiting_reqs": len(s.pd_decode), "pd_transfer_bytes": s.pd_decode.bytes_total,
                "pd_transfer_seconds": s.pd_decode.seconds_total}),
        }


def memory_info(engine: Engine) -> dict:
    r = engine.runner
    return {"max_total_num_tokens": r.memory.max_total_num_tokens,
            "max_running_requests": r.max_running_requests, "context_len": r.context_len,
            "available_gpu_mem": round(r.memory.available_mem_gb, 2),
            "vocab_size": r.cfg.vocab_size, "model_path": engine.src.path,
            "architectures": [r.cfg.architecture], "model_type": getattr(r.cfg.hf_config, "model_type", None)}


def run_scheduler(args: ServerArgs, addrs: m.Addresses | None, parent_pid: int, spec: RankSpec | None = None,
                  local_ranks: int = 1) -> None:
    """Process entry point of one scheduler rank (`addrs` is None on nodes other than 0, whose ranks all
    follow a rank 0 elsewhere). Any exception ends the process with code 1, logged with its traceback unless it is
    a model or flag error from loading (FileNotFoundError / ValueError: its message names the fix);
    the parent's watchdog then reports the dead scheduler and stops the server. A rank > 0 whose rank 0
    went away exits with code 0: that is how the ranks of other nodes learn that the server stopped."""
    spec = spec or RankSpec()
    dp_tag = f" DP{spec.dp_rank}" if args.dp_size > 1 else ""
    init_child(args.log_level, f"{dp_tag} TP{spec.tp_rank}", parent_pid)
    if not spec.is_leader:  # the memory and batch lines once per replica, from its rank 0
        for name in ("radixserve.scheduler", "radixserve.engine_unit"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        tp, cpu_group = init_rank(args, spec, local_ranks)
        try:
            engine = Engine(host_share(args, local_ranks), tp, spec.dp_rank)
        except (FileNotFoundError, ValueError) as e:
            # the model or a flag (a missing tokenizer, an unsupported architecture, a context length): the
            # message names the fix, as the launcher's own check says it; this child may get there first
            logger.error(str(e))
            raise SystemExit(1) from None
        if spec.dp_rank:  # replicas draw different request seeds: the n choices of a request may be spread
            engine.scheduler.rng.seed(args.seed + (spec.dp_rank << 32))
        bcast = None
        if tp.size > 1:
            logging.getLogger("radixserve.distributed").info(f"Rank {spec.tp_rank}/{tp.size} ready")
            dist.barrier(group=cpu_group)  # rank 0 reports Ready only once every rank has loaded
            bcast = InputBroadcast(spec.tp_rank, cpu_group)
        if not spec.is_leader:
            SchedulerLoop(engine, None, None, None, bcast).run()
            return
        assert addrs is not None
        tok_dir = os.path.join(addrs.run_dir, f"tokenizer_dp{spec.dp_rank}" if spec.dp_rank else "tokenizer")
        engine.tokenizer.save_pretrained(tok_dir)
        ctx = zmq.Context()
        recv, to_api = pull(ctx, addrs.scheduler_of(spec.dp_rank)), push(ctx, addrs.api)
        to_detok = push(ctx, addrs.detokenizer)
        to_detok.send(m.encode(m.DetokInit(tok_dir)))
        to_api.send(m.encode(m.Ready(tok_dir, engine.model_name, memory_info(engine), spec.dp_rank)))
        SchedulerLoop(engine, recv, to_detok, to_api, bcast).run()
    except LeaderGone as e:
        logger.info(f"TP rank 0 is gone ({e}); the server stopped, exiting")
    except Exception:
        logger.exception("Scheduler hit an exception")
        raise SystemExit(1) from None
