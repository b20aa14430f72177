"""PD disaggregation figures: the TCP KV transport's throughput, and what PD costs in time to first token.

```
python -m radixserve.bench.pd transport [--tokens 256 1024 4096] [--output out.json]
python -m radixserve.bench.pd serving --prefill URL --bootstrap-port P --decode URL --plain URL
        [--prompt-tokens 512] [--requests 8] [--output out.json]
```
`transport`: one request's KV in SmolLM2-135M's layout (30 layers, 3 KV heads x 64, float32: 46,080 B per
token) sent by a TCPKVSender to a TCPKVReceiver over loopback, through the real bootstrap lookup; MB/s is
bytes / (first byte of the reply to the last), the median of several runs.

`serving`: this script plays the gateway's PD role (the same body, with a fresh bootstrap_room, sent to the
prefill and the decode server at once) and streams from the decode server; the plain run sends the same
prompt to `--plain` without PD. Every prompt starts with a unique number, so neither run hits a prefix cache.
TTFT is measured at the client, request sent to first streamed token, and the requests go one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time

import httpx
import torch

from radixserve.bench.roofline import device_name, git_commit
from radixserve.disaggregation.bootstrap import BootstrapServer, register
from radixserve.disaggregation.tcp import TCPKVReceiver, TCPKVSender
from radixserve.disaggregation.types import BootstrapInfo, KVPayload

LAYOUT = (30, 3, 64, torch.float32)  # SmolLM2-135M on CPU


def transport(tokens: list[int], runs: int) -> list[dict]:
    boot = BootstrapServer("127.0.0.1", 0)
    sender = TCPKVSender("127.0.0.1", timeout_s=60)
    register("127.0.0.1", boot.port, 0, "127.0.0.1", sender.port)
    receiver = TCPKVReceiver(0, 60, LAYOUT)
    layers, heads, dim, dtype = LAYOUT
    rows = []
    try:
        for n in tokens:
            kv = torch.randn(layers, 2, n, heads, dim).to(dtype)
            rates, walls = [], []
            for r in range(runs):
                room = n * 1000 + r
                start = time.perf_counter()
                t = receiver.fetch(BootstrapInfo("127.0.0.1", boot.port, room), n)
                sender.offer(room, KVPayload(kv, 1, 0))
                t.done.wait(60)
                walls.append(time.perf_counter() - start)
                assert t.error is None and torch.equal(t.payload.kv, kv), t.error
                rates.append(t.nbytes / t.seconds / 1e6)
            rows.append({"tokens": n, "mbytes": round(kv.numel() * kv.element_size() / 1e6, 2),
                         "mb_per_s_median": round(statistics.median(rates), 1),
                         "wall_ms_median": round(statistics.median(walls) * 1e3, 2), "runs": runs})
    finally:
        sender.close()
        boot.close()
    return rows


def ttft(url: str, body: dict) -> float:
    start = time.perf_counter()
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                return time.perf_counter() - start
    raise RuntimeError("no token streamed")


def serving(b: argparse.Namespace) -> dict:
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his her they were".split()
    pd_t, plain_t = [], []
    for i in range(b.requests + 1):  # the first pair warms both paths up and is not counted
        text = f"{rng.randrange(10**9)} " + " ".join(rng.choice(words) for _ in range(b.prompt_tokens))
        body = {"text": text, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
        room = rng.randrange(2**62)
        pd_body = {**body, "bootstrap_host": b.bootstrap_host, "bootstrap_port": b.bootstrap_port,
                   "bootstrap_room": room}
        pre = threading.Thread(target=httpx.post, args=(b.prefill + "/generate",), kwargs={"json": pd_body,
                                                                                         "timeout": 300})
        pre.start()
        t_pd = ttft(b.decode, pd_body)
        pre.join()
        t_plain = ttft(b.plain, {**body, "text": "x" + text})
        if i:
            pd_t.append(t_pd)
            plain_t.append(t_plain)
    tokens = httpx.post(b.plain + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 0}},
                        timeout=60).json()["meta_info"]["prompt_tokens"]
    live = httpx.get(b.decode + "/server_info", timeout=30).json()["internal_states"][0]
    mb = live.get("pd_transfer_bytes", 0) / 1e6
    secs = live.get("pd_transfer_seconds", 0.0)
    return {"prompt_tokens": tokens, "requests": len(pd_t),
            "ttft_plain_ms_median": round(statistics.median(plain_t) * 1e3, 1),
            "ttft_pd_ms_median": round(statistics.median(pd_t) * 1e3, 1),
            "pd_cost_ms_median": round((statistics.median(pd_t) - statistics.median(plain_t)) * 1e3, 1),
            "decode_side_transfer_mb_per_s": round(mb / secs, 1) if secs else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m radixserve.bench.pd", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("transport")
    t.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    t.add_argument("--runs", type=int, default=5)
    s = sub.add_parser("serving")
    s.add_argument("--prefill", required=True)
    s.add_argument("--decode", required=True)
    s.add_argument("--plain", required=True)
    s.add_argument("--bootstrap-host", default="127.0.0.1")
    s.add_argument("--bootstrap-port", type=int, default=8998)
    s.add_argument("--prompt-tokens", type=int, default=512)
    s.add_argument("--requests", type=int, default=8)
    for sp in (t, s):
        sp.add_argument("--output")
    b = p.parse_args(argv)
    figures = transport(b.tokens, b.runs) if b.cmd == "transport" else serving(b)
    out = {"bench": f"pd.{b.cmd}", "device": device_name("cpu"), "commit": git_commit(),
           "command": "python -m radixserve.bench.pd " + " ".join(argv if argv is not None else sys.argv[1:]),
           "load_avg_1m": os.getloadavg()[0],  # other work on the machine meanwhile (shared CI / dev hosts)
           "figures": figures}
    print(json.dumps(out, indent=2))
    if b.output:
        with open(b.output, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
