"""Mixture-of-experts models against transformers: Qwen3-MoE (norm_topk_prob, a dense layer from mlp_only_layers),
Qwen2-MoE (shared expert behind its sigmoid gate, QKV bias, decoder_sparse_step 2, no renormalisation) and
Mixtral (always renormalised, w1/w3/w2 names under block_sparse_moe).

Each case saves a tiny random HF model (float32 safetensors, in HF's per-expert checkpoint layout) and loads it
through our own stack, then checks greedy tokens against HF generate and every step's logits against one HF
forward (helpers of test_models_hf). The routing itself is compared with HF's router modules on the same logits,
and the expert-parallel layer split over 2 gloo ranks with the single-process layer.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from test_models_hf import COMMON, _check_logits, _hf_greedy, _prompts, _run_ours

from radixserve.args import ServerArgs
from radixserve.distributed.bootstrap import check_layout
from radixserve.kernels.moe import align_by_expert, fused_moe_ref
from radixserve.layers.moe import route
from radixserve.models.config import ModelConfig

MOE_CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "norm_topk_prob": True, "mlp_only_layers": [1], "num_hidden_layers": 3}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 48, "norm_topk_prob": False,
                                     "decoder_sparse_step": 2, "num_hidden_layers": 3}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 6, "num_experts_per_tok": 2}),
}


def save_moe(name: str, path: str) -> torch.nn.Module:
    cls_name, extra = MOE_CASES[name]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: randomise them so loading them counts
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif pname.endswith("gate.weight"):  # sharper routing: the top-k choice is far from ties
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", list(MOE_CASES))
def test_moe_matches_transformers(arch: str, tmp_path) -> None:
    hf = save_moe(arch, str(tmp_path))
    prompts = _prompts()
    want = [_hf_greedy(hf, p) for p in prompts]
    (got,), steps, _ = _run_ours(str(tmp_path), prompts)
    assert got == want
    _check_logits(hf, prompts, got, steps)


def test_moe_config_layers() -> None:
    q3 = ModelConfig.from_hf(transformers.Qwen3MoeConfig(**{**COMMON, **MOE_CASES["qwen3_moe"][1]}))
    assert [q3.is_moe_layer(n) for n in range(3)] == [True, False, True]
    q2 = ModelConfig.from_hf(transformers.Qwen2MoeConfig(**{**COMMON, **MOE_CASES["qwen2_moe"][1]}))
    assert [q2.is_moe_layer(n) for n in range(3)] == [False, True, False]
    assert q2.moe.shared_expert_intermediate_size == 48 and q2.attention_bias
    mx = ModelConfig.from_hf(transformers.MixtralConfig(**{**COMMON, **MOE_CASES["mixtral"][1]}))
    assert mx.moe.norm_topk_prob and mx.moe.num_experts == 6 and mx.moe.intermediate_size == 128
    dense = ModelConfig.from_hf(transformers.Qwen3Config(**COMMON))
    assert dense.moe is None and not dense.is_moe_layer(0)


def test_route_matches_hf_routers() -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    torch.manual_seed(1)
    x = torch.randn(37, 64)
    for norm in (False, True):
        cfg = transformers.Qwen3MoeConfig(hidden_size=64, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm)
        r = Qwen3MoeTopKRouter(cfg)
        r.weight.data.normal_()
        _, w_ref, ids_ref = r(x)
        w, ids = route(x @ r.weight.T, 4, norm, x.dtype)
        assert torch.equal(ids, ids_ref) and torch.allclose(w, w_ref, atol=1e-6, rtol=0)
    mr = MixtralTopKRouter(transformers.MixtralConfig(hidden_size=64, num_local_experts=8, num_experts_per_tok=2))
    mr.weight.data.normal_()
    _, w_ref, ids_ref = mr(x)
    w, ids = route(x @ mr.weight.T, 2, True, None)
    assert torch.equal(ids, ids_ref) and torch.allclose(w, w_ref, atol=1e-6, rtol=0)


def test_align_by_expert() -> None:
    """Every entry lands once in its expert's run, runs are padded to the block, blocks know their expert."""
    g = torch.Generator().manual_seed(0)
    for T, k, E, bm in [(1, 2, 8, 16), (37, 4, 16, 16), (200, 8, 64, 32), (5, 2, 4, 4)]:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        ids[0, 0] = -1  # another rank's expert
        sorted_ids, expert_ids, num_valid = align_by_expert(ids, E, bm)
        flat, n = ids.reshape(-1), T * k
        used = int(num_valid)
        assert used % bm == 0 and sorted_ids.numel() >= used and sorted_ids.numel() % bm == 0
        got = sorted_ids[:used]
        real = got[got < n]
        assert sorted(real.tolist()) == sorted(i for i in range(n) if flat[i] >= 0)
        assert (sorted_ids[used:] == n).all()
        for b in range(used // bm):
            block = sorted_ids[b * bm:(b + 1) * bm]
            block = block[block < n]
            assert len(block) and (flat[block] == expert_ids[b]).all()


def test_fused_moe_ref_against_dense_loop() -> None:
    torch.manual_seed(0)
    T, H, inter, E, k = 9, 32, 24, 6, 3
    x, w13, w2 = torch.randn(T, H), torch.randn(E, 2 * inter, H) / 4, torch.randn(E, H, inter) / 4
    w, ids = route(torch.randn(T, E), k, True, None)
    want = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            g, u = (w13[ids[t, j]] @ x[t]).chunk(2)
            want[t] += w[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, w, ids), want, rtol=1e-5, atol=1e-5)


def test_ep_layout_errors() -> None:
    with pytest.raises(ValueError, match="--ep-size 2 must equal --tp 4"):
        ServerArgs(device="cpu", tp_size=4, ep_size=2)
    cfg = ModelConfig.from_hf(transformers.MixtralConfig(**{**COMMON, **MOE_CASES["mixtral"][1]}))
    with pytest.raises(ValueError, match="--ep-size 4 does not divide the model's 6 experts"):
        check_layout(ServerArgs(device="cpu", tp_size=4, ep_size=4), cfg)
    check_layout(ServerArgs(device="cpu", tp_size=2, ep_size=2), cfg)


def test_expert_parallel_equals_single_process(tmp_path) -> None:
    """bench.offline over 2 gloo ranks with the experts split whole (--tp 2 --ep-size 2), on a real safetensors
    checkpoint: the same greedy tokens as one process."""
    import json

    from radixserve.bench.offline import main
    from radixserve.weights.loader import load_tokenizer, resolve_model
    save_moe("qwen3_moe", str(tmp_path / "model"))
    load_tokenizer(resolve_model(None)).save_pretrained(tmp_path / "model")
    flags = ["--model", str(tmp_path / "model"), "--num-prompts", "4", "--random-input-len", "40",
             "--random-output-len", "8", "--max-total-tokens", "4096", "--cpu-threads", "1",
             "--chunked-prefill-size", "32"]
    outs = {}
    for name, extra in [("tp1", []), ("ep2", ["--tp", "2", "--ep-size", "2"])]:
        main([*flags, *extra, "--save-output-ids", str(tmp_path / f"{name}.json")])
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert len(outs["tp1"]) == 4 and all(len(o) == 8 for o in outs["tp1"])
    assert outs["ep2"] == outs["tp1"]


def test_expert_and_tensor_parallel_layers_sum_to_whole() -> None:
    """Rank r of --ep-size 2 holds experts [r*E/2, (r+1)*E/2) whole; rank r of plain --tp 2 holds half of every
    expert's intermediate dimension. Either way the two ranks' partial outputs sum to the single-process layer's
    (the all-reduce is the combine)."""
    from radixserve.distributed.group import TPGroup
    from radixserve.layers.moe import FusedMoE
    torch.manual_seed(0)
    E, H, inter, k = 6, 16, 8, 2
    full = {(e, part): torch.randn(inter, H) if part != "down" else torch.randn(H, inter)
            for e in range(E) for part in ("gate", "up", "down")}

    def build(tp: TPGroup, ep: bool) -> FusedMoE:
        layer = FusedMoE(E, H, inter, tp, ep)
        for (e, part), t in full.items():
            param, half = (layer.w2, None) if part == "down" else (layer.w13, 0 if part == "gate" else 1)
            layer.weight_loader(param, t, (e, half))
        return layer

    x = torch.randn(5, H)
    w, ids = route(torch.randn(5, E), k, True, None)
    whole = build(TPGroup(), False)
    ranks = [build(TPGroup(rank=r, size=2), True) for r in range(2)]
    assert ranks[1].w13.shape == (E // 2, 2 * inter, H)
    assert torch.equal(ranks[1].w2[0], full[(E // 2, "down")])
    torch.testing.assert_close(sum(r(x, w, ids) for r in ranks), whole(x, w, ids), rtol=1e-5, atol=1e-5)
    halves = [build(TPGroup(rank=r, size=2), False) for r in range(2)]
    assert halves[1].w13.shape == (E, inter, H)
    assert torch.equal(halves[1].w13[2, inter // 2:], full[(2, "up")][inter // 2:])
    torch.testing.assert_close(sum(r(x, w, ids) for r in halves), whole(x, w, ids), rtol=1e-5, atol=1e-5)


def test_roofline_counts_active_experts() -> None:
    """bench.one_batch / offline count the routed experts a token uses: FLOPs from the active parameters (the
    config's own count), batch-1 decode bytes from the k experts of each sparse layer, all experts at large
    batches."""
    from types import SimpleNamespace

    from radixserve.bench.roofline import model_costs, step_weight_bytes
    from radixserve.distributed.group import TPGroup
    from radixserve.kvcache.pool import KVPool
    from radixserve.models.llama import LlamaForCausalLM
    cfg = ModelConfig.from_hf(transformers.Qwen2MoeConfig(**{**COMMON, **MOE_CASES["qwen2_moe"][1]}))
    model = LlamaForCausalLM(cfg, TPGroup())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    pool = KVPool(cfg.num_layers, 8, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    cost = model_costs(SimpleNamespace(runner=SimpleNamespace(model=model, kv_pool=pool, weight_bytes=nbytes, cfg=cfg)))
    emb = cfg.vocab_size * cfg.hidden_size
    assert cost["body_params"] == cfg.num_params(active=True) - 2 * emb
    assert step_weight_bytes(cost, 1) == pytest.approx(4 * (cfg.num_params(active=True) - emb))
    assert step_weight_bytes(cost, 10_000) == pytest.approx(4 * (cfg.num_params() - emb))
    assert cost["moe_layers"] == 1 and cost["top_k"] == 3


def _write_fp8_moe(path: str, block: tuple[int, int]) -> torch.nn.Module:
    """A tiny random Qwen3-MoE as a block-FP8 checkpoint (Qwen3-30B-A3B-FP8's layout: every linear layer but
    the router and the LM head in e4m3 with weight_scale_inv). Returns HF's model on the dequantized weights:
    the reference. Expert sizes leave partial edge blocks (48 = 32 + 16)."""
    import json
    import os

    from safetensors.torch import save_file

    from radixserve.kernels.fp8 import dequantize, quantize_blocks
    cls_name, extra = MOE_CASES["qwen3_moe"]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra, "moe_intermediate_size": 48})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)  # HF's per-expert checkpoint names, then quantized below
    from safetensors.torch import load_file
    sd = load_file(os.path.join(path, "model.safetensors"))
    out, deq = {}, {}
    for name, t in sd.items():
        linear = name.endswith("_proj.weight") or (".experts." in name and name.endswith(".weight"))
        if t.dim() != 2 or not linear:
            out[name] = deq[name] = t
            continue
        t = t * 3  # wider than HF's init, so greedy has clear winners
        q, s = quantize_blocks(t, block)
        out[name], out[name[:-len("weight")] + "weight_scale_inv"] = q, s
        deq[name] = dequantize(q, s.repeat_interleave(block[0], 0)[: t.shape[0]].repeat_interleave(block[1], 1)
                               [:, : t.shape[1]].contiguous())
    os.remove(os.path.join(path, "model.safetensors"))
    save_file(out, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(_hf_fused_names(deq, cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return ref


def _hf_fused_names(sd: dict, cfg) -> dict:
    """Checkpoint (per-expert) names -> the in-memory names of transformers' stacked experts."""
    out = {k: v for k, v in sd.items() if ".experts." not in k}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in sd:
            continue
        E = cfg.num_experts
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([sd[f"{p}.{e}.gate_proj.weight"],
                                                           sd[f"{p}.{e}.up_proj.weight"]]) for e in range(E)])
        out[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    return out


def test_block_fp8_moe_checkpoint_matches_hf_on_dequantized_weights(tmp_path) -> None:
    from radixserve.engine.model_runner import ModelRunner
    from radixserve.weights.loader import resolve_model
    ref = _write_fp8_moe(str(tmp_path), (32, 32))
    sargs = ServerArgs(model=str(tmp_path), device="cpu", max_total_tokens=256, cpu_weight_dtype="float32")
    runner = ModelRunner(sargs, resolve_model(str(tmp_path)))
    experts = runner.model.model.layers[0].mlp.experts
    assert experts.w13.dtype == torch.float8_e4m3fn and experts.w2_scale.shape == (8, 64, 2)
    prompts = _prompts()
    want = [_hf_greedy(ref, p) for p in prompts]
    (got,), steps, _ = _run_ours(str(tmp_path), prompts)
    assert got == want
    _check_logits(ref, prompts, got, steps)


def test_fp8_experts_online_and_kernel_layout() -> None:
    """--quantization fp8 quantizes each expert's rows after loading; the layer then computes the MoE of the
    dequantized weights (what the W8A16 kernel computes), within fp8 rounding of the 16-bit layer."""
    from radixserve.distributed.group import TPGroup
    from radixserve.layers.moe import FusedMoE
    from radixserve.layers.quantization.fp8 import Fp8Config
    torch.manual_seed(0)
    E, H, inter, k = 4, 32, 16, 2
    layer = FusedMoE(E, H, inter, TPGroup(), False, Fp8Config(None))
    plain = FusedMoE(E, H, inter, TPGroup(), False)
    for m in (layer, plain):
        torch.manual_seed(1)
        m.w13.data.normal_()
        m.w2.data.normal_()
    layer.process_weights_after_loading()
    assert layer.w13.dtype == torch.float8_e4m3fn and layer.w13_scale.shape == (E, 2 * inter, 1)
    x = torch.randn(7, H)
    w, ids = route(torch.randn(7, E), k, True, None)
    deq13 = layer.w13.float() * layer.w13_scale
    deq2 = layer.w2.float() * layer.w2_scale
    torch.testing.assert_close(layer(x, w, ids), fused_moe_ref(x, deq13, deq2, w, ids), rtol=1e-5, atol=1e-5)
    ref = plain(x, w, ids)
    assert float((layer(x, w, ids) - ref).abs().max() / ref.abs().max()) < 0.1


def test_sparse_block_under_torch_compile() -> None:
    """--enable-torch-compile traces the decoder with fullgraph=True: the MoE block must trace whole (the
    experts are one opaque op) and compute what it computes eagerly."""
    from radixserve.distributed.group import TPGroup
    from radixserve.layers.moe import SparseMoeBlock
    cfg = ModelConfig.from_hf(transformers.Qwen2MoeConfig(**{**COMMON, **MOE_CASES["qwen2_moe"][1]}))
    torch.manual_seed(0)
    block = SparseMoeBlock(cfg.moe, cfg.hidden_size, TPGroup())
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    for p in block.experts.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(5, cfg.hidden_size)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
