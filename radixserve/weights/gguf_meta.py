"""What transformers rebuilds from a GGUF file's metadata, the config and the tokenizer, cached on disk
(weights/gguf_loader.py reads the tensors). Apart from the tensor code so that resolving and checking the
bundled model (the launcher, before it spawns anything) imports neither torch nor numpy."""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace


def _converted_dir(path: str) -> str:
    """Where the config and tokenizer that transformers rebuilds from a GGUF file are kept.

    transformers re-parses the whole file (vocab and merges included) on every load, ~10 s for the
    bundled model; saving its result once keyed by file identity makes later starts take ~0.3 s."""
    st = os.stat(path)
    key = f"{os.path.basename(path)}-{st.st_size}-{int(st.st_mtime)}"
    return os.path.join(os.path.expanduser("~/.cache/radixserve/gguf"), key)


FULL_CONFIG = "config_full.json"  # every field of the converted config, defaults included


def _load_converted(path: str, kind: str):
    """The config or tokenizer transformers rebuilds from the file, from the cache when it is there.

    Cached, neither goes through transformers' Auto classes: their first use in a process builds the import
    structure of every model transformers ships (~2-4 s on the 2-core machine, paid by the API server and the
    scheduler alike at start-up). The config comes back as a namespace of every field (the model code reads
    it by attribute, with defaults), the tokenizer as a PreTrainedTokenizerFast over the same tokenizer.json
    and tokenizer_config.json (same vocabulary, merges, special tokens and chat template)."""
    cached = os.path.join(_converted_dir(path), kind)
    if kind == "config" and os.path.isfile(os.path.join(cached, FULL_CONFIG)):
        try:
            with open(os.path.join(cached, FULL_CONFIG)) as f:
                return SimpleNamespace(**json.load(f))
        except (OSError, ValueError):
            pass  # a half-written or stale cache: rebuild it
    if kind == "tokenizer" and os.path.isfile(os.path.join(cached, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast
        try:
            return PreTrainedTokenizerFast.from_pretrained(cached, local_files_only=True)
        except (OSError, ValueError):
            pass
    from transformers import AutoConfig, AutoTokenizer

    auto = AutoConfig if kind == "config" else AutoTokenizer
    d, f = os.path.split(os.path.abspath(path))
    obj = auto.from_pretrained(d, gguf_file=f, local_files_only=True)
    try:
        tmp = f"{cached}.tmp{os.getpid()}"
        obj.save_pretrained(tmp)
        if kind == "config":
            with open(os.path.join(tmp, FULL_CONFIG), "w") as out:
                json.dump(obj.to_dict(), out)
        if os.path.isdir(cached):
            shutil.rmtree(cached, ignore_errors=True)  # an older cache without config_full.json
        os.replace(tmp, cached)
    except OSError:
        pass  # read-only home: just convert again next time
    return SimpleNamespace(**obj.to_dict()) if kind == "config" else obj


def load_gguf_config(path: str):
    """HF config from transformers' GGUF metadata parser (local file only, cached on disk)."""
    return _load_converted(path, "config")


def load_gguf_tokenizer(path: str):
    """HF fast tokenizer reconstructed from the GGUF vocab/merges (local file only, cached on disk)."""
    return _load_converted(path, "tokenizer")
