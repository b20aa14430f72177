"""What the scheduler holds in PD mode: one object per side, built from ServerArgs.

Prefill (`--disaggregation-mode prefill`): TP rank 0 of DP replica 0 runs the bootstrap server on
--disaggregation-bootstrap-port; every rank of every replica runs a KV sender and registers it there, with the
address the decode side connects to (`sender_address`: across --nnodes, each node's own).
`send(req, first_token)` copies this rank's shard of the prompt's KV (its KV heads) out of the pool at once, so
the scheduler frees (caches) the slots as for any finished request while the sender waits for the decode side.
Every TP rank schedules the same batches, so every rank offers its shard of the same requests.

Decode (`--disaggregation-mode decode`): `fetch(info, num_tokens)` starts receiving this rank's shard of a
request's KV, from the prefill rank with the same TP rank (at another --tp: from the prefill ranks that hold its
KV heads, shards.py), into host memory; the scheduler has reserved the
slots before, and writes the KV into them once the transfer is done on every rank (decode_queue.py).
"""
from __future__ import annotations

import logging
import socket

import torch

from radixserve.args import ServerArgs
from radixserve.core import Req
from radixserve.disaggregation.bootstrap import BootstrapServer, register
from radixserve.disaggregation.kv import export_kv, kv_layout
from radixserve.disaggregation.tcp import TCPKVReceiver, TCPKVSender, Transfer
from radixserve.disaggregation.types import BootstrapInfo, KVPayload
from radixserve.kvcache.pool import KVPool

logger = logging.getLogger(__name__)
WILDCARDS = ("0.0.0.0", "::", "")  # --host values that listen on every interface


class PrefillEndpoint:
    def __init__(self, args: ServerArgs, pool: KVPool, tp_rank: int = 0, dp_rank: int = 0,
                 num_kv_heads: int | None = None) -> None:
        self.pool = pool
        lead = tp_rank == 0 and dp_rank == 0
        self.bootstrap = BootstrapServer(args.host, args.disaggregation_bootstrap_port) if lead else None
        self.sender = TCPKVSender(args.host, args.disaggregation_waiting_timeout, tp_rank, args.tp_size,
                                  num_kv_heads or kv_layout(pool)[1] * args.tp_size)
        register(bootstrap_address(args), args.disaggregation_bootstrap_port, tp_rank, sender_address(args),
                 self.sender.port, tp_size=args.tp_size, dp_rank=dp_rank, dp_size=args.dp_size)

    def send(self, req: Req, first_token: int) -> None:
        """Offer the prompt's KV (and the first token, sampled here) under the request's room."""
        n = len(req.origin_input_ids)
        kv = export_kv(self.pool, torch.tensor(req.slots[:n], dtype=torch.int64))
        lp = req.output_logprobs[-1] if req.output_logprobs else None
        top = [list(e) for e in req.output_top_logprobs[-1]] if req.output_top_logprobs else None
        self.sender.offer(req.bootstrap.room, KVPayload(kv, first_token, req.seed, req.cached_tokens, lp, top))

    def close(self) -> None:
        self.sender.close()
        if self.bootstrap is not None:
            self.bootstrap.close()


def bootstrap_address(args: ServerArgs) -> str:
    """Where this prefill rank reaches the bootstrap server: it runs beside TP rank 0, on node 0, so node 0 reaches
    it on its own --host (loopback for a wildcard), and node k > 0 at node 0's --dist-init-addr host, the address
    every node already reaches node 0 at."""
    if args.node_rank == 0:
        return "127.0.0.1" if args.host in WILDCARDS else args.host
    return dist_init_host(args)


def sender_address(args: ServerArgs) -> str | None:
    """The host this rank registers for its KV sender, which the decode side connects to.

    On node 0 with a wildcard --host: None, "the host the decode side reached the bootstrap server at", which is
    this node. On node k > 0 that would name node 0, so the rank registers its own node's address: --host when it
    is a concrete one (the sender listens there and nowhere else), else the address of the interface that routes
    to node 0's --dist-init-addr host: the network the nodes share, hence the one a decode server reaches this
    node on as well (a loopback --dist-init-addr, all nodes on one machine, gives loopback)."""
    if args.host not in WILDCARDS:
        return args.host
    if args.node_rank == 0:
        return None
    return route_ip(dist_init_host(args))


def dist_init_host(args: ServerArgs) -> str:
    """The host of --dist-init-addr (which ServerArgs requires with --nnodes > 1), without IPv6 brackets."""
    return args.dist_init_addr.rpartition(":")[0].strip("[]")


def route_ip(remote: str) -> str:
    """The local address of the interface the kernel routes `remote` through. connect() on a UDP socket sends
    nothing: it only picks the route and the source address, so this works without a peer listening."""
    family = socket.AF_INET6 if ":" in remote else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((remote, 9))  # any port: no datagram leaves
            return s.getsockname()[0]
    except OSError as e:
        raise ValueError(f"cannot tell which address of this node a PD decode server reaches its KV senders at: no "
                         f"route to --dist-init-addr host {remote} ({e.strerror or e}); pass --host with this node's "
                         f"address") from None


class DecodeEndpoint:
    def __init__(self, args: ServerArgs, pool: KVPool, tp_rank: int = 0, num_kv_heads: int | None = None) -> None:
        self.receiver = TCPKVReceiver(tp_rank, args.disaggregation_waiting_timeout, kv_layout(pool), args.tp_size,
                                      num_kv_heads)

    def fetch(self, info: BootstrapInfo, num_tokens: int) -> Transfer:
        return self.receiver.fetch(info, num_tokens)

    def close(self) -> None:
        pass


def make_endpoint(args: ServerArgs, pool: KVPool, tp_rank: int = 0, dp_rank: int = 0,
                  num_kv_heads: int | None = None) -> PrefillEndpoint | DecodeEndpoint | None:
    """`num_kv_heads`: the model's (all ranks); it plans the transfers between servers of different --tp."""
    if args.disaggregation_mode == "prefill":
        return PrefillEndpoint(args, pool, tp_rank, dp_rank, num_kv_heads)
    if args.disaggregation_mode == "decode":
        return DecodeEndpoint(args, pool, tp_rank, num_kv_heads)
    return None
