"""HiCache in the scheduler on the bundled model: a device pool so small that every conversation is evicted
before it comes back. References: the same engine without HiCache (same tiny pool, and a pool that never
evicts) and HF transformers' greedy tokens on the same weights; the tiers must also hold no leaked slot
after a run with retraction, abort and flush."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.scheduler.scheduler import Scheduler

NEW = 6
SP = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
TINY = dict(max_total_tokens=128, page_size=16, chunked_prefill_size=64)  # one conversation fits, not two
HI = dict(enable_hierarchical_cache=True, hicache_ratio=8)


@pytest.fixture(scope="module")
def engine() -> Engine:
    # the CPU's default weights (float16 packed for FBGEMM on x86, float32 activations): the tests that compare
    # the engine with itself; a decode step costs a third of float32's
    return Engine(ServerArgs(device="cpu", max_total_tokens=2048, seed=0))


@pytest.fixture(scope="module")
def engine_f32() -> Engine:
    # float32, as HF's model: the test that checks greedy tokens against transformers
    return Engine(ServerArgs(device="cpu", max_total_tokens=2048, seed=0, cpu_weight_dtype="float32"))


def sched(engine: Engine, **changes) -> Scheduler:
    return Scheduler(dataclasses.replace(engine.args, **changes), engine.runner, engine.tokenizer)


def drain(s: Scheduler, reqs: list[Req], check: bool = True) -> list[list[int]]:
    for r in reqs:
        s.add_request(r)
    while s.has_work:
        s.step()
        if check:
            s.cache.check_invariants()
    return [r.output_ids for r in reqs]


def assert_tiers_clean(s: Scheduler) -> None:
    """Flush (what /flush_cache does) returns every slot of every tier."""
    s.cache.check_invariants()
    assert s.allocator.free_tokens + s.cache.total_size == s.allocator.capacity_tokens
    s.cache.reset()
    assert s.allocator.free_tokens == s.allocator.capacity_tokens, "device slots leaked"
    host = getattr(s.cache, "host", None)
    if host is not None:
        assert host.free_tokens == host.capacity_tokens, "host slots leaked"


def multi_turn(engine: Engine, s: Scheduler, turns: int = 2, convs: int = 2) -> tuple[list[list[int]], list[Req]]:
    """Each turn appends a user message to every conversation's context, then revisits them in turn."""
    tok = engine.tokenizer
    word = "alpha beta gamma delta".split()
    ctx = [tok.encode(f"Conversation {c}. " + " ".join(f"Fact {i}: {word[c]} likes number {i * c}." for i in range(6)))
           for c in range(convs)]
    outs, reqs = [], []
    for t in range(turns):
        for c in range(convs):
            r = Req(ctx[c] + tok.encode(f" Turn {t}: say it again."), SP)
            outs += drain(s, [r])
            reqs.append(r)
            ctx[c] = r.origin_input_ids + r.output_ids
    return outs, reqs


def test_greedy_identical_with_and_without_hicache_when_everything_is_evicted(engine_f32, hf_gguf_model):
    engine = engine_f32
    hi = sched(engine, **TINY, **HI)
    got, hi_reqs = multi_turn(engine, hi)
    plain = sched(engine, **TINY)
    ref, plain_reqs = multi_turn(engine, plain)
    assert got == ref
    # without HiCache the tiny pool forgot every conversation; with it, later turns are host hits
    assert sum(r.cached_tokens for r in plain_reqs) == 0
    later = hi_reqs[2:]
    assert all(r.cached_tokens >= 16 for r in later)
    st = hi.stats
    assert st.host_cached_tokens_total == st.cached_tokens_total == sum(r.cached_tokens for r in hi_reqs)
    assert st.hit_tiers()["device_cached_tokens_total"] == 0
    assert hi.cache.transfer.bytes_loaded > 0
    assert_tiers_clean(hi)

    # HF transformers on the same weights: greedy tokens of the last turn of two conversations
    hf = hf_gguf_model  # conftest's session fixture: loaded once for the suite
    for r in hi_reqs[-2:]:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([r.origin_input_ids]), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert gen[0, len(r.origin_input_ids):].tolist() == r.output_ids


def test_no_slot_leaked_after_retraction_abort_and_flush(engine):
    """Overlap scheduling, chunked prefill, a pool that forces retraction, then an abort of a running and of a
    waiting request; every other request's tokens equal the unconstrained engine's."""
    tok = engine.tokenizer
    prompts = [tok.encode(f"User {i} asks: please count from {i}.") for i in range(6)]
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    ref = drain(sched(engine), [Req(p, sp) for p in prompts], check=False)
    s = sched(engine, max_total_tokens=64, page_size=4, chunked_prefill_size=32, schedule_conservativeness=0.1,
              enable_overlap_schedule=True, **HI)
    reqs = [Req(p, sp) for p in prompts]
    for r in reqs:
        s.add_request(r)
    while s.has_work and not s.stats.num_retractions:
        s.step()
        s.cache.check_invariants()
    assert s.stats.num_retractions > 0
    aborted = [next(r for r in s.running if not r.finished), next(r for r in reversed(reqs) if not r.output_ids)]
    for r in aborted:
        s.abort(r.rid)
    while s.has_work:
        s.step()
        s.cache.check_invariants()
    for r, want in zip(reqs, ref):
        if r not in aborted:
            assert r.output_ids == want
    again = [Req(p, sp) for p in prompts[:3]]  # evicted long ago: served from the host tier
    assert drain(s, again) == ref[:3]
    assert sum(r.cached_tokens for r in again) > 0
    assert_tiers_clean(s)


def test_restart_on_the_same_storage_dir_reuses_prefixes(engine, tmp_path):
    """A scheduler with fresh (empty) device and host pools on the same directory is what a restarted
    server is: it reads the pages the first one wrote, and its tokens are unchanged."""
    store = dict(hicache_storage_backend="file", hicache_storage_dir=str(tmp_path),
                 hicache_storage_prefetch_policy="wait_complete")
    first = sched(engine, **TINY, **HI, **store)
    out1, reqs1 = multi_turn(engine, first, turns=1, convs=3)
    first.cache.flush()
    second = sched(engine, **TINY, **HI, **store)
    out2, reqs2 = multi_turn(engine, second, turns=1, convs=3)
    assert out2 == out1
    assert all(r.cached_tokens == 0 for r in reqs1)
    assert all(r.cached_tokens >= 16 for r in reqs2)
    assert second.stats.storage_cached_tokens_total == sum(r.cached_tokens for r in reqs2)
    assert_tiers_clean(first)
    assert_tiers_clean(second)


def test_multi_turn_bench_runs_both_and_outputs_match(engine):
    """bench.offline --workload multi-turn on CPU: the same conversations without and with HiCache, a
    combined context over 4x the device pool; greedy tokens identical, later turns served from the host."""
    from types import SimpleNamespace

    from radixserve.bench import multi_turn
    from radixserve.bench.offline import parse
    args, b = parse(["--device", "cpu", "--workload", "multi-turn", "--num-prompts", "6", "--num-turns", "2",
                     "--random-input-len", "40", "--turn-input-len", "4", "--random-output-len", "1",
                     "--max-total-tokens", "64", "--page-size", "16", "--enable-hierarchical-cache",
                     "--hicache-ratio", "8"])
    unit = SimpleNamespace(runner=engine.runner, tokenizer=engine.tokenizer,
                           scheduler=Scheduler(args, engine.runner, engine.tokenizer))
    vocab = list(range(100, 5000))
    res = multi_turn.bench(unit, args, b, vocab)
    assert res["outputs_identical"]
    assert res["context_over_pool"] >= 4
    assert res["with_hicache"]["host_cached_tokens"] > res["without_hicache"]["cached_tokens"]
    assert res["with_hicache"]["requests"] == 12
