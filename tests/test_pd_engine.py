"""PD disaggregation between two in-process engines (no HTTP, no gateway): the decode engine's output equals a
plain run token for token, its prompt's KV came over TCP, and with --disaggregation-decode-enable-offload-kvcache
its finished KV lands in the HiCache file tier."""
from __future__ import annotations

import time

from conftest import free_port

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.disaggregation.types import BootstrapInfo
from radixserve.engine_unit import Engine

COMMON = {"device": "cpu", "max_total_tokens": 1024}


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
