#!/usr/bin/env bash
# FP8 on the GPU in one call (issue 12): the FP8 kernel tests, then bf16 vs fp8 benchmarks on the same
# machine, back to back, Llama-3.1-8B preset with dummy weights. Usage (GPU host, repo root):
#   bash benchmarks/run_fp8_gpu.sh OUTDIR
# Every JSON (device, commit, command in each) is packed into OUTDIR/fp8_results.tgz after each stage;
# stages run in priority order, each under its own time limit, so a slow one cannot starve the rest.
set -uo pipefail
OUT=${1:-benchmarks/results}
R=/tmp/fp8_results
mkdir -p "$R" "$OUT"
export PYTHONUNBUFFERED=1
M8="--model llama-3.1-8b --load-format dummy"
run() {
  local t=$1; shift; echo "=== $* (limit ${t}s)"
  timeout "$t" "$@" 2>&1 | grep -v "it/s\]\|tensor/s\]" | grep -v "^\[.*\] \(Decode\|Prefill\) batch" | tail -n 40
  tar czf "$OUT/fp8_results.tgz" -C "$R" .
}
OB="python -m radixserve.bench.one_batch"
run 100 python -m pytest -q -x -rf tests/gpu/test_fp8_kernels.py
run 50 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --output "$R/fp8_bs1_bf16.json"
run 50 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --quantization fp8 \
  --output "$R/fp8_bs1_fp8.json"
run 50 $OB $M8 --batch-size 8 --input-len 2048 --output-len 4 --cuda-graph-max-bs 8 --no-roofline \
  --output "$R/fp8_prefill_8x2048_bf16.json"
run 50 $OB $M8 --batch-size 8 --input-len 2048 --output-len 4 --cuda-graph-max-bs 8 --no-roofline --quantization fp8 \
  --output "$R/fp8_prefill_8x2048_fp8.json"
# KV capacity: same bf16 weights, fp8 KV (the bf16-KV figure is in the bs1 bf16 run's log above)
run 40 $OB $M8 --batch-size 1 --input-len 128 --output-len 64 --cuda-graph-max-bs 1 --no-roofline \
  --kv-cache-dtype fp8_e4m3 --output "$R/fp8_bs1_bf16w_fp8kv.json"
run 70 python -m radixserve.bench.offline $M8 --workload minisgl --output "$R/fp8_offline_minisgl_bf16.json"
run 70 python -m radixserve.bench.offline $M8 --workload minisgl --quantization fp8 --kv-cache-dtype fp8_e4m3 \
  --output "$R/fp8_offline_minisgl_fp8_fp8kv.json"
run 40 python benchmarks/fp8_gemm_bench.py --output "$R/fp8_gemm_h200.json"
run 70 python -m radixserve.bench.quant_accuracy $M8 --num-prompts 4 --output-len 16 --max-total-tokens 4096 \
  --disable-cuda-graph --output "$R/fp8_accuracy_llama8b_dummy_gpu.json"
ls -la "$R"
