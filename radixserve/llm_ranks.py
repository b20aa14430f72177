"""The rank processes behind `LLM(model, tp_size=N, dp_size=D)`: D replicas of N lock-step ranks each.

```
LLM (this process: tokenizer only) ──pipe──▶ replica d, rank 0 ─┐ gloo/NCCL TP group: all-reduce inside the model
                                    ──pipe──▶ replica d, rank 1 ─┘ (same work, same order: SPMD)
```
Every rank of a replica gets the same batch of requests and runs it to completion on its own Engine; the
scheduler is deterministic and the logits are all-gathered, so the ranks take the same steps and their
collectives line up (the server's argument, distributed/bootstrap.py). Rank 0 of each replica sends the
results back. A generate() call splits its prompts over the replicas and reassembles them in order.

The processes live as long as the LLM: `shutdown()` (also on `with LLM(...)` exit, at interpreter exit, or
when the LLM is garbage-collected) stops and reaps them; a rank that dies fails the call that waits on it
with its exit code instead of hanging, and stops the others.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import weakref
from multiprocessing.connection import Connection, wait
from typing import Any

from radixserve.args import ServerArgs

JOIN_S = 10.0


def _rank_main(args: ServerArgs, spec: Any, local_ranks: int, conn: Connection) -> None:
    """One rank: join the TP group, build the Engine, then run every batch it is sent until told to stop."""
    import torch.distributed as dist

    from radixserve.core import Req
    from radixserve.distributed.bootstrap import host_share, init_rank
    from radixserve.engine_unit import Engine
    from radixserve.llm import prompt_logprobs
    logging.basicConfig(level=args.log_level.upper() if spec.is_leader else "WARNING",
                        format=f"[%(asctime)s DP{spec.dp_rank} TP{spec.tp_rank}] %(message)s")
    try:
        tp, _ = init_rank(args, spec, local_ranks)
        engine = Engine(host_share(args, local_ranks), tp)
        if spec.dp_rank:  # replicas draw different default seeds (the server's rule)
            engine.scheduler.rng.seed(args.seed + (spec.dp_rank << 32))
        conn.send(("ready", None))
        while True:
            cmd, work = conn.recv()
            if cmd == "stop":
                break
            try:
                reqs = engine.run_to_completion([Req(ids, sp) for ids, sp in work])
            except ValueError as e:  # a request no rank can run: every rank refuses it the same way
                conn.send(("error", str(e)))
                continue
            conn.send(("done", [(engine.output_text(r), list(r.output_ids), r.finish_reason.value,
                                 len(r.origin_input_ids), r.cached_tokens, r.output_logprobs or None,
                                 r.output_top_logprobs or None, *prompt_logprobs(r)) for r in reqs]
                          if spec.is_leader else None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankPool:
    def __init__(self, args: ServerArgs) -> None:
        from radixserve.distributed.bootstrap import check_layout, plan_ranks
        from radixserve.weights.loader import load_config, resolve_model
        if args.nnodes > 1:
            raise ValueError("LLM runs its ranks on this machine: --nnodes > 1 is for the server")
        check_layout(args, load_config(resolve_model(args.model)))
        ctx = mp.get_context("spawn")
        self.specs = plan_ranks(args)
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for spec in self.specs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_rank_main, args=(args, spec, len(self.specs), child),
                            name=f"radixserve-llm-dp{spec.dp_rank}-tp{spec.tp_rank}", daemon=True)
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.dp_size = args.dp_size
        self._finalizer = weakref.finalize(self, _stop, self.conns, self.procs)
        atexit.register(self._finalizer)
        try:
            for i in range(len(self.procs)):
                self._recv(i)
        except BaseException:
            self.shutdown()
            raise

    def _recv(self, i: int) -> tuple[str, Any]:
        """Rank i's next message; raises if it (or any rank, whose partners would then hang) dies first."""
        conn = self.conns[i]
        while not conn.poll():
            dead = wait([p.sentinel for p in self.procs] + [conn], timeout=1.0)
            for p in self.procs:
                if p.sentinel in dead:
                    p.join(0.1)
                    self.shutdown()
                    raise RuntimeError(f"LLM rank process {p.name} died (exit code {p.exitcode}); see its log "
                                       f"above. The LLM is shut down.")
        return conn.recv()

    def run(self, work: list[tuple[list[int], Any]]) -> list[tuple]:
        """Run (ids, SamplingParams) pairs, split over the replicas in contiguous slices; results in order."""
        if not self.procs:
            raise RuntimeError("this LLM was shut down")
        slices = [work[d::self.dp_size] for d in range(self.dp_size)]
        for i, spec in enumerate(self.specs):
            self.conns[i].send(("run", slices[spec.dp_rank]))
        results: list[list[tuple] | None] = [None] * self.dp_size
        error = None
        for i, spec in enumerate(self.specs):
            kind, out = self._recv(i)
            if kind == "error":
                error = out
            elif spec.is_leader:
                results[spec.dp_rank] = out
        if error is not None:
            raise ValueError(error)
        merged: list[tuple] = [()] * len(work)
        for d, res in enumerate(results):
            merged[d::self.dp_size] = res or []
        return merged

    def shutdown(self) -> None:
        self._finalizer()
        self.conns, self.procs = [], []


def _stop(conns: list[Connection], procs: list[mp.process.BaseProcess]) -> None:
    for conn in conns:
        try:
            conn.send(("stop", None))
        except (OSError, BrokenPipeError):
            pass
    for p in procs:
        p.join(JOIN_S)
        if p.exitcode is None:
            p.kill()
            p.join(1.0)
    for conn in conns:
        conn.close()
