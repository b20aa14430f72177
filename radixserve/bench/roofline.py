"""Physical limits measured in the same process as a benchmark: device copy bandwidth and bf16
matmul rate. Figures are only meaningful next to the ceiling of the machine they ran on."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable

import torch

from radixserve.kvcache.pool import KVPool


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def git_commit() -> str:
    """HEAD of the checkout; copies without .git (the GPU host) pass it as GIT_COMMIT."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(__file__)).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _time(fn, iters: int, device: str) -> float:
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    if not device.startswith("cuda"):
        nbytes = 1 << 27
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time(lambda: dst.copy_(src), 20, device)


def matmul_rate(device: str, n: int = 8192) -> float:
    """FLOP/s of a square bf16 matmul (float32 on CPU, where bf16 is emulated)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    n = n if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _time(lambda: a @ b, 20, device)


def prefill_attention_flops(num_layers: int, num_heads: int, head_dim: int,
                            spans: Iterable[tuple[int, int]]) -> int:
    """Causal attention FLOPs of prefilling positions [start, end) of each prompt: the query at position p meets
    ~p keys in QK^T and in PV (2 FLOPs per multiply-add), so 4*p*head_dim per head and layer, which sums over
    [start, end) to 2*(end^2 - start^2)*head_dim."""
    return 2 * num_layers * num_heads * head_dim * sum(e * e - s * s for s, e in spans)


def model_costs(engine) -> dict[str, int]:
    """This rank's sizes for the rooflines of bench.one_batch and bench.offline, read from the loaded
    model and KV pool (engine: radixserve.engine_unit.Engine)."""
    m, pool = engine.runner.model, engine.runner.kv_pool
    emb, head, attn = m.model.embed_tokens.weight, m.lm_head.weight, m.model.layers[0].self_attn.attn
    gathered = 0 if emb is head else emb.numel()  # an untied embedding table is only gathered, never multiplied
    k = pool.k[0]  # [slots, kv heads of this rank, head_dim]
    return {"body_params": sum(p.numel() for p in m.parameters()) - gathered - head.numel(),
            "head_params": head.numel(),
            "weight_bytes_read": engine.runner.weight_bytes - gathered * emb.element_size(),
            "kv_bytes_per_token": KVPool.bytes_per_token(len(pool.k), k.shape[1], k.shape[2], k.dtype),
            "num_layers": len(pool.k), "num_heads": attn.num_heads, "head_dim": attn.head_dim}


def limits(device: str) -> dict:
    return {"copy_bandwidth_GBps": copy_bandwidth(device) / 1e9, "matmul_TFLOPs": matmul_rate(device) / 1e12}


def record(path: str | None, figures: dict, device: str) -> dict:
    """Print and (with a path) write a result with the device, commit and command that produced it."""
    out = {"device": device_name(device), "commit": git_commit(), "command": " ".join(sys.argv),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
    return out
