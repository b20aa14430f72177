"""Scheduler semantics of the tuning guide: radix reuse, eviction, lpm/fcfs order, retraction,
log-line formats. The reference for outputs is the same engine run unconstrained, which itself
equals HF transformers (test_engine_hf.py). The engine here has float16 weights packed for FBGEMM
(float32 activations; test_cpu_fp16.py checks they track float32): every comparison is engine against engine
across batch shapes, which needs one numeric path (auto's 4-bit path serves <= 4 rows only), and a decode step
costs a third of float32's."""
from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from radixserve.args import ServerArgs
from radixserve.core import FinishReason, Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.scheduler.scheduler import Scheduler

SP = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ServerArgs(device="cpu", max_total_tokens=8192, seed=0, cpu_weight_dtype="float16"))


def sched(engine: Engine, **changes) -> Scheduler:
    return Scheduler(dataclasses.replace(engine.args, **changes), engine.runner, engine.tokenizer)


def drain(s: Scheduler, reqs: list[Req], check=None) -> list[list[int]]:
    for r in reqs:
        s.add_request(r)
    while s.has_work:
        s.step()
        if check:
            check(s)
    return [r.output_ids for r in reqs]


def prompts(engine: Engine, n: int, prefix_words: int = 20) -> list[list[int]]:  # 20 words: ~110 shared tokens
    system = " ".join(f"rule{i} is important." for i in range(prefix_words))
    return [engine.tokenizer.encode(f"{system} Question {i}: what is {i} plus {i}?") for i in range(n)]


def assert_pool_clean(s: Scheduler) -> None:
    s.cache.check_invariants()
    assert s.allocator.free_tokens + s.cache.total_size == s.allocator.capacity_tokens
    s.cache.evict(1 << 30)
    assert s.allocator.free_tokens == s.allocator.capacity_tokens


@pytest.mark.parametrize("page_size", [1, 16])
def test_shared_prefix_cached_tokens(engine, page_size):
    ps = prompts(engine, 2)
    shared = next(i for i, (a, b) in enumerate(zip(*ps)) if a != b)
    s = sched(engine, page_size=page_size)
    first = Req(ps[0], SP)
    drain(s, [first])
    second = Req(ps[1], SP)
    out = drain(s, [second])
    assert first.cached_tokens == 0
    assert second.cached_tokens == shared // page_size * page_size
    naive = drain(sched(engine, page_size=page_size, cache="naive"), [Req(ps[1], SP)])
    assert out == naive
    assert_pool_clean(s)


def test_lpm_defers_in_batch_shared_prefix(engine):
    """Under lpm, requests sharing a long prefix with one admitted in the same batch wait a step and
    then hit the tree; fcfs computes the shared prefix once per request."""
    ps = prompts(engine, 4)
    ref = drain(sched(engine, cache="naive"), [Req(p, SP) for p in ps])  # one reference for both policies
    hits = {}
    for policy in ("fcfs", "lpm"):
        s = sched(engine, schedule_policy=policy)
        reqs = [Req(p, SP) for p in ps]
        out = drain(s, reqs)
        hits[policy] = [r.cached_tokens for r in reqs]
        assert out == ref
        assert_pool_clean(s)
    assert hits["fcfs"] == [0, 0, 0, 0]
    shared = next(i for i, (a, b) in enumerate(zip(ps[0], ps[1])) if a != b)
    assert hits["lpm"][0] == 0 and all(h >= shared - 1 for h in hits["lpm"][1:])


def test_eviction_small_pool_keeps_outputs(engine):
    ps = prompts(engine, 6, prefix_words=30)  # 182 tokens each, 150 of them shared
    ref = drain(sched(engine, cache="naive"), [Req(p, SP) for p in ps])
    s = sched(engine, max_total_tokens=208, page_size=4)
    evict, freed = s.cache.evict, []
    s.cache.evict = lambda n: freed.append(evict(n)) or freed[-1]
    got = []
    for p in ps:  # one at a time so the tree fills up and must evict
        got += drain(s, [Req(p, SP)], check=lambda s: s.cache.check_invariants())
    assert got == ref
    assert sum(freed) > 0, "the tree never evicted"
    assert_pool_clean(s)


def test_lpm_admits_longest_prefix_first_and_fcfs_keeps_order(engine):
    ps = prompts(engine, 3)
    for policy, expect_first in (("lpm", 2), ("fcfs", 0)):
        s = sched(engine, schedule_policy=policy, max_running_requests=1)
        warm = Req(ps[2][:-1] + [engine.tokenizer.encode(" x")[0]], SP)  # caches most of prompt 2
        drain(s, [warm])
        reqs = [Req(p, SP) for p in ps]
        for r in reqs:
            s.add_request(r)
        s.step()  # one running slot: exactly one request is admitted and prefilled
        assert [bool(r.output_ids) for r in reqs] == [i == expect_first for i in range(3)]
        for r in reqs:
            s.abort(r.rid)
        assert not s.has_work
        assert_pool_clean(s)


def test_retraction_completes_every_request_unchanged(engine, caplog):
    # 12 x (40 + 40) tokens admitted optimistically into 460: two retractions, one request retracted twice
    ps = [p[:40] for p in prompts(engine, 12, prefix_words=10)]
    sp = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    ref = drain(sched(engine), [Req(p, sp) for p in ps])
    s = sched(engine, max_total_tokens=460, schedule_conservativeness=0.1)
    reqs = [Req(p, sp) for p in ps]
    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        out = drain(s, reqs, check=lambda s: s.cache.check_invariants())
    assert out == ref
    assert any(r.retracted for r in reqs)
    pat = r"KV cache pool is full\. Retract requests\. #retracted_reqs: \d+, #new_token_ratio: \d\.\d{4} -> \d\.\d{4}"
    assert any(re.fullmatch(pat, m) for m in caplog.messages)
    assert_pool_clean(s)


def test_log_line_formats(engine, caplog):
    s = sched(engine, decode_log_interval=4)
    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        drain(s, [Req(p, SP) for p in prompts(engine, 3)])
    prefill = (r"Prefill batch\. #new-seq: \d+, #new-token: \d+, #cached-token: \d+, token usage: \d+\.\d{2}, "
               r"#running-req: \d+, #queue-req: \d+")
    decode = (r"Decode batch\. #running-req: \d+, #token: \d+, token usage: \d+\.\d{2}, cuda graph: (True|False), "
              r"gen throughput \(token/s\): \d+\.\d{2}, #queue-req: \d+")
    assert any(re.fullmatch(prefill, m) for m in caplog.messages)
    assert sum(bool(re.fullmatch(decode, m)) for m in caplog.messages) >= 2


def test_abort_frees_everything(engine):
    s = sched(engine, chunked_prefill_size=16)
    reqs = [Req(p, SamplingParams(temperature=0, max_new_tokens=50)) for p in prompts(engine, 4)]
    for r in reqs:
        s.add_request(r)
    for _ in range(3):
        s.step()
    for r in reqs:
        s.abort(r.rid)
    assert not s.has_work
    assert all(r.finish_reason.value == "abort" for r in reqs)
    assert_pool_clean(s)


@pytest.mark.parametrize("page_size", [1, 4])
def test_overlap_schedule_same_outputs(engine, page_size):
    """Overlap (results of step N processed after step N+1 launched) is the default on GPU; on CPU
    the same code path must give exactly the outputs of the plain loop, including seeded sampling,
    stop strings, chunking and retraction. The 200-token pool with conservativeness 0.05 admits more than
    fits, so both loops retract; request 3's stop string fires in both."""
    ps = [p[:40 + 7 * i] for i, p in enumerate(prompts(engine, 8, prefix_words=12))]

    def reqs():
        out = []
        for i, p in enumerate(ps):
            sp = SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_new_tokens=10 + 5 * i,
                                ignore_eos=True, stop=[" rule"] if i == 3 else [])
            out.append(Req(p, sp))
        return out
    kw = dict(page_size=page_size, chunked_prefill_size=32, max_total_tokens=200, schedule_conservativeness=0.05)
    plain = reqs()
    ref = drain(sched(engine, **kw), plain)
    s = sched(engine, enable_overlap_schedule=True, **kw)
    assert s.overlap
    overlapped = reqs()
    assert drain(s, overlapped, check=lambda s: s.cache.check_invariants()) == ref
    for rs in (plain, overlapped):
        assert any(r.retracted for r in rs)
        assert rs[3].finish_reason == FinishReason.STOP and rs[3].stop_text_len is not None
    assert_pool_clean(s)


def test_too_long_request_rejected(engine):
    s = sched(engine)
    with pytest.raises(ValueError, match="maximum context length is 8192"):
        s.add_request(Req([1] * 8000, SamplingParams(max_new_tokens=500)))
