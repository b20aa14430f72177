"""The tuning guide's diagnoses, each a function of `Evidence` that returns a `Finding` or None.

Every threshold below is the guide's (shared/seeds/000_*.txt), named once here. A finding carries the
numbers it rests on (how many lines, how often, over what time), the flag changes the guide prescribes,
computed from those numbers where the guide gives a rule rather than a value, and the trade-offs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import mean

from radixserve.doctor.evidence import Evidence

QUEUE_HEALTHY = (100, 2000)  # "#queue-req: a healthy range is 100-2000"
FREQUENT = 0.5  # "frequently": on at least half of the decode lines
TOKEN_USAGE_TARGET = 0.9  # "Target: > 0.9"
AGGRESSIVE_CONSERVATIVENESS = 0.3  # "Decrease --schedule-conservativeness to a value like 0.3"
CAUTIOUS_CONSERVATIVENESS = 1.3  # "Increase --schedule-conservativeness to a value like 1.3"
ACCEPTABLE_RETRACTIONS_PER_MIN = 1.0  # "Occasional retractions (~1 time per minute) are acceptable"
FREE_MEM_GOOD_GB = (5.0, 8.0)  # "available_gpu_mem 5-8 GB: good setting"
FREE_MEM_TOO_HIGH_GB = 10.0  # "10-20 GB: too high, increase --mem-fraction-static"
FREE_MEM_TARGET_GB = 6.5  # the middle of the good range: what a change of the fraction aims for
GRAPH_USEFUL_BS = 768  # "CUDA graph can be beneficial for batch sizes up to 512 or 768"
GRAPH_BS_STEPS = (256, 512, 768)
GRAPH_MEM_FRACTION_STEP = 0.03  # the guide's example pairs --cuda-graph-max-bs 512 with 0.85 (default 0.88)
OOM_CHUNKS = (4096, 2048)  # "Reduce --chunked-prefill-size to 4096 or 2048"
OOM_MEM_FRACTIONS = (0.8, 0.7)  # "Reduce --mem-fraction-static to 0.8 or 0.7"
LONG_PROMPT_FULL_CHUNKS = 0.25  # share of prefill lines that are a full chunk (long prompts being cut)
SHARED_PREFIX_HIT = 0.25  # share of prompt tokens served from the prefix cache that calls for lpm
EXAMPLE_GPUS_GB = (("H200", 141.0), ("H100", 80.0))


@dataclass
class Finding:
    id: str
    title: str
    evidence: str
    change: list[str]  # concrete flag changes, in the order to try them
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def over(ev: Evidence, samples: list) -> str:
    times = [s.t for s in samples if s.t is not None]
    if len(times) >= 2:
        return f" over {minutes(max(times) - min(times))}"
    return "" if ev.timed else " (no timestamps in the source)"


def on_gpu(ev: Evidence) -> bool:
    return ev.settings.get("device") != "cpu"


def conservativeness(ev: Evidence) -> float | str | None:
    return ev.settings.get("schedule_conservativeness")


def fraction(ev: Evidence) -> float | None:
    f = ev.settings.get("mem_fraction_static")
    return f if isinstance(f, float) else None


def retraction_rate(ev: Evidence) -> float | None:
    """Retraction warnings per minute; a log shorter than a minute counts as one minute."""
    if not ev.timed:
        return None
    return len(ev.retractions) / max(ev.span_s or 0.0, 60.0) * 60


def frequent_retractions(ev: Evidence) -> bool:
    rate = retraction_rate(ev)
    return bool(ev.retractions) and (rate is None or rate > ACCEPTABLE_RETRACTIONS_PER_MIN)


def check_retractions(ev: Evidence) -> Finding | None:
    if not frequent_retractions(ev):
        return None
    n, reqs = len(ev.retractions), sum(r.reqs for r in ev.retractions)
    rate = retraction_rate(ev)
    how_often = (f"{rate:.1f} per minute over {minutes(ev.span_s or 0)}" if rate is not None else
                 "the source has no timestamps, so the rate cannot be checked against the acceptable ~1 per minute")
    usage = [s.usage for s in ev.decode]
    usage_txt = f"; token usage up to {max(usage):.2f}" if usage else ""
    c = conservativeness(ev)
    if c == "auto":
        change = ["--schedule-conservativeness auto is on: it raises itself after retractions; if they persist, "
                  "set a fixed value such as 1.3"]
    else:
        target = CAUTIOUS_CONSERVATIVENESS if not isinstance(c, float) or c < 1.0 else round(c * 1.3, 2)
        change = [f"--schedule-conservativeness {target}" + (f" (now {c})" if isinstance(c, float) else "")]
    return Finding(
        "frequent_retractions", "The KV cache pool runs full and requests are retracted too often",
        f"{n} 'KV cache pool is full. Retract requests.' warnings ({reqs} requests retracted): {how_often}"
        f"{usage_txt}",
        change + ["or --schedule-conservativeness auto (adjusts from the live retraction rate)"],
        ["a retraction recomputes the retracted requests' KV later; occasional ones (~1 per minute) are fine",
         "the pool being too small is the other cause: see the memory finding, if any"])


def check_queue(ev: Evidence) -> Finding | None:
    if not ev.decode:
        return None
    n = len(ev.decode)
    empty = sum(s.queue == 0 for s in ev.decode)
    flooded = sum(s.queue > QUEUE_HEALTHY[1] for s in ev.decode)
    span = over(ev, ev.decode)
    if empty / n >= FREQUENT:
        return Finding(
            "queue_empty", "#queue-req is 0 most of the time: the client submits requests too slowly",
            f"#queue-req was 0 on {empty} of {n} decode lines{span} (healthy: {QUEUE_HEALTHY[0]}-"
            f"{QUEUE_HEALTHY[1]})",
            ["increase the request submission rate (more concurrent requests in the client)"],
            ["the client is the bottleneck, not the server; for online serving with few users this is expected"])
    if flooded / n >= FREQUENT:
        worst = max(s.queue for s in ev.decode)
        return Finding(
            "queue_flooded", f"#queue-req above {QUEUE_HEALTHY[1]} most of the time: too many queued requests",
            f"#queue-req > {QUEUE_HEALTHY[1]} on {flooded} of {n} decode lines{span}, up to {worst}",
            ["reduce the request submission rate"],
            ["a long queue adds scheduling overhead and queueing latency"])
    return None


def check_token_usage(ev: Evidence) -> Finding | None:
    queued = [s for s in ev.decode if s.queue > 0]
    if not queued or len(queued) / len(ev.decode) < FREQUENT or frequent_retractions(ev):
        return None
    low = [s for s in queued if s.usage < TOKEN_USAGE_TARGET]
    if len(low) / len(queued) < FREQUENT:
        return None
    u = [s.usage for s in low]
    evidence = (f"token usage {mean(u):.2f} on average ({min(u):.2f}-{max(u):.2f}) on {len(low)} of "
                f"{len(ev.decode)} decode lines while requests waited (#queue-req > 0){over(ev, low)}; "
                f"target > {TOKEN_USAGE_TARGET}")
    cap = ev.memory.get("max_running_requests") or ev.settings.get("max_running_requests")
    if cap and sum(s.running >= cap for s in low) / len(low) >= FREQUENT:
        new = int(cap * min(TOKEN_USAGE_TARGET / max(mean(u), 0.05), 4))
        return Finding(
            "running_cap", "Token usage is low because #running-req sits at --max-running-requests",
            evidence + f"; #running-req was at the limit {int(cap)} on most of them",
            [f"--max-running-requests {new} (now {int(cap)})"],
            ["lowering --schedule-conservativeness does not help while the request limit binds",
             "more running requests means a larger batch: more throughput, more latency per token"])
    c = conservativeness(ev)
    if c == "auto":
        return None  # the controller is lowering it; its own log lines show how far it got
    target = AGGRESSIVE_CONSERVATIVENESS if not isinstance(c, float) or c > AGGRESSIVE_CONSERVATIVENESS \
        else round(c / 2, 2)
    return Finding(
        "low_token_usage", "Token usage < 0.9 while requests wait: the server is too conservative taking new ones",
        evidence,
        [f"--schedule-conservativeness {target}" + (f" (now {c})" if isinstance(c, float) else ""),
         "or --schedule-conservativeness auto (lowers itself while usage is low, backs off on retractions)"],
        ["common cause: requests with a large max_new_tokens that stop early at EOS or a stop string",
         "if it then retracts more than about once a minute, go back up a step"])


def gb_to_fraction(ev: Evidence, gb: float) -> tuple[float | None, str]:
    """A memory amount as a share of the device: exact when its size is known, else per example GPU."""
    if ev.total_mem_gb:
        d = gb / ev.total_mem_gb
        return d, f"{d:.2f} of the {ev.total_mem_gb:.0f} GB device"
    examples = ", ".join(f"{gb / size:.2f} on an {name} ({size:.0f} GB)" for name, size in EXAMPLE_GPUS_GB)
    return None, f"{gb:.2f} GB / the GPU's memory: {examples}"


def check_memory(ev: Evidence) -> Finding | None:
    free = ev.memory.get("available_gpu_mem")
    if free is None or not on_gpu(ev):
        return None
    f = fraction(ev)
    lo, hi = FREE_MEM_GOOD_GB
    line = f"available_gpu_mem={free:.2f} GB in the start-up memory line (good: {lo:.0f}-{hi:.0f} GB)"
    if free >= FREE_MEM_TOO_HIGH_GB:
        d, how = gb_to_fraction(ev, free - FREE_MEM_TARGET_GB)
        new = f" to {math.floor((f + d) * 100) / 100:.2f} (now {f})" if f is not None and d is not None else ""
        return Finding(
            "memory_left_unused", "Too much device memory left free: the KV cache pool could be larger",
            line + f"; {free - FREE_MEM_TARGET_GB:.2f} GB more than the {FREE_MEM_TARGET_GB} GB aimed at",
            [f"raise --mem-fraction-static by {how}{new}", "or --mem-fraction-static auto"],
            ["more KV cache means more concurrent requests and higher token capacity",
             "alternatively raise it in steps of 0.01 until your workload hits OOM, then step back"])
    if free < lo:
        d, how = gb_to_fraction(ev, FREE_MEM_TARGET_GB - free)
        new = f" to {math.ceil((f - d) * 100) / 100:.2f} (now {f})" if f is not None and d is not None else ""
        return Finding(
            "memory_too_tight", "Too little device memory left for activations and CUDA graphs: risk of OOM",
            line, [f"lower --mem-fraction-static by {how}{new}", "or --mem-fraction-static auto"],
            ["a smaller KV cache pool lowers peak concurrency"])
    return None


def check_cuda_graph(ev: Evidence) -> Finding | None:
    if not on_gpu(ev) or ev.settings.get("disable_cuda_graph"):
        if ev.settings.get("disable_cuda_graph") and on_gpu(ev) and ev.decode:
            return Finding("cuda_graph_disabled", "CUDA graphs are disabled", "--disable-cuda-graph is set",
                           ["remove --disable-cuda-graph"], ["small decode batches are launch-bound without them"])
        return None
    graphed = [s for s in ev.decode if s.cuda_graph is not None]
    eager = [s for s in graphed if not s.cuda_graph and s.running <= GRAPH_USEFUL_BS]
    if not eager:
        return None
    top = max(s.running for s in eager)
    new_bs = next(b for b in GRAPH_BS_STEPS if b >= top)
    captured = [s.running for s in graphed if s.cuda_graph]
    seen = f"; the largest batch that ran in a graph had {max(captured)} requests" if captured else \
        "; no decode batch ran in a graph"
    f = fraction(ev)
    mem = (f"--mem-fraction-static {f - GRAPH_MEM_FRACTION_STEP:.2f} (now {f})" if f is not None else
           f"lower --mem-fraction-static by about {GRAPH_MEM_FRACTION_STEP} with it (graphs take memory)")
    notes = ["CUDA graphs remove the kernel launch overhead of decode batches up to --cuda-graph-max-bs"]
    if not captured:
        notes.append("no batch used a graph at all: verify CUDA graph is not disabled and that the attention "
                     "backend supports it (try the fastest backend for the GPU)")
    return Finding(
        "cuda_graph_coverage", f"Decode batches up to {top} requests ran without a CUDA graph",
        f"cuda graph: False on {len(eager)} of {len(graphed)} decode lines with #running-req <= {GRAPH_USEFUL_BS}"
        f"{over(ev, eager)}{seen}",
        [f"--cuda-graph-max-bs {new_bs}", mem], notes)


def check_oom(ev: Evidence) -> Finding | None:
    if not ev.ooms:
        return None
    chunk = ev.memory.get("chunked_prefill_size") or ev.settings.get("chunked_prefill_size")
    chunks = [c for c in OOM_CHUNKS if not chunk or c < chunk] or [int(chunk // 2)]
    running = ev.memory.get("max_running_requests") or ev.settings.get("max_running_requests")
    first = ev.ooms[0] if len(ev.ooms[0]) < 200 else ev.ooms[0][:200] + "..."
    return Finding(
        "out_of_memory", "The server ran out of device memory",
        f"{len(ev.ooms)} out-of-memory error line(s), the first: {first}",
        [f"--chunked-prefill-size {' or '.join(map(str, chunks))}" + (f" (now {int(chunk)})" if chunk else ""),
         "lower --max-running-requests" + (f" (now {int(running)}, e.g. {int(running) // 2})" if running else ""),
         f"--mem-fraction-static {' or '.join(map(str, OOM_MEM_FRACTIONS))}"],
        ["in this order; smaller chunks slow the prefill of long prompts, fewer running requests limit "
         "concurrency, a lower fraction shrinks the KV cache and peak throughput"])


def check_long_prompts(ev: Evidence) -> Finding | None:
    chunk = ev.memory.get("chunked_prefill_size") or ev.settings.get("chunked_prefill_size")
    if not chunk or len(ev.prefill) < 2:
        return None
    full = [p for p in ev.prefill if p.new_token >= chunk]
    if len(full) / len(ev.prefill) < LONG_PROMPT_FULL_CHUNKS:
        return None
    return Finding(
        "long_prompts", "Long prompts dominate the prefill: they are cut into chunks",
        f"{len(full)} of {len(ev.prefill)} prefill lines computed a full chunk of {int(chunk)} tokens"
        f"{over(ev, full)}",
        [f"--chunked-prefill-size {int(chunk) * 2}", "SGLang: --enable-piecewise-cuda-graph (radixserve does "
         "not have piecewise CUDA graphs)"],
        ["a larger chunk prefills long prompts in fewer steps but needs more activation memory and makes "
         "running requests wait longer between decode steps"])


def check_shared_prefixes(ev: Evidence) -> Finding | None:
    cached = sum(p.cached_token for p in ev.prefill)
    total = cached + sum(p.new_token for p in ev.prefill)
    policy = ev.settings.get("schedule_policy")
    if not total or cached / total < SHARED_PREFIX_HIT or policy == "lpm":
        return None
    return Finding(
        "shared_prefixes", "Many requests share prefixes: longest-prefix-match scheduling would reuse more",
        f"{cached / total:.0%} of the prompt tokens on {len(ev.prefill)} prefill lines came from the prefix "
        f"cache (#cached-token {cached} of {total})" + (f"; --schedule-policy is {policy}" if policy else ""),
        ["--schedule-policy lpm"],
        ["lpm reorders the queue so requests with cached prefixes run together, at more scheduling overhead"])


CHECKS = (check_oom, check_retractions, check_token_usage, check_queue, check_memory, check_cuda_graph,
          check_long_prompts, check_shared_prefixes)


def diagnose(ev: Evidence) -> list[Finding]:
    return [f for check in CHECKS if (f := check(ev)) is not None]


def summary(ev: Evidence) -> dict:
    d = ev.decode
    out: dict = {"source": ev.source, "decode_lines": len(d), "prefill_lines": len(ev.prefill),
                 "retractions": len(ev.retractions), "oom_lines": len(ev.ooms),
                 "span_s": ev.span_s}
    if d:
        out["token_usage_mean"] = round(mean(s.usage for s in d), 3)
        out["queue_req_median"] = sorted(s.queue for s in d)[len(d) // 2]
        tp = [s.throughput for s in d if s.throughput]
        if tp:
            out["gen_throughput_mean"] = round(mean(tp), 2)
    if ev.memory:
        out["memory"] = ev.memory
    rate = retraction_rate(ev)
    if rate is not None:
        out["retractions_per_min"] = round(rate, 2)
    if "mean_queue_time_s" in ev.settings:
        out["mean_queue_time_s"] = round(ev.settings["mean_queue_time_s"], 4)
    if ev.conservativeness_changes:
        out["conservativeness_changes"] = len(ev.conservativeness_changes)
    return out
