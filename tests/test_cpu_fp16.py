"""--cpu-weight-dtype float16 (what the CPU default, auto, runs a non-4-bit layer and every prefill with)
against the exact float32 engine on the bundled model: the reference is our float32 path, which
tests/test_engine_hf.py holds equal to HF transformers. Tolerances (measured on SmolLM2-135M Q4_1, 3 prompts):
logits within 0.1 absolute (the largest difference seen was 0.034), the same greedy tokens for 24 steps."""
from __future__ import annotations

import logging

import pytest
import torch

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.layers.quantization import cpu_weight_config
from radixserve.layers.quantization.cpu_fp16 import cpu_fp16_available

pytestmark = pytest.mark.skipif(not cpu_fp16_available(), reason="this torch has no FBGEMM (not an x86 build)")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
STEPS = 24
LOGIT_ATOL = 0.1


def run(engine: Engine, steps: int = STEPS) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of PROMPTS in one batch, and the logits of every step (row per request)."""
    logits: list[torch.Tensor] = []
    forward = engine.runner.forward

    def recording(reqs, is_decode, **kw):
        out = forward(reqs, is_decode, **kw)
        logits.append(out.clone())
        return out

    engine.runner.forward = recording
    try:
        sp = SamplingParams(temperature=0, max_new_tokens=steps, ignore_eos=True)
        reqs = [Req(engine.tokenizer.encode(p), sp) for p in PROMPTS]
        done = engine.run_to_completion(reqs)
    finally:
        engine.runner.forward = forward
    return [list(r.output_ids) for r in done], logits


@pytest.fixture(scope="module")
def engines():
    exact = Engine(ServerArgs(device="cpu", max_total_tokens=1024, cpu_weight_dtype="float32"))
    half = Engine(ServerArgs(device="cpu", max_total_tokens=1024, cpu_weight_dtype="float16"))
    return exact, half


def test_float16_weights_track_float32(engines) -> None:
    exact, half = engines
    tokens32, logits32 = run(exact)
    tokens16, logits16 = run(half)
    assert tokens16 == tokens32
    assert len(logits16) == len(logits32)
    worst = max((a - b).abs().max().item() for a, b in zip(logits32, logits16))
    assert worst <= LOGIT_ATOL, worst


def test_torch_compile_runs_the_packed_weights(engines) -> None:
    """--enable-torch-compile keeps the float16 weights: the decode graph calls FBGEMM through the opaque
    `radixserve::linear_fp16` op with no graph break, and tracks float32 within the same tolerances."""
    from torch._dynamo.utils import counters

    exact, _ = engines
    torch._dynamo.reset()
    counters.clear()
    compiled = Engine(ServerArgs(device="cpu", max_total_tokens=1024, enable_torch_compile=True,
                                 cpu_weight_dtype="float16"))
    assert compiled.runner.model.model.layers[0].mlp.down_proj.weight is None  # packed, not float32
    tokens32, logits32 = run(exact)
    tokens_c, logits_c = run(compiled)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters)
    assert tokens_c == tokens32
    worst = max((a - b).abs().max().item() for a, b in zip(logits32, logits_c))
    assert worst <= LOGIT_ATOL, worst


def test_packed_layers_drop_the_float32_copy(engines) -> None:
    exact, half = engines
    layer = half.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight is None and layer.mlp.down_proj.weight is None
    assert exact.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    # linear layers and head at 2 bytes a weight; the float32 embedding table stays for lookups
    assert half.runner.weight_bytes < 0.75 * exact.runner.weight_bytes


def test_choice_is_logged_and_checked(caplog) -> None:
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO):
        assert cpu_weight_config("auto", cpu, torch.float32) is not None
    assert "--cpu-weight-dtype auto" in caplog.text and "float16 packed for FBGEMM" in caplog.text
    assert cpu_weight_config("float32", cpu, torch.float32) is None
    assert cpu_weight_config("auto", cpu, torch.bfloat16) is None  # a bf16 model keeps its weights
    with pytest.raises(ValueError, match="--dtype float32"):
        cpu_weight_config("float16", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="--cpu-weight-dtype"):
        ServerArgs(device="cpu", cpu_weight_dtype="int3")


def test_cpu_linear_bench_times_every_format() -> None:
    """bench.cpu_linear's matmul table: every format runs the step's shapes and counts its weight bytes."""
    from radixserve.bench.cpu_linear import matmul_step
    table = matmul_step([(64, 32), (32, 64)], 2, (128, 32), 1, bandwidth=1e10, repeats=2)
    assert {"float32", "fp16_fbgemm", "int8_fbgemm", "int8pack"} <= set(table)
    f32 = (2 * 2 * 64 * 32 + 128 * 32) * 4
    assert table["float32"]["weight_bytes"] == 2 * table["fp16_fbgemm"]["weight_bytes"] == f32
    assert all(r["step_s"] > 0 and r["floor_s"] > 0 for r in table.values())



def test_untied_head_drops_its_float32_copy(tmp_path) -> None:
    """An untied LM head packs like any layer (only a tied one keeps the table it shares with the
    embedding), and the roofline still counts its weights: the same body/head sizes as float32."""
    from types import SimpleNamespace

    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from radixserve.bench.roofline import model_costs
    from radixserve.engine.model_runner import ModelRunner
    from radixserve.weights.loader import resolve_model

    HFLlama(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
            ).save_pretrained(tmp_path)
    costs = {}
    for dtype in ("float32", "float16"):
        runner = ModelRunner(ServerArgs(model=str(tmp_path), device="cpu", max_total_tokens=256,
                                        cpu_weight_dtype=dtype), resolve_model(str(tmp_path)))
        costs[dtype] = model_costs(SimpleNamespace(runner=runner))
        if dtype == "float16":
            assert runner.model.lm_head.weight is None and runner.model.lm_head.packed_numel == 256 * 64
    assert costs["float16"]["body_params"] == costs["float32"]["body_params"]
    assert costs["float16"]["head_params"] == costs["float32"]["head_params"] == 256 * 64
    assert costs["float16"]["weight_bytes_read"] < 0.6 * costs["float32"]["weight_bytes_read"]
