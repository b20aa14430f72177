"""HiCache on the GPU: a prefix loaded back from the pinned host pool, with the forward waiting layer by
layer for its pages (KVPool.pending_load), computes exactly what the same extend computes over the prefix
still on the device. Both runs execute the same kernels on the same KV bytes, so their output tokens and
logprobs are bitwise equal; an attention layer that read its pages before their copy completed would
see another request's KV (the evicting request wrote those slots) and differ. Both io backends."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.scheduler.scheduler import Scheduler

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SP = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ServerArgs(model="qwen3-0.6b", load_format="dummy", max_total_tokens=4096, page_size=16,
                             cuda_graph_max_bs=4, seed=0))


def run(engine: Engine, reqs: list[list[int]], **changes) -> tuple[Req, Scheduler]:
    s = Scheduler(dataclasses.replace(engine.args, max_total_tokens=2048, enable_hierarchical_cache=True,
                                      hicache_ratio=4, **changes), engine.runner, engine.tokenizer)
    out = []
    for ids in reqs:  # one after another: each finishes before the next is admitted
        r = Req(list(ids), SP)
        s.add_request(r)
        while s.has_work:
            s.step()
        out.append(r)
    return out[-1], s


@pytest.mark.parametrize("backend", ["kernel", "direct"])
def test_host_loaded_prefix_equals_device_prefix(engine, backend):
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 20000, (1600,), generator=g).tolist()
    other = torch.randint(100, 20000, (1600,), generator=g).tolist()
    suffix = torch.randint(100, 20000, (48,), generator=g).tolist()
    on_device, s1 = run(engine, [prefix, prefix + suffix], hicache_io_backend=backend)
    from_host, s2 = run(engine, [prefix, other, prefix + suffix], hicache_io_backend=backend)
    assert s1.stats.host_cached_tokens_total == 0 and on_device.cached_tokens >= 1584
    assert from_host.cached_tokens == on_device.cached_tokens
    assert s2.stats.host_cached_tokens_total >= 1024, "the other prompt should have evicted most of the prefix"
    assert s2.cache.transfer.io_backend == backend
    assert from_host.output_ids == on_device.output_ids
    assert from_host.output_logprobs == on_device.output_logprobs
