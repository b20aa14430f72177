"""--enable-piecewise-cuda-graph on a GPU: replayed piece graphs against the eager model.

One engine with piecewise graphs; each batch runs three ways on the same weights and KV pool: through the
captured graphs, through the same split pieces run eagerly at the same padded size, and through the eager
model (runner.piecewise detached). Graphs against the eager pieces checks the capture and the input
copies: the same kernels on the same shapes, so within 1e-3 (norm) and the same top-1 token. Graphs
against the eager model differ by bf16 rounding of other GEMM shapes (padded M), which a random-weight
model amplifies layer after layer (0.04 relative on the 8B preset, a 4-prompt batch, H200): within 0.1.
Batches: one prompt padded to a bucket, several prompts of mixed lengths, and an extend over a cached prefix.

With RADIXSERVE_PIECEWISE_TIMING=path the test also times prefills of one prompt of 16..512 tokens
both ways (CUDA events, median of repeats) and writes them there as JSON (benchmarks/results).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PRESET = os.environ.get("RADIXSERVE_GPU_TEST_PRESET", "qwen3-0.6b")
MAX_TOKENS = 512


@pytest.fixture(scope="module")
def engine() -> Engine:
    tok = os.environ.get("RADIXSERVE_TOKENIZER_PATH")
    return Engine(ServerArgs(model=PRESET, load_format="dummy", tokenizer_path=tok, max_total_tokens=16384,
                             cuda_graph_max_bs=4, enable_piecewise_cuda_graph=True,
                             piecewise_cuda_graph_max_tokens=MAX_TOKENS))


def three_ways(engine: Engine, batch: list[Req]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = engine.runner
    pw = r.piecewise
    before = pw.replays
    graphs = r.forward(batch, is_decode=False).float().clone()
    assert pw.replays == before + 1, "the batch did not replay the piecewise graphs"
    captured, pw.captured = pw.captured, set()  # nothing captured: the pieces run eagerly
    try:
        pieces = r.forward(batch, is_decode=False).float().clone()
    finally:
        pw.captured = captured
    r.piecewise = None
    try:
        eager = r.forward(batch, is_decode=False).float().clone()
    finally:
        r.piecewise = pw
    return graphs, pieces, eager


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check(graphs: torch.Tensor, pieces: torch.Tensor, eager: torch.Tensor) -> None:
    assert torch.isfinite(graphs).all()
    assert rel(graphs, pieces) < 1e-3, rel(graphs, pieces)
    assert (graphs.argmax(-1) == pieces.argmax(-1)).all()
    assert rel(graphs, eager) < 0.1, rel(graphs, eager)


def prompts(n: int, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(10, 30000, (k,), generator=gen).tolist() for k in lengths]


@pytest.mark.parametrize("lengths", [[100], [7, 30, 64, 3], [MAX_TOKENS]])
def test_graphs_match_eager(engine, lengths):
    s = engine.scheduler
    reqs = [Req(p, SamplingParams(temperature=0, max_new_tokens=1)) for p in prompts(len(lengths), lengths)]
    for q in reqs:
        s.add_request(q)
    batch = s._schedule_prefill()
    assert len(batch) == len(reqs)
    check(*three_ways(engine, batch))
    for q in reqs:
        s._release(q)


def test_extend_over_cached_prefix(engine):
    s = engine.scheduler
    old = s.args.chunked_prefill_size
    s.args.chunked_prefill_size = 64
    try:
        req = Req(prompts(9, [150])[0], SamplingParams(temperature=0, max_new_tokens=1))
        s.add_request(req)
        first = s._schedule_prefill()
        engine.runner.forward(first, is_decode=False)
        req.kv_len += req.extend_len
        second = s._schedule_prefill()  # positions 64..127 over the 64 in the pool
        assert second == [req] and req.kv_len == 64
        check(*three_ways(engine, second))
    finally:
        s.args.chunked_prefill_size = old
        s.abort(req.rid)


def test_prefill_timing(engine):
    """Not a check: the figures for benchmarks/results, when asked for."""
    path = os.environ.get("RADIXSERVE_PIECEWISE_TIMING")
    if not path:
        pytest.skip("set RADIXSERVE_PIECEWISE_TIMING=out.json to time prefills")
    r, s = engine.runner, engine.scheduler
    out = {"preset": PRESET, "device": torch.cuda.get_device_name(), "max_tokens": MAX_TOKENS,
           "buckets": r.piecewise.sizes, "prefill_ms": {}}
    for n in (16, 64, 128, 256, 512):
        req = Req(prompts(n, [n])[0], SamplingParams(temperature=0, max_new_tokens=1))
        s.add_request(req)
        batch = s._schedule_prefill()
        times = {}
        for name in ("piecewise", "eager"):
            pw = r.piecewise
            r.piecewise = pw if name == "piecewise" else None
            try:
                ms = []
                for i in range(12):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    r.forward(batch, is_decode=False)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 2:
                        ms.append(start.elapsed_time(end))
            finally:
                r.piecewise = pw
            times[name] = sorted(ms)[len(ms) // 2]
        times["ratio"] = times["piecewise"] / times["eager"]
        out["prefill_ms"][str(n)] = times
        s._release(req)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out["prefill_ms"]))
