"""--cpu-weight-dtype int4 (auto's choice on x86): a GGUF's 4-bit matrices kept at 4 bits for decoding.

References: gguf-py's own Q4_0 / Q4_1 / Q8_0 encoders for which matrices are 4-bit grids and what their values
are; F.linear on the dequantized matrix for one layer; and the float32 engine on the same bundled GGUF (which
tests/test_engine_hf.py holds equal to HF transformers) for the whole model.

Tolerances, measured on SmolLM2-135M Q4_1 (3 prompts, 64 steps): the int4 kernel rounds each matmul's input
and output to bfloat16, so logits move by up to 0.62 (float16 weights: 0.044). Stated: logits within 1.0 of
float32 while the greedy tokens agree, and the tokens part only where float32's top two logits are within
2.0 (a flip needs the two to cross; seen: at margins 0.005 and 0.015)."""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cpu_fp16 import PROMPTS, run

from radixserve.args import ServerArgs
from radixserve.engine_unit import Engine
from radixserve.layers.quantization import cpu_weight_config
from radixserve.layers.quantization.cpu_fp16 import cpu_fp16_available
from radixserve.layers.quantization.cpu_int4 import GROUP, INT4_MAX_ROWS, cpu_int4_available, int4_grid
from radixserve.weights.gguf_loader import dequantize

pytestmark = pytest.mark.skipif(not (cpu_fp16_available() and cpu_int4_available()),
                                reason="this torch has no FBGEMM or no int4 CPU kernel")

STEPS = 32
LOGIT_ATOL = 1.0


def gguf_matrix(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """A random matrix through gguf-py's encoder and our loader's dequantizer: what the loader yields."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05
    return dequantize(gguf.quants.quantize(w, qtype), qtype, shape)


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1])
def test_grid_recovers_4bit_gguf_values(qtype) -> None:
    w = gguf_matrix(qtype, (48, 256))
    q, scale, zero = int4_grid(w)
    assert q.min() >= 0 and q.max() <= 15
    back = ((q.float() - 8).view(48, -1, GROUP) * scale[..., None] + zero[..., None]).view(48, 256)
    torch.testing.assert_close(back, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: gguf_matrix(gguf.GGMLQuantizationType.Q8_0, (48, 256)),
                                  lambda: torch.randn(48, 256), lambda: torch.randn(48, 40)])
def test_grid_refuses_other_matrices(make) -> None:
    """Q8_0, plain floats and a width that is not whole groups keep the float16 path."""
    assert int4_grid(make()) is None


@pytest.fixture(scope="module")
def engines():
    exact = Engine(ServerArgs(device="cpu", max_total_tokens=1024, cpu_weight_dtype="float32"))
    int4 = Engine(ServerArgs(device="cpu", max_total_tokens=1024))  # auto
    return exact, int4


def test_layers_take_int4_up_to_the_switch_rows(engines) -> None:
    exact, int4 = engines
    layer = int4.runner.model.model.layers[0]
    for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert lin.int4_weight.dtype == torch.uint8 and lin.weight is None
    # the bundled GGUF's table (and tied head) is Q8_0: not a 4-bit grid, it keeps float16
    assert not hasattr(int4.runner.model.lm_head, "int4_weight")
    w = exact.runner.model.model.layers[0].mlp.down_proj.weight
    lin = layer.mlp.down_proj
    for rows in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1):
        x = torch.randn(rows, w.shape[1])
        ref = F.linear(x, w)
        out = lin(x)
        # bfloat16 input and output: ~2^-8 of the largest products
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


def test_int4_tracks_float32(engines) -> None:
    exact, int4 = engines
    tokens32, logits32 = run(exact, STEPS)
    tokens4, logits4 = run(int4, STEPS)
    agreed = 0
    for r in range(len(PROMPTS)):
        part = next((i for i, (a, b) in enumerate(zip(tokens32[r], tokens4[r])) if a != b), STEPS)
        agreed += part
        for step in range(min(part + 1, STEPS)):  # the step that parts still ran on the same tokens
            diff = (logits32[step][r] - logits4[step][r]).abs().max().item()
            assert diff <= LOGIT_ATOL, (r, step, diff)
        if part < STEPS:
            top = logits32[part][r].topk(2).values
            assert top[0] - top[1] <= 2 * LOGIT_ATOL, (r, part, top)
    assert agreed >= STEPS  # at least one prompt's worth of tokens agree (seen: 3 x 32 but one near-tie)


def test_auto_logs_the_choice(caplog) -> None:
    with caplog.at_level(logging.INFO):
        cfg = cpu_weight_config("auto", torch.device("cpu"), torch.float32)
    assert cfg.name == "cpu_int4" and "4-bit GGUF matrices stay 4-bit" in caplog.text
    assert cpu_weight_config("int4", torch.device("cpu"), torch.float32).name == "cpu_int4"
    with pytest.raises(ValueError, match="--dtype float32"):
        cpu_weight_config("int4", torch.device("cpu"), torch.bfloat16)
