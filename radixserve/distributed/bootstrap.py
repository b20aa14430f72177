"""Rank bootstrap: where each scheduler rank runs, how it joins its TP group, and how rank 0 hands every
rank the same input.

Layout. `--dp-size D` replicas, each one TP group of `--tp N` ranks spread over `--nnodes K` nodes:
node k runs ranks k*N/K .. (k+1)*N/K - 1 of every replica, and replica d's local rank j uses GPU
d*N/K + j of that node. Each replica is its own torch.distributed world (its own TCP store), so replicas
never wait on each other; rank 0 of every replica lives on node 0, next to the API server.

Lock-step SPMD. Only rank 0 talks to the API server. Each loop iteration it broadcasts the messages it
received (requests, aborts, flushes) over a gloo CPU group, and every rank feeds them to its own Scheduler
in the same order and calls step(). The scheduler is a deterministic function of its inputs, and the logits
are all-gathered (bitwise the same on every rank), so every rank samples the same tokens and schedules the
same batches: the collectives inside the model always line up, and only rank 0's outputs are sent on.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from radixserve.args import ServerArgs
from radixserve.distributed.group import TPGroup
from radixserve.distributed.layout import RankSpec, check_layout, describe, plan_ranks  # noqa: F401 (importers of bootstrap)

logger = logging.getLogger("radixserve.distributed")


def host_share(args: ServerArgs, local_ranks: int) -> ServerArgs:
    """A rank's args. On CPU the ranks of a node share one RAM, and --mem-fraction-static is a share of it:
    each rank gets its part, so that N ranks size their KV pools like one server does (a GPU rank has its
    own memory and keeps the fraction)."""
    if args.device != "cpu" or local_ranks == 1 or args.max_total_tokens:
        return args
    return dataclasses.replace(args, mem_fraction_static=args.mem_fraction_static / local_ranks)


def init_rank(args: ServerArgs, spec: RankSpec, local_ranks: int = 1) -> tuple[TPGroup, Any]:
    """Pin the device (or the CPU threads) and join the replica's TP group. Returns the group the model
    uses (NCCL on CUDA, gloo on CPU) and a gloo CPU group for the input broadcast (None at tp=1)."""
    if args.device == "cuda":
        torch.cuda.set_device(spec.gpu)
    elif args.cpu_threads or local_ranks > 1:
        torch.set_num_threads(args.cpu_threads or max(1, (os.cpu_count() or 1) // local_ranks))
    if args.tp_size == 1:
        return TPGroup(), None
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=spec.init_method, world_size=args.tp_size,
                            rank=spec.tp_rank, timeout=timedelta(seconds=args.dist_timeout),
                            device_id=torch.device("cuda", spec.gpu) if cuda else None)
    cpu_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    if cuda:  # create the NCCL communicator now: not lazily inside a CUDA graph capture
        dist.all_reduce(torch.zeros(1, device="cuda"))
    return TPGroup(spec.tp_rank, args.tp_size, dist.group.WORLD), cpu_group


class InputBroadcast:
    """Rank 0's input frames of one loop iteration, delivered to every rank of the group.

    Two gloo broadcasts: the payload length (8 bytes; 0 when there is nothing, the common case while
    decoding), then the msgpack-encoded list of frames. The frames are the raw ZMQ messages, so nothing
    is decoded and re-encoded on rank 0."""

    def __init__(self, rank: int, group: Any) -> None:
        self.rank, self.group = rank, group
        self.size = torch.zeros(1, dtype=torch.int64)
        self.decode = msgspec.msgpack.Decoder(list[bytes]).decode

    def share(self, frames: list[bytes] | None = None) -> list[bytes]:
        payload = msgspec.msgpack.encode(frames) if self.rank == 0 and frames else b""
        self.size[0] = len(payload)
        dist.broadcast(self.size, 0, group=self.group)
        n = int(self.size[0])
        if n == 0:
            return []
        if self.rank == 0:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0, group=self.group)
            return list(frames or [])
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return self.decode(buf.numpy().tobytes())


# ---- one TP group of in-process engines, for the benchmarks --------------------------------------------
def _spmd_rank(fn: Callable[..., Any], args: ServerArgs, spec: RankSpec, extra: tuple, out: Any) -> None:
    logging.basicConfig(level=args.log_level.upper() if spec.is_leader else "WARNING",
                        format=f"[%(asctime)s TP{spec.tp_rank}] %(message)s")
    tp, _ = init_rank(args, spec, args.tp_size)
    result = fn(host_share(args, args.tp_size), tp, *extra)
    if out is not None:
        out.send(result)
    dist.barrier()
    dist.destroy_process_group()


def run_spmd(fn: Callable[..., Any], args: ServerArgs, *extra: Any) -> Any:
    """Run `fn(args, tp, *extra)` on every rank of one TP group on this node and return rank 0's result.

    The benchmarks drive an in-process Engine; with --tp N each rank runs the same benchmark on its own
    Engine with the same seeded inputs, so the ranks stay in lock-step without any messages (the same
    argument as the server's). `fn` must be a module-level function (it is pickled into spawned ranks).
    If a rank fails, the others are killed instead of waiting out the collective timeout."""
    if args.dp_size > 1 or args.nnodes > 1:
        raise ValueError("the in-process benchmarks run one TP group on one node: drop --dp-size / --nnodes")
    if args.tp_size == 1:
        tp, _ = init_rank(args, RankSpec())
        return fn(args, tp, *extra)
    from radixserve.weights.loader import load_config, resolve_model
    check_layout(args, load_config(resolve_model(args.model)))
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    specs = plan_ranks(args)
    procs = [ctx.Process(target=_spmd_rank, args=(fn, args, s, extra, send if s.is_leader else None),
                         name=f"radixserve-tp{s.tp_rank}") for s in specs]
    for p in procs:
        p.start()
    result, left = None, {p.sentinel: p for p in procs}
    while left:
        if recv.poll():
            result = recv.recv()
        for sentinel in wait(list(left), timeout=1.0):
            p = left.pop(sentinel)
            p.join()
            if p.exitcode != 0:
                for q in left.values():
                    q.kill()
                raise RuntimeError(f"TP rank process {p.name} failed with exit code {p.exitcode}")
    if result is None and recv.poll():
        result = recv.recv()
    return result
