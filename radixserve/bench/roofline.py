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
from radixserve.layers.quantization.cpu_int4 import INT4_MAX_ROWS


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
    model and KV pool (engine: radixserve.engine_unit.Engine).

    body_params are the matmul parameters one token goes through: for an MoE model only its top-k routed
    experts of each sparse layer (on this rank: its share of them under --ep-size), so FLOPs = 2 x body_params
    per token. weight_bytes_read counts every weight; what a decode step reads is step_weight_bytes."""
    m, pool = engine.runner.model, engine.runner.kv_pool
    emb, attn = m.model.embed_tokens.weight, m.model.layers[0].self_attn.attn
    # packed weights (--cpu-weight-dtype float16) are not parameters: a packed layer whose parameter is gone
    # counts its packed_numel instead
    packed = sum(mod.packed_numel for mod in m.model.modules()
                 if getattr(mod, "packed_numel", 0) and getattr(mod, "weight", None) is None)
    head_params = getattr(m.lm_head, "packed_numel", 0) or m.lm_head.weight.numel()
    # the embedding table is only gathered from, unless it is also the (unpacked) head that multiplies
    table_multiplied = m.lm_head.weight is emb and not getattr(m.lm_head, "packed_numel", 0)
    gathered_bytes = 0 if table_multiplied else emb.numel() * emb.element_size()
    k = pool.k[0]  # [slots, kv heads of this rank, head_dim]
    # 4-bit copies (--cpu-weight-dtype int4) sit beside the float16 ones: a step reads one of the two
    int4 = [mod for mod in m.modules() if getattr(mod, "int4_nbytes", 0)]
    int4_bytes = sum(mod.int4_nbytes for mod in int4)
    cost = {"body_params": sum(p.numel() for p in m.model.parameters()) + packed - emb.numel(),
            "head_params": head_params,
            "weight_bytes_read": engine.runner.weight_bytes - gathered_bytes - int4_bytes,
            "int4_saving": sum(mod.packed_nbytes for mod in int4) - int4_bytes, "int4_max_rows": INT4_MAX_ROWS,
            "kv_bytes_per_token": KVPool.bytes_per_token(len(pool.k), k.shape[1], k.shape[2], k.dtype),
            "num_layers": len(pool.k), "num_heads": attn.num_heads, "head_dim": attn.head_dim}
    experts = [layer.mlp.experts for layer in m.model.layers if hasattr(layer.mlp, "experts")]
    if experts:
        f, moe = experts[0], engine.runner.cfg.moe
        per_expert = f.w13[0].numel() + f.w2[0].numel()
        # a token's k experts: all on this rank, or (experts split whole over ranks) this rank's share of them
        active = len(experts) * moe.top_k * per_expert * f.local_experts // moe.num_experts
        cost.update(body_params=cost["body_params"] - len(experts) * f.local_experts * per_expert + active,
                    moe_layers=len(experts), num_experts=moe.num_experts, local_experts=f.local_experts,
                    top_k=moe.top_k, bytes_per_expert=per_expert * f.w13.element_size(),
                    expert_bytes=len(experts) * f.local_experts * per_expert * f.w13.element_size())
    return cost


def step_weight_bytes(cost: dict, batch: int) -> float:
    """Weight bytes one decode step of `batch` tokens must read. Dense: every weight. MoE: everything but the
    routed experts, plus the experts the batch touches, expected under uniform routing (a token picks k of E
    distinct experts: an expert escapes all `batch` tokens with probability (1 - k/E)^batch); at batch 1 that
    is exactly k experts per sparse layer. CPU int4 layers: their 4-bit copy up to int4_max_rows tokens."""
    read = cost["weight_bytes_read"] - (cost.get("int4_saving", 0) if batch <= cost.get("int4_max_rows", 0) else 0)
    if not cost.get("moe_layers"):
        return read
    touched = cost["local_experts"] * (1 - (1 - cost["top_k"] / cost["num_experts"]) ** batch)
    return read - cost["expert_bytes"] + cost["moe_layers"] * touched * cost["bytes_per_expert"]


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
