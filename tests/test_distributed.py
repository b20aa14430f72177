"""Tensor, data and multi-node parallelism on CPU: real gloo process groups, real servers on loopback.

SmolLM2's 9 heads / 3 KV heads divide by no TP size > 1, so the model here is a tiny random Llama saved
with transformers (hidden 128, 4 heads, 2 KV heads, 2 layers, float32) with the bundled tokenizer copied
beside it; its vocab is the tokenizer's 49152 so that text prompts work end to end. TP outputs are
compared with TP=1 token for token under greedy decoding (float32: the only difference is the order of a
few additions in the all-reduce, far below the gap between the top two logits).

The same servers run PD disaggregation (plain requests, without bootstrap fields, are served as by any server):
the TP=2 and DP=2 servers are prefill servers, the two-node TP=2 server is a decode server, and a TP=1 decode
engine runs in this process. TP=2 -> TP=2 moves each rank's KV shard to the rank with its number; DP=2 -> TP=1
follows the room to its replica; TP=1 -> TP=2 and TP=2 -> TP=1 take each decode rank's KV heads from the
prefill ranks that hold them (disaggregation/shards.py).
"""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import Server, descendants, free_port, start_server, wait_healthy
from test_server import get_json, post_json, request

from radixserve.args import ServerArgs
from radixserve.core import Req
from radixserve.core import SamplingParams as CoreSamplingParams
from radixserve.disaggregation.types import BootstrapInfo
from radixserve.distributed.bootstrap import check_layout, describe, plan_ranks
from radixserve.distributed.group import TPGroup
from radixserve.engine_unit import Engine
from radixserve.models.config import ModelConfig
from radixserve.models.llama import LlamaForCausalLM
from radixserve.server.router import PREFIX_BLOCK, Router
from radixserve.weights.loader import dummy_weights

PROMPTS = ["The quick brown fox", "Hello, my name is", "Once upon a time, " * 20]  # the last one is chunked
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
SAMPLED = {"max_new_tokens": 12, "temperature": 0.8, "seed": 7, "ignore_eos": True}
COMMON = ("--cpu-threads", "1", "--chunked-prefill-size", "32")


TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def tiny_hf_config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from transformers import LlamaForCausalLM as HFLlama

    from radixserve.weights.loader import load_tokenizer, resolve_model
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    HFLlama(tiny_hf_config()).save_pretrained(path)
    load_tokenizer(resolve_model(None)).save_pretrained(path)
    return str(path)


# ---- pieces, no processes ------------------------------------------------------------------------------
def test_args_checks() -> None:
    for kw, text in [({"tp_size": 3}, "power of two"), ({"tp_size": 2, "nnodes": 2}, "--dist-init-addr"),
                     ({"tp_size": 2, "nnodes": 4}, "must divide --tp"),
                     ({"dist_init_addr": "x"}, "HOST:PORT"),
                     ({"nnodes": 2, "node_rank": 2, "tp_size": 2, "dist_init_addr": "h:1"}, "--node-rank"),
                     ({"load_balance_method": "random"}, "load-balance"),
                     ({"disaggregation_mode": "prefill", "tp_size": 2, "nnodes": 2, "dist_init_addr": "h:1"},
                      "--host 127.0.0.1 is loopback")]:
        with pytest.raises(ValueError, match=text):
            ServerArgs(device="cpu", **kw)
    for mode in ("prefill", "decode"):  # PD at TP and DP > 1
        ServerArgs(device="cpu", tp_size=2, dp_size=2, disaggregation_mode=mode)
    assert ServerArgs(device="cpu").load_balance_method == "shortest_queue"


def test_rank_layout_and_checks() -> None:
    args = ServerArgs(device="cpu", tp_size=4, dp_size=2, nnodes=2, node_rank=1,
                      dist_init_addr="10.0.0.1:5000")
    specs = plan_ranks(args)  # node 1 holds TP ranks 2, 3 of both replicas, on local GPUs 0..3
    assert [(s.dp_rank, s.tp_rank, s.gpu, s.init_method) for s in specs] == [
        (0, 2, 0, "tcp://10.0.0.1:5000"), (0, 3, 1, "tcp://10.0.0.1:5000"),
        (1, 2, 2, "tcp://10.0.0.1:5001"), (1, 3, 3, "tcp://10.0.0.1:5001")]
    line = describe(ServerArgs(device="cpu", tp_size=4))
    assert line == "Initializing tensor parallelism with 4 CPU processes"
    cfg = ModelConfig.from_hf(tiny_hf_config(num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="does not divide the model's 2 attention heads"):
        check_layout(ServerArgs(device="cpu", tp_size=4), cfg)
    check_layout(ServerArgs(device="cpu", tp_size=2), cfg)


def test_dummy_weights_do_not_depend_on_tp() -> None:
    """Each dummy tensor is a function of (seed, name, full shape): the full checkpoint that rank 1 of TP=2
    slices is the one TP=1 loads whole."""
    cfg = ModelConfig.from_hf(tiny_hf_config(vocab_size=512))
    full = dict(dummy_weights(LlamaForCausalLM(cfg, TPGroup()), seed=3))
    rank1 = dict(dummy_weights(LlamaForCausalLM(cfg, TPGroup(rank=1, size=2)), seed=3))
    assert full.keys() == rank1.keys() and all(torch.equal(full[k], rank1[k]) for k in full)
    other = dict(dummy_weights(LlamaForCausalLM(cfg, TPGroup()), seed=4))
    assert not torch.equal(full["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_router() -> None:
    r = Router(2, "shortest_queue")
    assert [r.route(f"a{i}", [1] * 10, 10) for i in range(4)] == [0, 1, 0, 1]
    r.finish("a0")
    r.finish("a2")
    assert r.route("b", [1], 1) == 0 and r.reqs == [1, 2]
    r.finish("unknown")  # an abort of a rid the router never saw
    rr = Router(3, "round_robin")
    assert [rr.route(str(i), [1], 1) for i in range(4)] == [0, 1, 2, 0]

    p = Router(2, "prefix")
    sys_a, sys_b = list(range(PREFIX_BLOCK * 2)), list(range(100, 100 + PREFIX_BLOCK * 2))
    first = p.route("x", sys_a + [7, 8], 4)
    other = p.route("y", sys_b + [9], 4)  # unseen prefix: the least busy replica
    assert other != first
    assert p.route("x2", sys_a + [5] * PREFIX_BLOCK, 4) == first  # longest common prefix wins
    assert p.route("y2", sys_b[:PREFIX_BLOCK] + [3] * 40, 4) == other
    for i in range(40):  # a replica far busier than the other loses its affinity
        p.route(f"z{i}", sys_a, 4)
    assert p.reqs[other] > 2


def test_offline_bench_tp4_dummy_weights(tiny_model: str, tmp_path: Path) -> None:
    """bench.offline --tp 4 (4 heads, 2 KV heads: each KV head on two ranks) on dummy weights equals tp 1:
    the dummy weights are the same model at every TP size."""
    from radixserve.bench.offline import main
    flags = ["--model", tiny_model, "--load-format", "dummy", "--num-prompts", "4",
             "--random-input-len", "40",
             "--random-output-len", "8", "--max-total-tokens", "4096", "--cpu-threads", "1",
             "--chunked-prefill-size", "32"]
    main([*flags, "--save-output-ids", str(tmp_path / "tp1.json")])
    report = main([*flags, "--tp", "4", "--save-output-ids", str(tmp_path / "tp4.json")])
    tp1, tp4 = (json.loads((tmp_path / f).read_text()) for f in ("tp1.json", "tp4.json"))
    assert tp1 == tp4 and len(tp1) == 4 and all(len(o) == 8 for o in tp1)
    assert report["server_args"]["tp_size"] == 4


# ---- servers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def boot() -> dict[str, int]:
    """The bootstrap ports of the two prefill servers."""
    return {"tp2": free_port(), "dp2": free_port()}


@pytest.fixture(scope="module")
def servers(tiny_model: str, boot: dict[str, int]) -> Iterator[dict[str, Server]]:
    """TP=2, DP=2 and a two-"node" TP=2 (node 1 has no HTTP server), loaded side by side. (TP=1, the reference,
    is the same engine run in this process: `reference` below.) PD roles: see the module's docstring."""
    m, addr = ("--model", tiny_model, *COMMON), f"127.0.0.1:{free_port()}"
    two_nodes = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", addr, "--dist-timeout", "120",
                 "--disaggregation-mode", "decode", "--disaggregation-waiting-timeout", "60")
    prefill = ("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port")
    out = {"tp2": start_server(*m, "--tp", "2", *prefill, str(boot["tp2"])),
           "dp2": start_server(*m, "--dp-size", "2", *prefill, str(boot["dp2"])),
           "node0": start_server(*m, *two_nodes, "--node-rank", "0"),
           "node1": start_server(*m, *two_nodes, "--node-rank", "1")}
    try:
        for name, s in out.items():
            if name != "node1":
                wait_healthy(s)
        yield out
    finally:
        for s in out.values():
            if s.proc.poll() is None:
                s.stop(signal.SIGTERM)


def generate(server: Server, prompts: str | list[str], params: dict) -> list[dict]:
    out = post_json(server.base_url, "/generate", {"text": prompts, "sampling_params": params})
    return out if isinstance(out, list) else [out]


def ids(outs: list[dict]) -> list[list[int]]:
    return [o["output_ids"] for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_model: str) -> dict[str, list[list[int]]]:
    """TP=1's tokens: the offline engine in this process (what a TP=1 server's scheduler runs; text prompts are
    tokenized as /generate does), which loads in a second where a fourth server would take ~20 CPU-seconds."""
    from radixserve import LLM, SamplingParams
    llm = LLM(tiny_model, device="cpu", chunked_prefill_size=32)
    greedy = llm.generate(PROMPTS, SamplingParams(**GREEDY))
    sampled = llm.generate(PROMPTS[:1], SamplingParams(**SAMPLED))
    return {"greedy": [o.token_ids for o in greedy], "sampled": [o.token_ids for o in sampled]}


def test_tp2_equals_tp1(servers: dict[str, Server], reference: dict) -> None:
    s = servers["tp2"]
    outs = generate(s, PROMPTS, GREEDY)  # one batch: the long prompt is prefilled in chunks beside the others
    assert ids(outs) == reference["greedy"] and all(len(o["output_ids"]) == 12 for o in outs)
    assert ids(generate(s, PROMPTS[:1], SAMPLED)) == reference["sampled"]
    assert ids(generate(s, PROMPTS, GREEDY)) == reference["greedy"]  # again, now from the radix cache
    log = s.log()
    lines = ["Initializing tensor parallelism with 2 CPU processes", "Rank 0/2 ready", "Rank 1/2 ready",
             "API server is ready to serve on 127.0.0.1:"]
    pos = [log.find(line) for line in lines]
    assert -1 not in pos and pos[0] < min(pos[1:3]) and max(pos[1:3]) < pos[3], log[-3000:]
    info = get_json(s.base_url, "/get_server_info")
    assert {"scheduler_tp0", "scheduler_tp1", "detokenizer"} <= set(info["pids"]) and info["tp_size"] == 2
    assert log.count("Prefill batch.") == sum(1 for line in log.splitlines() if "TP0] Prefill batch." in line)


def test_dp2_spreads_requests(servers: dict[str, Server], reference: dict) -> None:
    s = servers["dp2"]
    prompts = [PROMPTS[i % 2] for i in range(8)]
    longer = {**GREEDY, "max_new_tokens": 64}  # all 8 in flight at once: none ends before the last arrives
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: generate(s, p, longer)[0], prompts))
    assert [o[:12] for o in ids(outs)] == [reference["greedy"][i % 2] for i in range(8)]
    states = get_json(s.base_url, "/get_server_info")["internal_states"]
    assert [st["dp_rank"] for st in states] == [0, 1]
    routed = [st["num_routed_reqs"] for st in states]
    assert sum(routed) == 8 and min(routed) >= 2, routed
    assert all(st["prompt_tokens_total"] > 0 and st["num_inflight_reqs"] == 0 for st in states)
    assert request(s.base_url, "POST", "/flush_cache")[0] == 200
    assert "scheduler_dp1" in get_json(s.base_url, "/get_server_info")["pids"]


# ---- PD disaggregation at TP / DP > 1 ----------------------------------------------------------------------
def pd_body(prompt: str | list[int], boot_port: int, room: int, params: dict = GREEDY) -> dict:
    key = "text" if isinstance(prompt, str) else "input_ids"
    return {key: prompt, "sampling_params": params, "bootstrap_host": "127.0.0.1", "bootstrap_port": boot_port,
            "bootstrap_room": room}


def pd_generate(prefill_url: str, decode_url: str, boot_port: int, first_room: int) -> tuple[list, list]:
    """PROMPTS through a PD pair at once, one room each: (the prefill server's outputs, the decode server's)."""
    with ThreadPoolExecutor(2 * len(PROMPTS)) as pool:
        pre = [pool.submit(post_json, prefill_url, "/generate", pd_body(t, boot_port, first_room + i))
               for i, t in enumerate(PROMPTS)]
        dec = [pool.submit(post_json, decode_url, "/generate", pd_body(t, boot_port, first_room + i))
               for i, t in enumerate(PROMPTS)]
        return [f.result() for f in pre], [f.result() for f in dec]


@pytest.fixture(scope="module")
def decode_engine(tiny_model: str) -> Engine:
    """A TP=1 decode server's engine, in this process (a second in loading)."""
    return Engine(ServerArgs(model=tiny_model, device="cpu", chunked_prefill_size=32, max_total_tokens=2048,
                             disaggregation_mode="decode", disaggregation_waiting_timeout=60))


def decode_in_process(engine: Engine, reqs: list[Req], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout  # the KV travels on transfer threads: wait for it, not for a step count
    while not all(r.finished for r in reqs) and time.monotonic() < deadline:
        if engine.scheduler.has_work:
            engine.scheduler.step()
        time.sleep(0.001)


def test_pd_tp2_to_tp2_equals_tp1(servers: dict[str, Server], reference: dict, boot: dict[str, int]) -> None:
    """Prefill on the TP=2 server, decode on the two-node TP=2 server: each decode rank receives its own KV
    heads from the prefill rank with its number, the ranks start decoding each request at the same step, and
    the greedy tokens are TP=1's. Three requests at once, the long one prefilled in chunks."""
    p, d = servers["tp2"], servers["node0"]
    pre_out, dec_out = pd_generate(p.base_url, d.base_url, boot["tp2"], 100)
    assert [o["output_ids"] for o in dec_out] == reference["greedy"]
    assert [o["output_ids"] for o in pre_out] == [g[:1] for g in reference["greedy"]]  # prefill stops at token 1
    st = get_json(d.base_url, "/get_server_info")["internal_states"][0]
    prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in dec_out)
    # rank 0's shard: 2 layers x K,V x 1 of the 2 KV heads x head_dim 32 x float32
    assert st["pd_transfer_bytes"] == prompt_tokens * 2 * 2 * 1 * 32 * 4
    assert st["num_pd_waiting_reqs"] == 0 and st["kv_used_tokens"] == 0


def test_pd_dp2_prefill_follows_the_room(servers: dict[str, Server], reference: dict, boot: dict[str, int],
                                         decode_engine: Engine) -> None:
    """Prefill on the DP=2 server, decode on a TP=1 engine: room r is prefilled by replica r % 2, and the decode
    side finds its KV there."""
    p = servers["dp2"]
    routed = [st["num_routed_reqs"] for st in get_json(p.base_url, "/get_server_info")["internal_states"]]
    sp = CoreSamplingParams(**GREEDY)
    ids = [decode_engine.tokenizer.encode(t) for t in PROMPTS[:2]]
    rooms = [10, 21, 31, 41]  # replicas 0, 1, 1, 1
    reqs = [Req(list(ids[i % 2]), sp, bootstrap=BootstrapInfo("127.0.0.1", boot["dp2"], room))
            for i, room in enumerate(rooms)]
    for r in reqs:
        decode_engine.scheduler.add_request(r)
    with ThreadPoolExecutor(len(rooms)) as pool:
        pre = [pool.submit(post_json, p.base_url, "/generate", pd_body(ids[i % 2], boot["dp2"], room))
               for i, room in enumerate(rooms)]
        decode_in_process(decode_engine, reqs)
        [f.result() for f in pre]
    assert [r.output_ids for r in reqs] == [reference["greedy"][i % 2] for i in range(len(rooms))]
    after = [st["num_routed_reqs"] for st in get_json(p.base_url, "/get_server_info")["internal_states"]]
    assert [a - b for a, b in zip(after, routed)] == [1, 3]


def test_pd_across_tp_sizes_equals_tp1(servers: dict[str, Server], reference: dict, boot: dict[str, int],
                                       decode_engine: Engine) -> None:
    """TP=1 prefill (the DP=2 server) -> the two-node TP=2 decode server: each decode rank takes its KV head from
    the one prefill rank, which keeps the room's KV until both have fetched; TP=2 prefill -> a TP=1 decode engine:
    it joins rank 0's and rank 1's heads. Both give TP=1's greedy tokens, and the decode side ends with nothing
    held."""
    d = servers["node0"]
    with ThreadPoolExecutor(4) as pool:
        pre = [pool.submit(post_json, servers["dp2"].base_url, "/generate", pd_body(t, boot["dp2"], 50 + i))
               for i, t in enumerate(PROMPTS[:2])]
        dec = [pool.submit(post_json, d.base_url, "/generate", pd_body(t, boot["dp2"], 50 + i))
               for i, t in enumerate(PROMPTS[:2])]
        dec_out = [f.result() for f in dec]
        [f.result() for f in pre]
    assert [o["output_ids"] for o in dec_out] == reference["greedy"][:2]
    assert get_json(d.base_url, "/get_server_info")["internal_states"][0]["kv_used_tokens"] == 0

    sp = CoreSamplingParams(**GREEDY)
    reqs = [Req(decode_engine.tokenizer.encode(t), sp, bootstrap=BootstrapInfo("127.0.0.1", boot["tp2"], 60 + i))
            for i, t in enumerate(PROMPTS[:2])]
    for r in reqs:
        decode_engine.scheduler.add_request(r)
    with ThreadPoolExecutor(2) as pool:
        pre = [pool.submit(post_json, servers["tp2"].base_url, "/generate", pd_body(t, boot["tp2"], 60 + i))
               for i, t in enumerate(PROMPTS[:2])]
        decode_in_process(decode_engine, reqs)
        [f.result() for f in pre]
    assert [r.output_ids for r in reqs] == reference["greedy"][:2]
    assert decode_engine.scheduler.used_tokens == 0


def test_two_nodes_equal_tp1_and_stop_together(servers: dict[str, Server], reference: dict) -> None:
    node0, node1 = servers["node0"], servers["node1"]
    assert ids(generate(node0, PROMPTS, GREEDY)) == reference["greedy"]
    assert "Rank 1/2 ready" in node1.log() and "Rank 0/2 ready" in node0.log()
    assert node1.proc.poll() is None
    node1.children = descendants(node1.proc.pid)
    assert node0.stop(signal.SIGTERM) == 0
    assert node1.proc.wait(30) == 0  # node 1's rank sees rank 0 go and its node stops
    node1.wait_children_gone()
    assert "TP rank 0 on node 0 is gone" in node1.log()
