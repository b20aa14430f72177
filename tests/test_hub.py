"""Hub ids resolve through a local Hugging Face cache, offline; --model-source modelscope without the
package is a clear error. No network: the cache is built here in the hub's layout
(models--org--name/refs/<rev> + snapshots/<commit>/) from a tiny random Llama and the bundled tokenizer."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.weights.loader import load_tokenizer, resolve_hub_model, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT)
    tok = load_tokenizer(resolve_model(None))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(snap)
    tok.save_pretrained(snap)
    return str(cache)


@pytest.fixture
def offline(hub: str, monkeypatch: pytest.MonkeyPatch) -> str:
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hub_id_resolves_from_the_cache(offline: str) -> None:
    snap = os.path.join(offline, "models--tiny-org--tiny-llama", "snapshots", COMMIT)
    assert resolve_model("tiny-org/tiny-llama").path == snap
    assert resolve_model("tiny-org/tiny-llama", revision="v1").path == snap
    assert resolve_model("tiny-org/tiny-llama", revision=COMMIT).path == snap
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("tiny-org/tiny-llama", revision="v2")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("tiny-org/absent")


def test_hub_model_serves_under_its_id(offline: str) -> None:
    args = ServerArgs(model="tiny-org/tiny-llama", device="cpu", max_total_tokens=512, cpu_weight_dtype="float32")
    resolve_hub_model(args)  # what the launcher does before starting any process
    assert args.served_model_name == "tiny-org/tiny-llama" and os.path.isdir(args.model)
    engine = Engine(args)
    assert engine.model_name == "tiny-org/tiny-llama"
    req = engine.run_to_completion([Req([1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True))])
    assert len(req[0].output_ids) == 4


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed")
def test_modelscope_without_the_package_names_it() -> None:
    with pytest.raises(FileNotFoundError, match="pip install modelscope"):
        resolve_model("qwen/Qwen2.5-0.5B-Instruct", source="modelscope")
