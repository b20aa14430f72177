"""Triton kernels vs the torch reference on random inputs (GPU only; skipped without CUDA).

Attention is compared with TorchAttentionBackend run in fp32 on the upcast inputs (the oracle),
so the tolerance measures the kernel's own error:
    bf16: |out - ref| <= 2e-2 * max(1, |ref|max)      fp16: 5e-3 * ...      fp32: 2e-4 * ...
Every output (and the split scratch) is poisoned with NaN before the call, so an element the
kernel forgets to write, or a stale split it reads, fails the test. KV slots are a random
permutation of the pool (page size 1) or random whole pages (page size 16), so the gathers through
req_to_token are exercised; lengths are ragged. The fused kernels are compared with the exact
torch twins of layers/norm.py, activation.py and rotary.py.

The helpers at the top (make_case, reference, ...) are device-agnostic: the CPU interpreter test
(tests/test_kernels_interpret.py) imports them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from radixserve.attention.torch_backend import TorchAttentionBackend
from radixserve.forward_batch import ForwardBatch
from radixserve.kvcache.pool import KVPool
from radixserve.layers.attention import Attention

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-4}


@dataclass
class Case:
    fb: ForwardBatch
    q: torch.Tensor  # [T, H, D]
    layer: Attention


def make_case(prefix_lens: list[int], extend_lens: list[int], heads: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: str, window: int | None = None, page_size: int = 1,
              seed: int = 0) -> Case:
    """A ragged batch whose whole KV (prefix + new tokens) is already in a randomly laid out pool,
    as the Attention layer leaves it before calling the backend."""
    g = torch.Generator().manual_seed(seed)
    B = len(prefix_lens)
    seq = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pages_needed = [math.ceil(s / page_size) for s in seq]
    num_pages = sum(pages_needed) + 3  # page 0 = padding, plus some unused ones
    pool = KVPool(1, num_pages * page_size, kv_heads, head_dim, dtype, device)
    gd = torch.Generator(device=device).manual_seed(seed)  # values drawn on the device: fast for big pools
    pool.k[0].copy_(torch.randn(pool.k[0].shape, generator=gd, device=device))
    pool.v[0].copy_(torch.randn(pool.v[0].shape, generator=gd, device=device))
    ctx = max(seq) + 5
    rows = (torch.randperm(B + 3, generator=g)[:B] + 1).tolist()  # not 0..B-1, not in order
    r2t = torch.zeros((B + 4, ctx), dtype=torch.int64)
    page_order = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
    for b in range(B):
        pages, page_order = page_order[:pages_needed[b]], page_order[pages_needed[b]:]
        slots = (torch.tensor(pages)[:, None] * page_size + torch.arange(page_size)[None, :]).flatten()
        r2t[rows[b], :seq[b]] = slots[:seq[b]]
    prefix = torch.tensor(prefix_lens, dtype=torch.int64)
    extend = torch.tensor(extend_lens, dtype=torch.int64)
    req_idx = torch.repeat_interleave(torch.arange(B), extend)
    positions = torch.arange(int(extend.sum())) - (torch.cumsum(extend, 0) - extend)[req_idx] + prefix[req_idx]
    rows_t = torch.tensor(rows, dtype=torch.int64)
    fb = ForwardBatch(
        is_decode=all(e == 1 for e in extend_lens), input_ids=torch.zeros(positions.numel(), dtype=torch.int64,
                                                                          device=device),
        positions=positions.to(device), out_slots=r2t[rows_t[req_idx], positions].to(device),
        req_rows=rows_t.to(device), seq_lens=(prefix + extend).to(device), prefix_lens=prefix.to(device),
        extend_lens=extend.to(device), logits_idx=(torch.cumsum(extend, 0) - 1).to(device),
        max_seq_len=max(seq), max_extend_len=max(extend_lens), kv_pool=pool, req_to_token=r2t.to(device))
    q = torch.randn((positions.numel(), heads, head_dim), generator=gd, device=device).to(dtype)
    return Case(fb, q, Attention(0, heads, kv_heads, head_dim, window))


def reference(case: Case) -> torch.Tensor:
    """TorchAttentionBackend in fp32 on the upcast inputs."""
    fb = case.fb
    pool32 = KVPool(1, 1, 1, 1, torch.float32, "cpu")
    pool32.k, pool32.v = [fb.kv_pool.k[0].float()], [fb.kv_pool.v[0].float()]
    fb32 = ForwardBatch(**{**fb.__dict__, "kv_pool": pool32, "attn_meta": None})
    backend = TorchAttentionBackend()
    backend.init_forward_metadata(fb32)
    return backend.forward(case.q.float(), case.layer, fb32)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> float:
    assert not torch.isnan(out).any(), f"{what}: unwritten (NaN) outputs"
    err = (out.float() - ref.float()).abs().max().item()
    tol = TOL[dtype] * max(1.0, ref.float().abs().max().item())
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol:.3g}"
    return err


def run_decode(case: Case, **kw) -> torch.Tensor:
    from radixserve.kernels.attention import decode_attention, decode_num_splits
    fb, q, layer = case.fb, case.q, case.layer
    B, H, D = q.shape
    S = decode_num_splits(B, layer.num_kv_heads, q.device)
    nan = float("nan")
    out = torch.full_like(q, nan)
    mid_o = torch.full((B * H * S * D,), nan, device=q.device)
    mid_lse = torch.full((B * H * S,), nan, device=q.device)
    return decode_attention(q, fb.kv_pool.k[0], fb.kv_pool.v[0], fb.req_to_token, fb.req_rows, fb.seq_lens,
                            layer.scale, layer.sliding_window, S, mid_o, mid_lse, out, **kw)


def run_extend(case: Case) -> torch.Tensor:
    from radixserve.kernels.attention import extend_attention, extend_block_table, extend_config
    fb, q, layer = case.fb, case.q, case.layer
    cfg = extend_config(q.shape[-1], fb.max_extend_len)
    table = extend_block_table(fb.extend_lens, q.shape[0], cfg["BLOCK_M"])
    out = torch.full_like(q, float("nan"))
    return extend_attention(q, fb.kv_pool.k[0], fb.kv_pool.v[0], fb.req_to_token, fb.req_rows, fb.prefix_lens,
                            fb.extend_lens, layer.scale, layer.sliding_window, table, cfg, out)


def rope_cache(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


# --------------------------------------------------------------------------------------------------
# GPU tests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
# (heads, kv_heads, head_dim): GQA groups 1, 3 (SmolLM2 9/3/64), 4 (Llama-3.1-8B), 8.
SHAPES = {"g1": (8, 8, 128), "g3": (9, 3, 64), "g4": (32, 8, 128), "g8": (16, 2, 64), "g8d128": (32, 4, 128)}


def _lens(B: int, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (B,), generator=g).tolist()


# A covering design instead of the full product (which would spend minutes compiling variants):
# every batch size, group, head dim, dtype, window and page size appears, in mixed combinations.
DECODE_CASES = [
    # B, shape, dtype, window, page_size
    (1, "g4", torch.bfloat16, None, 1),
    (1, "g3", torch.float16, None, 1),
    (7, "g3", torch.bfloat16, 256, 1),
    (7, "g8d128", torch.float16, 1000, 16),
    (7, "g1", torch.float32, None, 1),
    (64, "g4", torch.bfloat16, 700, 1),
    (64, "g1", torch.float16, None, 1),
    (64, "g8", torch.bfloat16, None, 16),
    (7, "g4", torch.float16, None, 1),
]


@pytest.mark.parametrize("B,shape,dtype,window,page_size", DECODE_CASES)
def test_decode_attention(B, shape, dtype, window, page_size):
    H, KVH, D = SHAPES[shape]
    seq = _lens(B, 1, 4000, seed=B)
    seq[0] = 4000 if B > 1 else seq[0]  # one long row among short ones
    case = make_case([s - 1 for s in seq], [1] * B, H, KVH, D, dtype, DEV, window, page_size, seed=B + H)
    assert_close(run_decode(case), reference(case), dtype, f"decode B={B} {shape} {dtype} w={window}")


EXTEND_CASES = [
    # B, shape, dtype, window, prefix (lo, hi), extend (lo, hi), page_size
    (1, "g4", torch.bfloat16, None, (0, 0), (1, 4000), 1),
    (1, "g3", torch.float16, 128, (0, 0), (300, 1000), 1),
    (7, "g4", torch.bfloat16, None, (1, 3000), (1, 1000), 16),
    (7, "g3", torch.bfloat16, None, (0, 0), (1, 600), 1),
    (7, "g8d128", torch.float16, 500, (0, 2000), (1, 700), 1),
    (7, "g1", torch.float32, None, (0, 300), (1, 200), 1),
    (64, "g8", torch.bfloat16, None, (0, 1000), (1, 100), 1),
    (64, "g1", torch.float16, 64, (0, 500), (1, 64), 16),
    (64, "g4", torch.float16, None, (0, 0), (1, 64), 1),
]


@pytest.mark.parametrize("B,shape,dtype,window,prefix,extend,page_size", EXTEND_CASES)
def test_extend_attention(B, shape, dtype, window, prefix, extend, page_size):
    H, KVH, D = SHAPES[shape]
    pre, ext = _lens(B, *prefix, seed=B), _lens(B, *extend, seed=B + 1)
    case = make_case(pre, ext, H, KVH, D, dtype, DEV, window, page_size, seed=B + H + D)
    assert_close(run_extend(case), reference(case), dtype, f"extend B={B} {shape} {dtype} w={window}")


@pytest.mark.parametrize("decode", [True, False])
def test_backend_matches_torch_backend(decode):
    """The glue: init_forward_metadata + forward, through fb like the model calls it."""
    from radixserve.attention.triton_backend import TritonAttentionBackend
    B = 5
    ext = [1] * B if decode else _lens(B, 1, 300, 3)
    case = make_case(_lens(B, 0, 900, 2), ext, 32, 8, 128, torch.bfloat16, DEV, seed=11)
    backend = TritonAttentionBackend()
    backend.init_forward_metadata(case.fb)
    assert_close(backend.forward(case.q, case.layer, case.fb), reference(case), torch.bfloat16, "backend")


@pytest.mark.parametrize("tail", [1, 6, 9])
def test_backend_mixed_batch_matches_torch_backend(tail):
    """A mixed batch (--enable-mixed-chunk): prompt chunks then `tail` decode requests of one token each; the
    backend attends the prompt part with the extend kernel and the tail with the decode kernel into one
    output, which must equal the torch backend's single pass over the whole batch (tail 9: every request
    decodes, one extend pass)."""
    from radixserve.attention.triton_backend import TritonAttentionBackend
    B = 9
    ext = _lens(B - tail, 1, 700, 4) + [1] * tail
    case = make_case(_lens(B, 0, 3000, 5), ext, 32, 8, 128, torch.bfloat16, DEV, seed=13 + tail)
    case.fb.decode_tail = tail
    backend = TritonAttentionBackend()
    backend.init_forward_metadata(case.fb)
    out = backend.forward(case.q, case.layer, case.fb)
    assert_close(out, reference(case), torch.bfloat16, f"mixed tail={tail}")


def test_decode_cuda_graph_replay():
    """The graph-runner contract: capture once for bs=8, then replay with other lengths/rows/slots
    copied into the static req_rows / seq_lens (2 real requests + 6 padding entries)."""
    from radixserve.attention.triton_backend import TritonAttentionBackend
    bs, H, KVH, D = 8, 32, 8, 128
    backend = TritonAttentionBackend()
    backend.reserve_decode(bs, H, KVH, D, DEV)
    first = make_case(_lens(bs, 0, 2000, 5), [1] * bs, H, KVH, D, torch.bfloat16, DEV, seed=1)
    fb, layer = first.fb, first.layer
    static_q = first.q.clone()
    backend.init_forward_metadata(fb)
    backend.forward(static_q, layer, fb)  # warm up (compiles) outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward(static_q, layer, fb)
    graph.replay()
    assert_close(static_out, reference(first), torch.bfloat16, "graph first")
    # A new batch of 2 requests that lives in the same pool / req_to_token (other rows, lengths).
    seq = [3000, 17]
    g = torch.Generator().manual_seed(9)
    free_rows = [r for r in range(fb.req_to_token.shape[0]) if r not in fb.req_rows.tolist()][:2]
    ctx = fb.req_to_token.shape[1]
    seq = [min(s, ctx) for s in seq]
    for row, s in zip(free_rows, seq):
        fb.req_to_token[row, :s] = torch.randint(1, fb.kv_pool.k[0].shape[0], (s,), generator=g).to(DEV)
    fb.req_rows.copy_(torch.tensor(free_rows + [0] * (bs - 2), device=DEV))
    fb.seq_lens.copy_(torch.tensor(seq + [1] * (bs - 2), device=DEV))
    static_q.copy_(torch.randn(static_q.shape, generator=g).to(DEV, torch.bfloat16))
    graph.replay()
    fresh = Case(ForwardBatch(**{**fb.__dict__, "req_rows": fb.req_rows[:2].clone(),
                                 "seq_lens": fb.seq_lens[:2].clone(), "max_seq_len": max(seq),
                                 "prefix_lens": fb.seq_lens[:2] - 1, "extend_lens": fb.extend_lens[:2],
                                 "input_ids": fb.input_ids[:2], "attn_meta": None}), static_q[:2], layer)
    assert_close(static_out[:2], reference(fresh), torch.bfloat16, "graph replay")


# --------------------------------------------------------------------------------------------------
# Fused kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,N", [(1, 576), (77, 4096), (300, 128)])
def test_rmsnorm(dtype, T, N):
    from radixserve.kernels.fused import rmsnorm, rmsnorm_ref
    x = torch.randn(T, N, device=DEV, dtype=dtype)
    r = torch.randn(T, N, device=DEV, dtype=dtype)
    w = (1 + 0.1 * torch.randn(N, device=DEV)).to(dtype)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]
    out = torch.full_like(x, float("nan"))
    torch.testing.assert_close(rmsnorm(x, w, 1e-6, out=out), rmsnorm_ref(x, w, 1e-6), atol=tol, rtol=tol)
    got, got_res = rmsnorm(x, w, 1e-6, r)
    ref, ref_res = rmsnorm_ref(x, w, 1e-6, r)
    torch.testing.assert_close(got_res, ref_res, atol=0, rtol=0)  # the add is bit-exact
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,N", [(1, 1536), (33, 14336), (5, 100)])
def test_silu_and_mul(dtype, T, N):
    from radixserve.kernels.fused import silu_and_mul, silu_and_mul_ref
    x = 3 * torch.randn(T, 2 * N, device=DEV, dtype=dtype)
    out = torch.full((T, N), float("nan"), device=DEV, dtype=dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(silu_and_mul(x, out=out), silu_and_mul_ref(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,H,KVH,D", [(1, 9, 3, 64), (257, 32, 8, 128)])
def test_rotary(dtype, T, H, KVH, D):
    from radixserve.kernels.fused import rotary_and_store_kv, rotary_ref
    cs = rope_cache(8192, D).to(DEV)
    pos = torch.randint(1, 8192, (T,), device=DEV)
    # q/k as strided views into one fused qkv output, like the model produces them.
    qkv = torch.randn(T, (H + 2 * KVH) * D, device=DEV, dtype=dtype)
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    q, k, v = q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)
    ref_q, ref_k = rotary_ref(pos, q.clone(), k.clone(), cs)
    ref_v = v.clone()
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    kc = torch.full((T + 10, KVH, D), float("nan"), device=DEV, dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    slots = torch.randperm(T + 10, device=DEV)[:T]
    q2, k_orig = q.clone(), k.clone()
    rotary_and_store_kv(pos, q2, k, v, cs, kc, vc, slots)
    torch.testing.assert_close(q2, ref_q, atol=tol, rtol=tol)
    torch.testing.assert_close(k, k_orig, atol=0, rtol=0)  # k untouched
    torch.testing.assert_close(kc[slots], ref_k, atol=tol, rtol=tol)
    torch.testing.assert_close(vc[slots], ref_v, atol=0, rtol=0)
    q_before, q_out = q.clone(), torch.empty_like(q)
    rotary_and_store_kv(pos, q, k, v, cs, kc, vc, slots, q_out=q_out)  # out of place
    torch.testing.assert_close(q_out, ref_q, atol=tol, rtol=tol)
    torch.testing.assert_close(q, q_before, atol=0, rtol=0)
    torch.testing.assert_close(qkv[:, -KVH * D:].view(T, KVH, D), ref_v, atol=0, rtol=0)  # v untouched


@pytest.mark.parametrize("B,V", [(1, 128256), (5, 151936), (3, 4096), (2, 1000), (64, 49152)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows(B, V, dtype):
    """kernels.argmax against torch.argmax, with the maximum planted twice per row (first index wins) and in
    the last, partial block of the row."""
    from radixserve.kernels.argmax import argmax_rows
    g = torch.Generator(device="cuda").manual_seed(V)
    x = torch.randn(B, V, generator=g, device="cuda").to(dtype)
    for b in range(B):  # the row's maximum (odd rows: a new one) at two places, one in the last block
        hi, lo = V - 1 - b, (b * 7919) % (V - 1 - b)
        x[b, lo] = x[b, hi] = x[b].max() + (1 if b % 2 else 0)
    assert torch.equal(argmax_rows(x), x.float().argmax(dim=-1))
    y = x[:, : V // 2 + 3]  # a strided view: rows not contiguous in memory
    assert torch.equal(argmax_rows(y), y.float().argmax(dim=-1))
