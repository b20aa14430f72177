"""Where the scheduler ranks run, computed from the flags alone (no torch at import: the launcher plans its
child processes and starts them before it imports anything heavy). distributed/bootstrap.py joins them.

Layout. `--dp-size D` replicas, each one TP group of `--tp N` ranks spread over `--nnodes K` nodes:
node k runs ranks k*N/K .. (k+1)*N/K - 1 of every replica, and replica d's local rank j uses GPU
d*N/K + j of that node. Each replica is its own torch.distributed world (its own TCP store).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from radixserve.args import ServerArgs

if TYPE_CHECKING:
    from radixserve.models.config import ModelConfig


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
        import torch  # only here: the launcher plans ranks before it imports torch
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
