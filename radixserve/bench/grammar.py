"""CPU cost of constrained decoding: bitmask time per token and per batch step, compile and cache-hit time.

    python -m radixserve.bench.grammar [--batch-sizes 1,8,64] [--steps N] [--output FILE]

Replays a valid JSON document token by token through the scheduler's own hook (GrammarMasks.bitmask,
then the matcher advances), with `batch` requests constrained by the same schema, so the figure is what
the scheduler pays on the CPU per decode step; on a GPU that work runs while the forward does. The
tokenizer is the bundled SmolLM2's (49,152 tokens); mask cost grows with the vocabulary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from radixserve.bench.roofline import device_name, git_commit
from radixserve.core import Req, SamplingParams
from radixserve.grammar.llguidance_backend import LLGuidanceBackend
from radixserve.grammar.masks import GrammarMasks
from radixserve.weights.loader import load_tokenizer, resolve_model

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "email", "role", "tags", "address", "active"],
}
DOCUMENT = {"id": 4217, "name": "Ada Lovelace", "email": "ada@example.org", "role": "editor",
            "tags": ["math", "engines", "poetry"], "address": {"city": "London", "zip": "W1 2AB"}, "active": True}


def run(batch_sizes: list[int], steps: int | None, parallel: bool, threads: int | None = None) -> dict:
    tok = load_tokenizer(resolve_model(None))
    vocab = len(tok)
    backend = LLGuidanceBackend(tok, vocab, [tok.eos_token_id], threads=threads, parallel=parallel)
    schema = json.dumps(SCHEMA)
    t0 = time.perf_counter()
    _ = backend.lltok
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.matcher("json_schema", schema)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(100):
        backend.matcher("json_schema", schema)
    cached_s = (time.perf_counter() - t0) / 100
    ids = tok.encode(json.dumps(DOCUMENT, separators=(", ", ": ")), add_special_tokens=False)[:steps]
    rows = []
    for bs in batch_sizes:
        masks = GrammarMasks(backend, vocab, bs, torch.device("cpu"))
        reqs = [Req([0], SamplingParams(grammar=("json_schema", schema))) for _ in range(bs)]
        for r in reqs:
            r.grammar = backend.matcher("json_schema", schema)
        step_s = []
        for t in ids:
            t0 = time.perf_counter()
            masks.bitmask(reqs)
            step_s.append(time.perf_counter() - t0)
            for r in reqs:
                r.output_ids.append(t)
                assert r.grammar.accept(t), "the document must be valid under the schema"
        first, step_s = step_s[0], step_s[1:]  # the first mask of a fresh grammar builds its lexer state
        med = statistics.median(step_s)
        rows.append({"batch": bs, "steps": len(step_s), "first_step_us": round(first * 1e6, 1),
                     "step_us_median": round(med * 1e6, 1),
                     "step_us_mean": round(statistics.fmean(step_s) * 1e6, 1),
                     "step_us_p90": round(sorted(step_s)[int(0.9 * (len(step_s) - 1))] * 1e6, 1),
                     "per_token_us_median": round(med / bs * 1e6, 2)})
    return {"tokenizer_build_s": round(tokenizer_s, 3), "compile_ms": round(compile_s * 1e3, 2),
            "cache_hit_us": round(cached_s * 1e6, 2), "vocab": vocab, "document_tokens": len(ids), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m radixserve.bench.grammar", description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--steps", type=int, default=None, help="Tokens of the document to replay (default: all).")
    ap.add_argument("--output", help="Write the results JSON here.")
    ap.add_argument("--parallel", action="store_true", help="Fill masks on llguidance's thread pool (what a "
                    "GPU server does); default: in the calling thread (what a CPU server does).")
    ap.add_argument("--threads", type=int, default=None, help="--parallel: the pool's threads (default: "
                    "the backend's own choice).")
    a = ap.parse_args()
    res = run([int(b) for b in a.batch_sizes.split(",")], a.steps, a.parallel, a.threads)
    out = {"bench": "grammar", "device": device_name("cpu"), "commit": git_commit(),
           "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine inflates the figures
           "command": "python -m radixserve.bench.grammar --batch-sizes " + a.batch_sizes
           + (" --parallel" if a.parallel else "") + (f" --threads {a.threads}" if a.threads else ""),
           "parallel": a.parallel, "threads": a.threads, "cpu_count": os.cpu_count(), **res}
    text = json.dumps(out, indent=2)
    print(text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
