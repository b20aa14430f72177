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
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from radixserve.args import ServerArgs
from radixserve.distributed.group import TPGroup
from radixserve.models.config import ModelConfig

logger = logging.getLogger("radixserve.distributed")


@dataclass(frozen=True)
class RankSpec:
    """One scheduler rank: its replica, its rank in the replica's TP group, its GPU on this node, and the
    replica's torch.distributed store (None at tp=1, where there is no process group)."""
    dp_rank: int = 0
    tp_rank: int = 0
    gpu: int = 0
    init_method: str | None = None

    @property
    def is_leader(self) -> bool:
        return self.tp_rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_tp(args: ServerArgs) -> int:
    """TP ranks of one replica on each node."""
    return args.tp_size // args.nnodes


def plan_ranks(args: ServerArgs) -> list[RankSpec]:
    """This node's ranks. Single node: each replica's store gets a free loopback port. Multi-node: every
    node must agree without talking, so replica d's store is --dist-init-addr's port + d."""
    if args.tp_size == 1:
        inits: list[str | None] = [None] * args.dp_size
    elif args.dist_init_addr:
        host, _, port = args.dist_init_addr.rpartition(":")
        host = f"[{host.strip('[]')}]" if ":" in host else host
        inits = [f"tcp://{host}:{int(port) + d}" for d in range(args.dp_size)]
    else:
        inits = [f"tcp://127.0.0.1:{free_port()}" for _ in range(args.dp_size)]
    n = local_tp(args)
    return [RankSpec(d, args.node_rank * n + j, d * n + j, inits[d])
            for d in range(args.dp_size) for j in range(n)]


def check_layout(args: ServerArgs, cfg: ModelConfig) -> None:
    """Fail before any rank starts (seconds instead of a model load later) on a TP size the model or this
    node cannot take."""
    tp = args.tp_size
    if cfg.num_heads % tp:
        raise ValueError(f"--tp {tp} does not divide the model's {cfg.num_heads} attention heads: each rank "
                         f"must hold whole heads; use a TP size that divides {cfg.num_heads}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"--tp {tp} and the model's {cfg.num_kv_heads} KV heads: one must divide the other "
                         f"(KV heads are split, or replicated when there are fewer than ranks)")
    if cfg.intermediate_size % tp and any(not cfg.is_moe_layer(n) for n in range(cfg.num_layers)):
        raise ValueError(f"--tp {tp} does not divide the MLP size {cfg.intermediate_size}")
    if cfg.moe is not None:
        m = cfg.moe
        if args.ep_size > 1 and m.num_experts % args.ep_size:
            raise ValueError(f"--ep-size {args.ep_size} does not divide the model's {m.num_experts} experts: each "
                             f"rank must hold whole experts; use an EP size that divides {m.num_experts}")
        if args.ep_size == 1 and m.intermediate_size % tp:
            raise ValueError(f"--tp {tp} does not divide the expert size {m.intermediate_size}: pass --ep-size {tp} "
                             f"to give each rank whole experts instead")
    if args.device == "cuda":
        need, have = args.dp_size * local_tp(args), torch.cuda.device_count()
        if need > have:
            what = f"--tp {tp}" + (f" x --dp-size {args.dp_size}" if args.dp_size > 1 else "")
            where = f" on each of {args.nnodes} nodes" if args.nnodes > 1 else ""
            raise ValueError(f"{what} needs {need} GPUs{where} but only {have} are visible (check "
                             f"`nvidia-smi --list-gpus` and CUDA_VISIBLE_DEVICES)")


def describe(args: ServerArgs) -> str:
    """The start-up line of the Mini-SGLang docs (`Initializing tensor parallelism with 4 GPUs`), then the
    data-parallel and multi-node layout if any."""
    parts = []
    if args.tp_size > 1:
        what = "GPUs" if args.device == "cuda" else "CPU processes"
        parts.append(f"Initializing tensor parallelism with {args.tp_size} {what}")
    if args.dp_size > 1:
        parts.append(f"{args.dp_size} data-parallel replicas (load balance: {args.load_balance_method})")
    if args.nnodes > 1:
        n = local_tp(args)
        parts.append(f"{args.nnodes} nodes: node {args.node_rank} runs TP ranks "
                     f"{args.node_rank * n}..{args.node_rank * n + n - 1}")
    return "; ".join(parts)


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
