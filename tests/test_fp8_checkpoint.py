"""Pre-quantized FP8 checkpoints in the HF layout, built here from a tiny random HF Llama.

Reference: HF transformers on the *dequantized* weights (fp8 value x scale, float32). Our engine
runs the FP8 weights through its W8A16 path (dequantize and matmul on CPU), which computes the same
function, so prefill logits must agree to float32 summation noise (max |diff| < 1e-4 on logits of
magnitude ~1e-1..1) and greedy outputs must be equal. Sizes are chosen so that every 128x128 block
layout has partial edge blocks (hidden 160, intermediate 320, KV projection 32 rows).

TP sharding of weights and scales is checked layer by layer: each rank's dequantized weight must be
exactly its slice of the full dequantized weight.
"""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.distributed.group import TPGroup
from radixserve.engine.model_runner import ModelRunner
from radixserve.kernels.fp8 import dequantize, quantize_blocks, quantize_rows
from radixserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from radixserve.layers.quantization import Fp8Config, process_weights_after_loading, resolve_quant_config
from radixserve.layers.quantization import fp8 as fp8_mod
from radixserve.scheduler.scheduler import Scheduler
from radixserve.weights.fp8_checkpoint import check_fp8_checkpoint, header_shapes
from radixserve.weights.loader import resolve_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8 = torch.float8_e4m3fn
INPUT_SCALES = {"q_proj": 0.05, "k_proj": 0.07, "v_proj": 0.06, "o_proj": 0.04, "gate_proj": 0.05, "up_proj": 0.08,
                "down_proj": 0.03}


def tiny_hf_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=160, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=5, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init (std 0.02) gives near-uniform logits; widen them so greedy has clear winners
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def write_fp8_checkpoint(path: str, scheme: str, seed: int = 0, kv_scales: bool = False):
    """Quantize a tiny HF Llama's linear layers in the HF FP8 layout and save it. scheme: "block"
    (weight_scale_inv, [128, 128]) or "tensor" (weight_scale, static input_scale). Returns the HF model
    with the dequantized weights: the reference."""
    from safetensors.torch import save_file
    model = tiny_hf_llama(seed)
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if not (name.endswith(".weight") and any(f".{n}." in name for n in LINEARS)):
            out[name] = t
            continue
        base = name[: -len(".weight")]
        if scheme == "block":
            q, s = quantize_blocks(t, (128, 128))
            out[name], out[base + ".weight_scale_inv"] = q, s
            deq = dequantize(q, s.repeat_interleave(128, 0)[: t.shape[0]])
        else:
            q, s = quantize_rows(t.reshape(1, -1))
            q = q.reshape(t.shape)
            out[name] = q
            # HF writes per-tensor scales as 0-d or [1] tensors; use both
            out[base + ".weight_scale"] = s.reshape(()) if "q_proj" in name else s.reshape(1)
            out[base + ".input_scale"] = torch.tensor([INPUT_SCALES[base.rsplit(".", 1)[1]]])
            deq = q.float() * s.reshape(())
        sd[name] = deq
    if kv_scales:
        for n in range(model.config.num_hidden_layers):
            out[f"model.layers.{n}.self_attn.k_scale"] = torch.tensor(0.5)
            out[f"model.layers.{n}.self_attn.v_scale"] = torch.tensor(0.25)
    model.load_state_dict(sd)
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]} if scheme == "block" else
                                  {"quant_method": "fp8", "activation_scheme": "static"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return model


def make_runner(path: str, **kw) -> ModelRunner:
    args = ServerArgs(model=path, device="cpu", max_total_tokens=1024, cpu_weight_dtype="float32", **kw)
    return ModelRunner(args, resolve_model(path))


def greedy(runner: ModelRunner, prompts: list[list[int]], n: int) -> list[list[int]]:
    sched = Scheduler(runner.args, runner, None)
    sp = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    reqs = [Req(list(p), sp) for p in prompts]
    for r in reqs:
        sched.add_request(r)
    while sched.has_work:
        sched.step()
    return [r.output_ids for r in reqs]


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]


PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 1, 30], list(range(40, 100))]


@pytest.mark.parametrize("scheme", ["block", "tensor"])
def test_checkpoint_matches_hf_on_dequantized_weights(tmp_path, scheme, caplog):
    ref = write_fp8_checkpoint(str(tmp_path), scheme)
    with caplog.at_level(logging.INFO):
        runner = make_runner(str(tmp_path))
    layer = runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == FP8 and layer.mlp.down_proj.weight.dtype == FP8
    assert "fp8 e4m3 checkpoint" in caplog.text  # the start-up line names the weights' format
    if scheme == "tensor":
        # static input scales: fused q, k, v (and gate, up) keep the largest of their parts
        assert layer.self_attn.qkv_proj.input_scale.item() == pytest.approx(INPUT_SCALES["k_proj"])
        assert layer.mlp.gate_up_proj.input_scale.item() == pytest.approx(INPUT_SCALES["up_proj"])
    from radixserve.bench.quant_accuracy import teacher_forced_logits
    for ids in PROMPTS:
        ours = teacher_forced_logits(runner, ids)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        assert (ours - theirs).abs().max().item() < 1e-4, scheme
    assert greedy(runner, PROMPTS, 8) == hf_greedy(ref, PROMPTS, 8)


def test_kv_scales_from_checkpoint(tmp_path):
    """k_scale / v_scale land in the FP8 pool (and only there), and reads multiply them back: the
    teacher-forced next-token distributions stay within FP8-KV noise of HF's on the dequantized weights
    (mean KL < 0.01 nats; measured ~1e-3. A read that forgot the scales would see K x2 and V x4)."""
    from radixserve.bench.quant_accuracy import teacher_forced_logits
    ref = write_fp8_checkpoint(str(tmp_path), "block", kv_scales=True)
    runner = make_runner(str(tmp_path), kv_cache_dtype="fp8_e4m3")
    assert runner.kv_pool.k_scale == [0.5, 0.5] and runner.kv_pool.v_scale == [0.25, 0.25]
    assert runner.kv_pool.k[0].dtype == FP8
    for ids in PROMPTS:
        ours = teacher_forced_logits(runner, ids).log_softmax(-1)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert float((theirs.exp() * (theirs - ours)).sum(-1).mean()) < 0.01
    plain = make_runner(str(tmp_path))  # auto KV dtype: the scales are not applied to a float32 pool
    assert plain.kv_pool.k_scale == [1.0, 1.0]


def test_bad_scale_shape_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    write_fp8_checkpoint(str(tmp_path), "block")
    f = os.path.join(str(tmp_path), "model.safetensors")
    t = load_file(f)
    t["model.layers.1.mlp.down_proj.weight_scale_inv"] = torch.ones(3, 3)  # should be [2, 3]
    save_file(t, f)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_scale_inv.*expected \[2, 3\]"):
        make_runner(str(tmp_path))
    del t["model.layers.1.mlp.down_proj.weight_scale_inv"]
    save_file(t, f)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has no weight_scale_inv"):
        check_fp8_checkpoint(header_shapes(str(tmp_path)), (128, 128))


def test_per_tensor_scale_shape_error():
    shapes = {"a.weight": ((64, 32), "F8_E4M3"), "a.weight_scale": ((2,), "F32")}
    with pytest.raises(ValueError, match=r"a\.weight_scale has shape \[2\].*expected one value"):
        check_fp8_checkpoint(shapes, None)


def test_no_fp8_matmul_dequantizes_with_warning(tmp_path, monkeypatch, caplog):
    """On a GPU without FP8 (faked here) a checkpoint loads dequantized, with a warning, and computes the same."""
    ref = write_fp8_checkpoint(str(tmp_path), "block")
    monkeypatch.setattr("radixserve.layers.quantization.fp8_supported", lambda device: False)
    with caplog.at_level(logging.WARNING):
        runner = make_runner(str(tmp_path))
    assert "dequantized" in caplog.text
    assert runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    assert greedy(runner, PROMPTS[:2], 6) == hf_greedy(ref, PROMPTS[:2], 6)
    # and --quantization fp8 on such a GPU is refused, naming the requirement
    with pytest.raises(ValueError, match="compute capability"):
        resolve_quant_config("fp8", None, torch.device("cpu"))


def _full_tensors(seed: int, out: int, inp: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    q, s = quantize_blocks(w, (128, 128))
    return q, s, dequantize(q, s.repeat_interleave(128, 0)[:out])


def _load(layer, name: str, tensor: torch.Tensor, shard=None) -> None:
    p = getattr(layer, name)
    p.weight_loader(p, tensor, shard)


@pytest.mark.parametrize("rank", [0, 1])
def test_tp_shards_block_scales_with_their_weights(rank):
    """TP=2: QKV (1 KV head: replicated), gate_up and down; each rank's dequantized weight is its slice."""
    tp = TPGroup(rank=rank, size=2)
    quant = Fp8Config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    hidden, head_dim, heads, inter = 192, 32, 6, 512
    qkv = QKVParallelLinear(hidden, head_dim, heads, 1, False, tp, quant)
    parts = {s: _full_tensors(i, n, hidden) for i, (s, n) in enumerate([("q", heads * head_dim), ("k", 32), ("v", 32)])}
    for s, (q, sc, _) in parts.items():
        _load(qkv, "weight", q, s)
        _load(qkv, "weight_scale_inv", sc, s)
    gate_up = MergedColumnParallelLinear(hidden, [inter, inter], False, tp, quant)
    gu = [_full_tensors(10 + i, inter, hidden) for i in range(2)]
    for i, (q, sc, _) in enumerate(gu):
        _load(gate_up, "weight", q, i)
        _load(gate_up, "weight_scale_inv", sc, i)
    down = RowParallelLinear(inter, hidden, False, tp, quant)
    dq, ds, ddeq = _full_tensors(20, hidden, inter)
    _load(down, "weight", dq)
    _load(down, "weight_scale_inv", ds)
    for layer in (qkv, gate_up, down):
        process_weights_after_loading(layer)
    qn = heads // 2 * head_dim
    want_qkv = torch.cat([parts["q"][2][rank * qn:(rank + 1) * qn], parts["k"][2], parts["v"][2]])
    n = inter // 2
    want_gu = torch.cat([d[rank * n:(rank + 1) * n] for _, _, d in gu])
    want_down = ddeq[:, rank * n:(rank + 1) * n]
    for layer, want in ((qkv, want_qkv), (gate_up, want_gu), (down, want_down)):
        got = dequantize(layer.weight.data, layer.weight_scale.data)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tp_refuses_to_split_a_block():
    """Row-parallel input split inside a 128-wide block: an error that says so."""
    tp = TPGroup(rank=0, size=2)
    quant = Fp8Config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    down = RowParallelLinear(320, 64, False, tp, quant)  # 160 input columns per rank
    q, s, _ = _full_tensors(0, 64, 320)
    with pytest.raises(ValueError, match="128-wide quantization blocks"):
        _load(down, "weight_scale_inv", s)


def test_w8a8_path_for_many_tokens():
    """>= w8a8_min_tokens rows with per-channel scales: activations are quantized per token (the CPU twin
    of _scaled_mm); the result is the W8A8 reference exactly and the fp32 product within FP8 noise."""
    from radixserve.kernels.fp8 import w8a8_ref
    layer = RowParallelLinear(256, 96, False, TPGroup(), Fp8Config(None))
    w = torch.randn(96, 256)
    _load(layer, "weight", w)
    process_weights_after_loading(layer)
    x = torch.randn(fp8_mod.w8a8_min_tokens(96, 256) + 3, 256)
    y = layer(x)
    torch.testing.assert_close(y, w8a8_ref(x, layer.weight, layer.weight_scale), rtol=0, atol=0)
    exact = x @ w.t()
    assert ((y - exact).norm() / exact.norm()).item() < 0.06  # e4m3 has 3 mantissa bits on both operands
    small = layer(x[:4])  # below the switch: weight-only
    assert ((small - exact[:4]).norm() / exact[:4].norm()).item() < 0.04


def test_static_input_scale_in_w8a8():
    """A static checkpoint's input_scale quantizes the activations of the W8A8 path (no per-token amax)."""
    from radixserve.kernels.fp8 import w8a8_ref
    quant = Fp8Config({"quant_method": "fp8", "activation_scheme": "static"})
    layer = RowParallelLinear(256, 96, False, TPGroup(), quant)
    w = torch.randn(96, 256)
    q, s = quantize_rows(w.reshape(1, -1))
    _load(layer, "weight", q.reshape(96, 256))
    _load(layer, "weight_scale", s.reshape(()))
    _load(layer, "input_scale", torch.tensor([0.02]))
    process_weights_after_loading(layer)
    x = torch.randn(fp8_mod.w8a8_min_tokens(96, 256), 256)
    want = w8a8_ref(x, layer.weight, layer.weight_scale, torch.tensor([0.02]))
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    assert not torch.equal(want, w8a8_ref(x, layer.weight, layer.weight_scale))  # the scale mattered


def test_norm_and_silu_quantize_for_w8a8_bitwise(tmp_path, monkeypatch):
    """From w8a8_min_tokens rows, RMSNorm and SiLU-and-mul hand qkv, gate_up and down their input already
    quantized per token (QuantizedActivation) instead of a 16/32-bit tensor the matmul quantizes again. The
    logits of a 600-token prefill are bitwise those of the unfused path (input_quant switched off), and the
    fused path ran for the three projections of each layer."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from radixserve.bench.quant_accuracy import teacher_forced_logits
    from radixserve.weights.loader import resolve_model

    torch.manual_seed(0)
    HFLlama(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    args = ServerArgs(model=str(tmp_path), device="cpu", max_total_tokens=1024, quantization="fp8",
                      cpu_weight_dtype="float32")
    runner = ModelRunner(args, resolve_model(str(tmp_path)))
    ids = torch.randint(3, 250, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    assert len(ids) >= fp8_mod.w8a8_min_tokens(128, 64)
    calls = []
    real = fp8_mod._apply_quantized
    monkeypatch.setattr(fp8_mod, "_apply_quantized", lambda *a: calls.append(a[2].q.shape) or real(*a))
    fused = teacher_forced_logits(runner, ids)
    assert len(calls) == 2 * 3 and all(s[0] == 600 for s in calls)
    monkeypatch.setattr(fp8_mod.Fp8LinearMethod, "input_quant", lambda self, layer, n: None)
    calls.clear()
    unfused = teacher_forced_logits(runner, ids)
    assert not calls
    assert torch.equal(fused, unfused)
    assert teacher_forced_logits(runner, ids[:40]).shape == (40, 256)  # below the switch: weight-only, unfused
