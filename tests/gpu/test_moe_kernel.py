"""The fused-MoE Triton kernel vs its torch twin in fp32 on upcast inputs (GPU only; skipped without CUDA).

Qwen3-30B-A3B's expert shapes (E 128, k 8, H 2048, I 768) and Mixtral's (E 8, k 2, H 4096, I 14336 cut to
1792 to stay small), at every row of the block-config table (decode: one entry per block; prefill: sorted and
padded), with other ranks' experts (ids < 0) too. The caching allocator is first filled with NaN and freed,
so a row the kernel forgets to write reaches the output as NaN. Tolerance, bf16: max |out - ref| <= 2e-2 x
max |ref|. CUDA-graph capture is checked too (the align step and both launches must not synchronise), and
the FP8 (W8A16) path with 128x128 block scales and with one scale per row.
"""
from __future__ import annotations

import pytest
import torch

from radixserve.kernels.moe import MOE_CONFIGS, fused_moe_ref, fused_moe_triton
from radixserve.layers.moe import route

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-cut": (8, 2, 4096, 1792)}


def _poison() -> None:
    torch.empty(1 << 28, device="cuda").fill_(float("nan"))  # 1 GiB of NaN back into the caching allocator


def _case(T: int, E: int, k: int, H: int, inter: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, inter, device="cuda", generator=g) / inter ** 0.5).bfloat16()
    w, ids = route(torch.randn(T, E, device="cuda", generator=g), k, True, torch.bfloat16)
    return x, w13, w2, w, ids


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("row", range(len(MOE_CONFIGS)))
def test_fused_moe_matches_reference(shape: str, row: int) -> None:
    E, k, H, inter = SHAPES[shape]
    bound, cfg = MOE_CONFIGS[row]
    T = min(bound, 1000) if row else 3
    x, w13, w2, w, ids = _case(T, E, k, H, inter, seed=row)
    for remote in (False, True):
        use = torch.where(ids >= E // 2, -1, ids) if remote else ids
        _poison()
        out = fused_moe_triton(x, w13, w2, w, use, has_remote=remote, config=cfg)
        ref = fused_moe_ref(x.float(), w13.float(), w2.float(), w.float(), use)
        assert not out.isnan().any()
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        assert err < 2e-2, (shape, cfg, remote, err)


def test_fused_moe_in_cuda_graph() -> None:
    E, k, H, inter = SHAPES["qwen3-30b-a3b"]
    for T in (1, 64):
        x, w13, w2, w, ids = _case(T, E, k, H, inter, seed=T)
        want = fused_moe_triton(x, w13, w2, w, ids)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fused_moe_triton(x, w13, w2, w, ids)  # warm up (compile) outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_moe_triton(x, w13, w2, w, ids)
        x2, _, _, w_2, ids2 = _case(T, E, k, H, inter, seed=T + 100)
        x.copy_(x2)
        w.copy_(w_2)
        ids.copy_(ids2)
        graph.replay()
        torch.testing.assert_close(out, fused_moe_triton(x, w13, w2, w, ids), rtol=0, atol=0)
        assert not torch.equal(out, want)


@pytest.mark.parametrize("T", [1, 300])
@pytest.mark.parametrize("grouped", [True, False])
def test_fp8_experts_match_reference(T: int, grouped: bool) -> None:
    from radixserve.kernels.fp8 import quantize_blocks, quantize_rows
    E, k, H, inter = SHAPES["qwen3-30b-a3b"]
    x, w13b, w2b, w, ids = _case(T, E, k, H, inter, seed=7)
    if grouped:
        p13 = [quantize_blocks(w13b[e], (128, 128)) for e in range(E)]
        p2 = [quantize_blocks(w2b[e], (128, 128)) for e in range(E)]
        scales = (torch.stack([s.repeat_interleave(128, 0)[: 2 * inter] for _, s in p13]),
                  torch.stack([s.repeat_interleave(128, 0)[:H] for _, s in p2]), 128, 128)
    else:
        p13 = [quantize_rows(w13b[e]) for e in range(E)]
        p2 = [quantize_rows(w2b[e]) for e in range(E)]
        scales = (torch.stack([s for _, s in p13]), torch.stack([s for _, s in p2]), H, inter)
    w13, w2 = torch.stack([q for q, _ in p13]), torch.stack([q for q, _ in p2])
    _poison()
    out = fused_moe_triton(x, w13, w2, w, ids, scales=scales)
    ref = fused_moe_ref(x.float(), w13, w2, w.float(), ids, scales)
    assert not out.isnan().any()
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2
