"""A PD prefill server over two nodes (--tp 2 --nnodes 2), on one machine as tests/test_distributed.py runs a plain
one: node 0 on 127.0.0.1, node 1 on 127.0.0.2 (both loopback, but a KV sender listening on one is not reached at
the other, so a node-1 rank that registered node 0's address fails the transfer). A TP=1 decode server fetches
each request's KV heads from both nodes' ranks, and its greedy tokens are TP=1's. Before it, the pieces that need
no model: where each rank registers (its own node's address, never "the bootstrap host" on node k > 0), the
bootstrap server's "not ready" until every rank has registered, and the --host check.

The model is test_distributed's tiny random Llama (the bundled SmolLM2's 9 heads divide by no TP size > 1); its
fixtures and TP=1 reference are reused from there.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from conftest import Server, descendants, free_port, start_server, wait_healthy
from test_distributed import COMMON, PROMPTS, pd_generate, reference, tiny_model  # noqa: F401 (fixtures)
from test_server import get_json

from radixserve.args import ServerArgs
from radixserve.disaggregation.bootstrap import BootstrapServer, lookup, prefill_layout, register
from radixserve.disaggregation.endpoint import PrefillEndpoint, bootstrap_address, sender_address
from radixserve.disaggregation.types import TransferTimeout
from radixserve.kvcache.pool import KVPool


def node_args(node_rank: int, host: str, dist_port: int, boot_port: int) -> ServerArgs:
    return ServerArgs(device="cpu", host=host, tp_size=2, nnodes=2, node_rank=node_rank,
                      dist_init_addr=f"127.0.0.1:{dist_port}", disaggregation_mode="prefill",
                      disaggregation_bootstrap_port=boot_port, disaggregation_waiting_timeout=30)


# ---- pieces, no model ----------------------------------------------------------------------------------
def test_node1_rank_registers_its_own_address() -> None:
    """Node 0 runs the bootstrap server on its --host; a node-1 rank on a wildcard --host registers with it at the
    --dist-init-addr host and names the address of its interface towards node 0 (loopback here), not None (which
    the decode side would read as node 0's host)."""
    dist_port, boot_port = free_port(), free_port()
    pool = KVPool(1, 8, 1, 4, torch.float32, "cpu")
    node0 = PrefillEndpoint(node_args(0, "127.0.0.1", dist_port, boot_port), pool, tp_rank=0, num_kv_heads=2)
    node1 = None
    try:
        node1 = PrefillEndpoint(node_args(1, "0.0.0.0", dist_port, boot_port), pool, tp_rank=1, num_kv_heads=2)
        routes = node0.bootstrap.routes
        assert routes[(0, 0)]["host"] == "127.0.0.1" and routes[(0, 1)]["host"] == "127.0.0.1"
        assert routes[(0, 1)]["port"] == node1.sender.port
        deadline = time.monotonic() + 10
        assert prefill_layout("127.0.0.1", boot_port, deadline) == (2, 1)
        assert lookup("127.0.0.1", boot_port, 1, deadline) == ("127.0.0.1", node1.sender.port)
    finally:
        node0.close()
        if node1 is not None:
            node1.close()
    node1_args = node_args(1, "127.0.0.2", dist_port, boot_port)  # a concrete --host: the sender listens there
    assert sender_address(node1_args) == "127.0.0.2" and bootstrap_address(node1_args) == "127.0.0.1"
    wild0 = dataclasses.replace(node1_args, node_rank=0, host="0.0.0.0")  # node 0: "where you found me", as before
    assert sender_address(wild0) is None and bootstrap_address(wild0) == "127.0.0.1"


def test_layout_waits_for_every_rank() -> None:
    """The decode side plans from the layout only once all tp x dp ranks are in: before, a 503 naming the missing
    rank, which the lookup retries until its deadline."""
    boot = BootstrapServer("127.0.0.1", free_port())
    try:
        register("127.0.0.1", boot.port, 0, None, 9000, tp_size=2)
        with pytest.raises(TransferTimeout, match=r"not ready: 1 of 2 prefill ranks .*TP rank 1 of DP replica 0"):
            prefill_layout("127.0.0.1", boot.port, time.monotonic() + 0.5)
        register("127.0.0.1", boot.port, 1, "127.0.0.2", 9001, tp_size=2)
        deadline = time.monotonic() + 5
        assert prefill_layout("127.0.0.1", boot.port, deadline) == (2, 1)
        assert lookup("127.0.0.1", boot.port, 1, deadline) == ("127.0.0.2", 9001)
    finally:
        boot.close()


def test_loopback_host_refused_across_real_nodes() -> None:
    flags = {"device": "cpu", "tp_size": 2, "nnodes": 2, "disaggregation_mode": "prefill"}
    with pytest.raises(ValueError, match="--host 127.0.0.1 is loopback.*pass --host 0.0.0.0"):
        ServerArgs(**flags, dist_init_addr="10.0.0.1:5000")
    ServerArgs(**flags, dist_init_addr="10.0.0.1:5000", host="0.0.0.0")
    ServerArgs(**flags, dist_init_addr="127.0.0.1:5000")  # every node on this machine
    ServerArgs(**{**flags, "disaggregation_mode": "decode"}, dist_init_addr="10.0.0.1:5000")  # it connects out


# ---- servers -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pd_servers(tiny_model: str) -> Iterator[tuple[dict[str, Server], int]]:  # noqa: F811 (the imported fixture)
    """Prefill over two "nodes" (node 1 has no HTTP server) and a TP=1 decode server, loaded side by side."""
    boot, m = free_port(), ("--model", tiny_model, *COMMON, "--max-total-tokens", "2048")
    prefill = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}", "--dist-timeout",
               "120", "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot))
    out = {"node0": start_server(*m, *prefill, "--node-rank", "0", "--host", "127.0.0.1"),
           "node1": start_server(*m, *prefill, "--node-rank", "1", "--host", "127.0.0.2"),
           "decode": start_server(*m, "--disaggregation-mode", "decode", "--disaggregation-waiting-timeout", "60")}
    try:
        wait_healthy(out["node0"])
        wait_healthy(out["decode"])
        yield out, boot
    finally:
        node1 = out["node1"]
        if node1.proc.poll() is None:
            node1.children = descendants(node1.proc.pid)
        for s in out.values():
            if s.proc.poll() is None:
                s.stop(signal.SIGTERM)


def test_pd_prefill_over_two_nodes_equals_tp1(pd_servers: tuple[dict[str, Server], int],
                                              reference: dict) -> None:  # noqa: F811
    """Three requests at once (the long one prefilled in chunks): the decode rank joins prefill rank 0's KV head
    (node 0) and rank 1's (node 1, found at 127.0.0.2 through the bootstrap server on node 0)."""
    servers, boot = pd_servers
    p, d = servers["node0"], servers["decode"]
    with urllib.request.urlopen(f"http://127.0.0.1:{boot}/route?engine_rank=1", timeout=10) as r:
        assert json.loads(r.read())["host"] == "127.0.0.2"
    pre_out, dec_out = pd_generate(p.base_url, d.base_url, boot, 300)
    assert [o["output_ids"] for o in dec_out] == reference["greedy"]
    assert [o["output_ids"] for o in pre_out] == [g[:1] for g in reference["greedy"]]  # prefill stops at token 1
    st = get_json(d.base_url, "/get_server_info")["internal_states"][0]
    prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in dec_out)
    # both KV heads, one from each node: 2 layers x K,V x 2 heads x head_dim 32 x float32
    assert st["pd_transfer_bytes"] == prompt_tokens * 2 * 2 * 2 * 32 * 4
    assert st["num_pd_waiting_reqs"] == 0 and st["kv_used_tokens"] == 0


def test_prefill_nodes_stop_together(pd_servers: tuple[dict[str, Server], int]) -> None:
    servers, _ = pd_servers
    node0, node1 = servers["node0"], servers["node1"]
    assert "Rank 1/2 ready" in node1.log() and node1.proc.poll() is None
    node1.children = descendants(node1.proc.pid)
    assert node0.stop(signal.SIGTERM) == 0
    assert node1.proc.wait(30) == 0  # node 1's rank sees rank 0 go and its node stops
    node1.wait_children_gone()
