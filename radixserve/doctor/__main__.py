"""`python -m radixserve.doctor LOG_FILE | URL [--json]`: exit code 0 when healthy, 1 with findings,
2 when the source cannot be read."""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error

from radixserve.doctor.evidence import Evidence
from radixserve.doctor.live import LiveReader
from radixserve.doctor.logs import parse_log
from radixserve.doctor.rules import Finding, diagnose, minutes, summary


def read(target: str, ns: argparse.Namespace) -> Evidence:
    if target.startswith(("http://", "https://")):
        return LiveReader(target, ns.timeout).read(ns.duration, ns.interval)
    if target == "-":
        return parse_log(sys.stdin.read(), "stdin")
    with open(target, errors="replace") as f:
        return parse_log(f.read(), target)


def render(ev: Evidence, findings: list[Finding]) -> str:
    s = summary(ev)
    head = f"radixserve doctor: {ev.source}: {s['decode_lines']} decode and {s['prefill_lines']} prefill " \
           f"{'samples' if ev.source.startswith('http') else 'lines'}, {s['retractions']} retractions"
    head += f" over {minutes(ev.span_s)}" if ev.span_s else ""
    if "token_usage_mean" in s:
        head += f"; mean token usage {s['token_usage_mean']:.2f}, median #queue-req {s['queue_req_median']}"
    lines = [head]
    if "mean_queue_time_s" in ev.settings:
        lines.append(f"mean time a request waited in the queue: {ev.settings['mean_queue_time_s']:.3f} s")
    for line in ev.conservativeness_changes[-3:]:
        lines.append(f"auto conservativeness: {line.split('schedule_conservativeness auto:', 1)[1].strip()}")
    if not (s["decode_lines"] or s["prefill_lines"] or ev.memory or ev.ooms or ev.retractions):
        lines.append("nothing to read: no memory, prefill, decode, retraction or OOM lines (or the server was idle)")
    if not findings:
        lines.append("healthy: no finding of the tuning guide applies")
    for i, f in enumerate(findings, 1):
        lines += ["", f"[{i}] {f.title}", f"    evidence: {f.evidence}"]
        lines += [f"    change:   {c}" for c in f.change]
        lines += [f"    note:     {n}" for n in f.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m radixserve.doctor",
                                description="Diagnose a radixserve or SGLang server from its log or live URL with "
                                "the tuning guide's rules. Exit 0: healthy, 1: findings, 2: unreadable source.")
    p.add_argument("target", help="a log file ('-' for stdin) or a server URL such as http://127.0.0.1:1919")
    p.add_argument("--json", action="store_true", help="print one JSON object (summary, findings) instead of text")
    p.add_argument("--duration", type=float, default=10.0, help="URL: seconds to sample the load (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="URL: seconds between samples (default 1)")
    p.add_argument("--timeout", type=float, default=10.0, help="URL: HTTP timeout per request (default 10)")
    p.add_argument("--gpu-mem-gb", type=float, default=None, help="the GPU's memory, when the source does not "
                   "say it, to turn GB into --mem-fraction-static steps")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="where the server ran, when the "
                   "source does not say (a log without the server_args= line): no GPU advice for cpu")
    ns = p.parse_args(argv)
    try:
        ev = read(ns.target, ns)
    except (OSError, urllib.error.URLError, ValueError) as e:
        print(f"radixserve doctor: cannot read {ns.target}: {e}", file=sys.stderr)
        return 2
    if ns.gpu_mem_gb:
        ev.total_mem_gb = ns.gpu_mem_gb
    if ns.device:
        ev.settings.setdefault("device", ns.device)
    findings = diagnose(ev)
    if ns.json:
        print(json.dumps({"healthy": not findings, "summary": summary(ev), "settings_seen": sorted(ev.settings),
                          "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        print(render(ev, findings))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
