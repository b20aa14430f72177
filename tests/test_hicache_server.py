"""HiCache through a real server and the official openai client: host hits show up in `usage.cached_tokens`
and in /metrics split by tier; a second server started on the same --hicache-storage-dir reports cached
tokens for the prefixes the first one wrote, and answers exactly as the first did (greedy). /flush_cache
empties device and host tiers and keeps the files."""
from __future__ import annotations

import glob
import json
import os
import urllib.request

import openai
from conftest import launch_server
from prometheus_client.parser import text_string_to_metric_families

CONVS = [" ".join(f"Note {i}: the {w} box holds {i * (c + 2)} coins." for i in range(8))
         for c, w in enumerate(["red", "green", "blue"])]


def flags(store: str) -> list[str]:
    return ["--max-total-tokens", "256", "--page-size", "16", "--enable-hierarchical-cache", "--hicache-ratio", "6",
            "--hicache-storage-backend", "file", "--hicache-storage-dir", store,
            "--hicache-storage-prefetch-policy", "wait_complete", "--enable-metrics", "--enable-cache-report",
            "--cpu-weight-dtype", "float16"]  # host hits must equal fresh answers: one numeric path


def complete(base_url: str, prompt: str):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
    r = client.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens


def metric(base_url: str, name: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    fam = fams["radixserve:" + name]
    return next(s.value for s in fam.samples if not s.name.endswith("_created"))


def test_host_hits_metrics_flush_and_restart_on_same_storage(tmp_path):
    store = str(tmp_path / "kv")
    with launch_server(*flags(store)) as s:
        first = [complete(s.base_url, c) for c in CONVS]  # each evicts the one before from the device
        assert all(cached == 0 for _, cached in first)
        again = [complete(s.base_url, c) for c in CONVS]
        assert [t for t, _ in again] == [t for t, _ in first]
        assert all(cached >= 32 for _, cached in again)
        host = metric(s.base_url, "host_cached_tokens")
        assert host == sum(c for _, c in again) and metric(s.base_url, "device_cached_tokens") == 0
        assert metric(s.base_url, "cached_tokens") == host
        assert metric(s.base_url, "hicache_host_used_tokens") > 0
        with urllib.request.urlopen(urllib.request.Request(s.base_url + "/flush_cache", method="POST"),
                                    timeout=30) as r:
            assert r.status == 200
        assert metric(s.base_url, "hicache_host_used_tokens") == 0
        assert complete(s.base_url, CONVS[0])[1] >= 32  # flushed tiers, but the files are still there
    assert glob.glob(os.path.join(store, "*", "*.kv")) and not glob.glob(os.path.join(store, "*", "*.tmp"))
    with launch_server(*flags(store)) as s:
        restarted = [complete(s.base_url, c) for c in CONVS]
        assert [t for t, _ in restarted] == [t for t, _ in first]
        assert all(cached >= 32 for _, cached in restarted), json.dumps(restarted)
        assert metric(s.base_url, "storage_cached_tokens") == sum(c for _, c in restarted)
