"""Read a server log in SGLang's format (radixserve prints the same lines) into `Evidence`.

Lines are recognised by their content, not by position, so logs of either engine work, with or without the
`[date time TPn]` prefix, and lines that a terminal or a web page wrapped after a comma are joined again
(the tuning guide prints its example lines wrapped that way)."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from radixserve.doctor.evidence import DecodeSample, Evidence, PrefillSample, Retraction

TIMESTAMP = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d+)?)")
FIELD = re.compile(r"(#?[A-Za-z_][\w ()/-]*?)\s*:\s*(True|False|[-+]?\d+(?:\.\d+)?)")
ASSIGN = re.compile(r"(\w+)=('[^']*'|\"[^\"]*\"|[^,()\[\]\s]+)")
RETRACT = re.compile(r"#retracted_reqs:\s*(\d+)(?:,\s*#new_token_ratio:\s*([\d.]+)\s*->\s*([\d.]+))?")
OOM = re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory|Not enough memory\. Please")
# SGLang: "Load weight begin. avail mem=78.50 GB" is the device's free memory before anything is loaded.
LOAD_BEGIN = re.compile(r"Load weight begin\. avail mem=([\d.]+) GB")
AUTO_MEM = re.compile(r"mem_fraction_static auto: .*?total ([\d.]+) GB")
MEMORY_KEYS = ("max_total_num_tokens", "chunked_prefill_size", "max_prefill_tokens", "max_running_requests",
               "context_len", "available_gpu_mem")


def join_wrapped(lines: list[str]) -> list[str]:
    """A line ending in a comma continues on the next one (wrapped log lines, the guide's examples)."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if out and out[-1].endswith(",") and line and not TIMESTAMP.match(line.lstrip("[")):
            out[-1] = out[-1] + " " + line.strip()
        else:
            out.append(line)
    return out


def fields(text: str) -> dict[str, Any]:
    """`#running-req: 233, token usage: 0.82, cuda graph: True` -> {"#running-req": 233, ...}."""
    out: dict[str, Any] = {}
    for key, value in FIELD.findall(text):
        key = key.strip()
        out[key] = value == "True" if value in ("True", "False") else float(value)
    return out


def literal(value: str) -> Any:
    if value[:1] in "'\"":
        return value[1:-1]
    if value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[value]
    try:
        return float(value) if any(c in value for c in ".e") else int(value)
    except ValueError:
        return value


def parse_log(text: str, source: str = "log") -> Evidence:
    ev = Evidence(source=source)
    first: datetime | None = None
    last: datetime | None = None
    for line in join_wrapped(text.splitlines()):
        t = None
        m = TIMESTAMP.search(line)
        if m:
            stamp = datetime.fromisoformat(m.group(1).replace(" ", "T"))
            first = first or stamp
            last = stamp
            t = (stamp - first).total_seconds()
        parse_line(line, t, ev)
    if first is not None and last is not None:
        ev.span_s = (last - first).total_seconds()
    return ev


def parse_line(line: str, t: float | None, ev: Evidence) -> None:
    if "Decode batch" in line:
        f = fields(line.split("Decode batch", 1)[1])
        if "token usage" in f:
            ev.decode.append(DecodeSample(
                t, running=int(f.get("#running-req", 0)), tokens=int(f.get("#token", 0)), usage=f["token usage"],
                queue=int(f.get("#queue-req", 0)), throughput=f.get("gen throughput (token/s)"),
                cuda_graph=f.get("cuda graph") if isinstance(f.get("cuda graph"), bool) else None))
    elif "Prefill batch" in line:
        f = fields(line.split("Prefill batch", 1)[1])
        ev.prefill.append(PrefillSample(t, new_seq=int(f.get("#new-seq", 0)), new_token=int(f.get("#new-token", 0)),
                                        cached_token=int(f.get("#cached-token", 0)),
                                        queue=int(f.get("#queue-req", 0))))
    elif m := RETRACT.search(line):
        ratios = (float(m.group(2)), float(m.group(3))) if m.group(2) else (None, None)
        ev.retractions.append(Retraction(t, int(m.group(1)), *ratios))
    elif OOM.search(line):
        ev.ooms.append(line.strip())
    elif "max_total_num_tokens=" in line and "available_gpu_mem=" in line:
        for key, value in ASSIGN.findall(line):
            if key in MEMORY_KEYS:
                ev.memory[key] = float(value)
    elif "server_args=" in line:
        ev.settings.update({k: literal(v) for k, v in ASSIGN.findall(line.split("server_args=", 1)[1])})
    elif m := LOAD_BEGIN.search(line):
        ev.total_mem_gb = ev.total_mem_gb or float(m.group(1))
    elif "schedule_conservativeness auto:" in line:
        ev.conservativeness_changes.append(line.strip())
    if m := AUTO_MEM.search(line):
        ev.total_mem_gb = float(m.group(1))
