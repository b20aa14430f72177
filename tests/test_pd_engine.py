"""PD disaggregation between two in-process engines (no HTTP, no gateway): the decode engine's output equals a
plain run token for token, its prompt's KV came over TCP, and with --disaggregation-decode-enable-offload-kvcache
its finished KV lands in the HiCache file tier. Before them, the pieces of PD at --tp / --dp-size > 1 that need
no model: the bootstrap registry (rank r to rank r, the DP replica of a room, the prefill server's layout), the
plan of which prefill ranks hold a decode rank's KV heads at different --tp, and the TP ranks' agreement on
arrived transfers. (Servers at --tp 2 on either side: tests/test_distributed.py.)"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import free_port

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.disaggregation.bootstrap import BootstrapServer, lookup, prefill_layout, register
from radixserve.disaggregation.decode_queue import ARRIVED, FAILED, PENDING, verdicts
from radixserve.disaggregation.shards import fetch_plan, fetchers, kv_heads_of
from radixserve.disaggregation.types import BootstrapInfo
from radixserve.engine_unit import Engine
from radixserve.server.router import Router

COMMON = {"device": "cpu", "max_total_tokens": 1024}


def test_bootstrap_routes_each_rank_and_room() -> None:
    """A --tp 2 --dp-size 2 prefill server: decode rank r of any replica reaches prefill rank r of replica
    room % 2. Rank 0 of replica 0 starts the server last: the others' registrations wait for it."""
    port = free_port()
    regs = [threading.Thread(target=register, args=("127.0.0.1", port, r, None, 9000 + 10 * d + r),
                             kwargs={"tp_size": 2, "dp_rank": d, "dp_size": 2}) for d in (0, 1) for r in (0, 1)]
    for t in regs[1:]:
        t.start()
    time.sleep(0.3)
    boot = BootstrapServer("127.0.0.1", port)
    try:
        regs[0].start()
        for t in regs:
            t.join(10)
        deadline = time.monotonic() + 5
        assert [lookup("127.0.0.1", port, r, deadline, room) for room in (6, 7) for r in (0, 1)] == [
            ("127.0.0.1", 9000), ("127.0.0.1", 9001), ("127.0.0.1", 9010), ("127.0.0.1", 9011)]
        assert prefill_layout("127.0.0.1", port, deadline) == (2, 2)
        with pytest.raises(ValueError, match="--tp 2 --dp-size 2 already registered"):
            register("127.0.0.1", port, 0, None, 9100)  # a second prefill server (tp 1) on the same port
    finally:
        boot.close()


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("decode_tp", [1, 2, 4])
@pytest.mark.parametrize("prefill_tp", [1, 2, 4])
def test_fetch_plan_gives_each_decode_rank_its_kv_heads(kv_heads: int, decode_tp: int, prefill_tp: int) -> None:
    """Every decode rank gets exactly the heads QKVParallelLinear gives it (split, or one replicated head), in
    order, each from a prefill rank that holds it; a prefill rank waits for as many fetches as plans name it."""
    pieces: dict[int, int] = {}
    for r in range(decode_tp):
        got = []
        for q, a, b in fetch_plan(r, decode_tp, prefill_tp, kv_heads):
            base = kv_heads_of(q, prefill_tp, kv_heads)
            assert 0 <= a < b <= base[1] - base[0]
            got += range(base[0] + a, base[0] + b)
            pieces[q] = pieces.get(q, 0) + 1
        start, stop = kv_heads_of(r, decode_tp, kv_heads)
        assert got == list(range(start, stop)) and stop - start == max(kv_heads // decode_tp, 1)
    assert [fetchers(q, prefill_tp, decode_tp, kv_heads) for q in range(prefill_tp)] == \
        [pieces.get(q, 0) for q in range(prefill_tp)]
    if decode_tp == prefill_tp:  # the same layout: rank r from rank r, all of its heads
        assert [fetch_plan(r, decode_tp, prefill_tp, kv_heads) for r in range(decode_tp)] == \
            [[(r, 0, max(kv_heads // decode_tp, 1))] for r in range(decode_tp)]


def test_tp_ranks_agree_on_arrivals() -> None:
    """A request decodes once its KV is in on every rank, and fails everywhere once one rank's transfer failed."""
    table = torch.tensor([[ARRIVED, ARRIVED], [ARRIVED, PENDING], [PENDING, FAILED], [FAILED, ARRIVED],
                          [PENDING, PENDING]])
    assert verdicts(table) == [ARRIVED, PENDING, FAILED, FAILED, PENDING]


def _agreement_rank(rank: int, init: str) -> None:
    """Rank `rank` of a real 2-rank gloo group: transfer 0 arrived on both, 1 timed out on rank 1 while rank 0
    still waits, 2 broke on rank 0 while rank 1 has its KV, 3 is on its way to rank 1."""
    import torch.distributed as dist

    from radixserve.disaggregation.decode_queue import Agreement
    from radixserve.disaggregation.tcp import Transfer
    from radixserve.disaggregation.types import KVPayload, PeerGone, TransferTimeout
    from radixserve.distributed.group import TPGroup
    dist.init_process_group("gloo", init_method=init, world_size=2, rank=rank)
    transfers = [Transfer(room) for room in range(4)]

    def arrive(t: Transfer) -> None:
        t.payload = KVPayload(torch.zeros(1), 0, 0)
        t.done.set()

    def fail(t: Transfer, err: Exception) -> None:
        t.error = err
        t.done.set()

    arrive(transfers[0])
    if rank == 1:
        fail(transfers[1], TransferTimeout("timed out on rank 1"))
        arrive(transfers[2])
    else:
        fail(transfers[2], PeerGone("broke on rank 0"))
        arrive(transfers[3])
    out = Agreement(TPGroup(rank, 2, dist.group.WORLD), torch.device("cpu"))(transfers)
    assert [v for v, _ in out] == [ARRIVED, FAILED, FAILED, PENDING]
    assert out[0][1] is None and out[3][1] is None
    other = 1 - rank  # a rank's own error as it was; the other rank's with where it happened and its status
    own_text, other_text = ("broke on rank 0", "timed out on rank 1") if rank == 0 else ("timed out on rank 1",
                                                                                        "broke on rank 0")
    own, theirs = (out[2][1], out[1][1]) if rank == 0 else (out[1][1], out[2][1])
    assert str(own) == own_text and str(theirs) == f"on decode TP rank {other}: {other_text}"
    assert theirs.status == (504 if rank == 0 else 502)
    dist.destroy_process_group()


def test_tp_ranks_share_verdicts_and_errors() -> None:
    torch.multiprocessing.spawn(_agreement_rank, args=(f"tcp://127.0.0.1:{free_port()}",), nprocs=2)


def test_router_follows_the_bootstrap_room() -> None:
    """A PD prefill server's replica is room % dp_size (where its bootstrap server sends the decode side)."""
    r = Router(2, "shortest_queue")
    assert [r.route(f"r{room}", [1, 2], 4, room) for room in (7, 9, 4, 2)] == [1, 1, 0, 0]


def test_prefill_to_decode_engines(tmp_path) -> None:
    boot = free_port()
    prefill = Engine(ServerArgs(**COMMON, disaggregation_mode="prefill", disaggregation_bootstrap_port=boot,
                                disaggregation_waiting_timeout=60))
    decode = Engine(ServerArgs(**COMMON, disaggregation_mode="decode", disaggregation_waiting_timeout=60,
                               disaggregation_decode_enable_offload_kvcache=True, enable_hierarchical_cache=True,
                               hicache_storage_backend="file", hicache_storage_dir=str(tmp_path)))
    ids = prefill.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    sp = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    plain = prefill.run_to_completion([Req(list(ids), sp)])[0]
    info = BootstrapInfo("127.0.0.1", boot, 12345)
    on_p, on_d = Req(list(ids), sp, bootstrap=info), Req(list(ids), sp, bootstrap=info)
    decode.scheduler.add_request(on_d)
    prefill.scheduler.add_request(on_p)
    deadline = time.monotonic() + 120  # the KV travels on a transfer thread: wait for it, not for a step count
    while not (on_d.finished and on_p.finished) and time.monotonic() < deadline:
        for e in (prefill, decode):
            if e.scheduler.has_work:
                e.scheduler.step()
        time.sleep(0.001)
    assert on_p.finished and on_p.output_ids == plain.output_ids[:1]  # the prefill side stops at the first token
    assert on_d.output_ids == plain.output_ids
    assert decode.scheduler.pd_decode.bytes_total == len(ids) * 46080  # 30 layers x K,V x 3 heads x 64 x fp32
    decode.scheduler.cache.flush()
    written = decode.scheduler.cache.storage.written  # page keys the file tier holds
    assert len(written) >= len(ids) // decode.args.page_size - 1, "the finished KV did not reach HiCache storage"
