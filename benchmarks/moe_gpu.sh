#!/usr/bin/env bash
# The MoE GPU stages in one command (one H200): fused-MoE kernel tests, block-config tuning, then the
# qwen3-30b-a3b preset's batch-1 decode and 8 x 2048 prefill with the tuned table.
#   bash benchmarks/moe_gpu.sh OUTDIR
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
run() { echo "=== $*"; "$@" 2>&1 | grep -v "it/s\]\|tensor/s\]" | tail -n 45; }
M="--model qwen3-30b-a3b --load-format dummy --cuda-graph-max-bs 8"
run python -m pytest -q -x -rA tests/gpu/test_moe_kernel.py -k "qwen3 or graph"
run python benchmarks/moe_tune.py --budget-s ${TUNE_BUDGET:-75} --output "$OUT/moe_tune_h200.json"
T="$OUT/moe_tune_h200.json"
run python benchmarks/moe_apply_tune.py "$T" radixserve.bench.one_batch $M --batch-size 1 --input-len 128 \
  --output-len 256 --output "$OUT/one_batch_qwen3_30b_a3b_bs1.json"
run python benchmarks/moe_apply_tune.py "$T" radixserve.bench.one_batch $M --batch-size 8 --input-len 2048 \
  --output-len 4 --output "$OUT/one_batch_qwen3_30b_a3b_prefill_8x2048.json"
