"""Run a radixserve module with MOE_CONFIGS replaced by the best configs of a moe_tune.py result, so that a
benchmark measures the table the tuning found before it is written into radixserve/kernels/moe.py:

    python benchmarks/moe_apply_tune.py TUNE.json radixserve.bench.one_batch [flags...]

It also prints that table as Python, ready to paste into kernels/moe.py."""
from __future__ import annotations

import json
import runpy
import sys

from radixserve.kernels import moe


def table(tune: dict) -> list[tuple[int, dict]]:
    rows = sorted((int(t), r["config"]) for t, r in tune["best"].items())
    merged: list[tuple[int, dict]] = []
    for t, c in rows:  # neighbours with the same config share one row
        if merged and merged[-1][1] == c:
            merged[-1] = (t, c)
        else:
            merged.append((t, c))
    merged[-1] = (1 << 62, merged[-1][1])
    return merged


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        new = table(json.load(f))
    moe.MOE_CONFIGS[:] = new
    print("MOE_CONFIGS = [\n" + "".join(f"    ({b}, {c}),\n" for b, c in new) + "]", flush=True)
    module, sys.argv = sys.argv[2], [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__")
