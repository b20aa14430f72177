#!/usr/bin/env bash
# Stage-selected H200 runs of this wave's open figures, one device call each (repo root on the GPU host):
#   bash benchmarks/run_h200.sh OUTDIR STAGES
# STAGES (comma list, run in this order):
#   fp8test     the FP8 kernel tests (GEMV at M <= 4, tensor-core tile, W8A8, FP8 KV)
#   gemvsweep   the W8A16 GEMV's tile sweep inside CUDA graphs (what kernels.fp8.gemv_config follows)
#   fp8gemm     per-shape GEMM timings, bf16 vs W8A16 (GEMV and tile) vs W8A8, LM head included (issue 12)
#   fp8b1       batch-1 decode, bf16 then --quantization fp8, 8B preset (issue 12's 1.8x target)
#   fp8profile  the fp8 batch-1 step's kernel table (where the rest of the time goes)
#   fp8offline  offline minisgl, bf16 then fp8 weights + fp8 KV (issue 12's 1.5x target)
#   grammar     constrained vs plain decode at batch 64, 8B preset, with the default serial mask fill and
#               with fill pools of 2-16 threads (issue 15's 5 % target)
#   nano06      offline --workload nanovllm, Qwen3-0.6B (issue 19: compares with nano-vllm's published figures)
#   nano8b      offline --workload nanovllm, 8B preset
# Every JSON lands in OUTDIR with device, commit and command inside.
set -uo pipefail
OUT=${1:?usage: run_h200.sh OUTDIR STAGES}
STAGES=",${2:?usage: run_h200.sh OUTDIR STAGES},"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
M8="--model llama-3.1-8b --load-format dummy"
TOK="--tokenizer-path .gpu/tokenizer"
OB="python -m radixserve.bench.one_batch"
has() { [[ $STAGES == *",$1,"* ]]; }
run() {
  local t=$1; shift; echo "=== $* (limit ${t}s)"; local t0=$SECONDS
  timeout "$t" "$@" 2>&1 | grep -v "it/s\]\|tensor/s\]" | grep -v "^\[.*\] \(Decode\|Prefill\) batch" | tail -n 30
  echo "--- ${*:1:3}... took $((SECONDS - t0)) s"
}
has fp8test && run 150 python -m pytest -q -x -rf tests/gpu/test_fp8_kernels.py
has gemvsweep && run 300 python benchmarks/fp8_gemv_sweep.py --output "$OUT/fp8_gemv_sweep_h200.json"
has fp8gemm && run 100 python benchmarks/fp8_gemm_bench.py --output "$OUT/fp8_gemm_h200_gemv.json"
if has fp8b1; then
  run 60 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --output "$OUT/fp8_h200_bs1_bf16.json"
  run 60 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --quantization fp8 \
    --output "$OUT/fp8_h200_bs1_fp8.json"
fi
has fp8profile && run 80 python -m radixserve.bench.gpu_idle $M8 --quantization fp8 --batch-size 1 --steps 50 \
  --kernel-table 20 --disable-overlap-schedule --cuda-graph-max-bs 4 --output "$OUT/fp8_h200_bs1_profile.json"
if has fp8offline; then
  run 80 python -m radixserve.bench.offline $M8 --workload minisgl --output "$OUT/fp8_h200_offline_minisgl_bf16.json"
  run 80 python -m radixserve.bench.offline $M8 --workload minisgl --quantization fp8 --kv-cache-dtype fp8_e4m3 \
    --output "$OUT/fp8_h200_offline_minisgl_fp8_fp8kv.json"
fi
if has grammar; then
  run 200 python -m radixserve.bench.grammar_overhead $M8 $TOK --batch-size 64 --steps 64 --rounds 2 \
    --cuda-graph-max-bs 64 --fill-threads ,2,4,8,16 --output "$OUT/grammar_overhead_h200_llama8b_bs64.json"
fi
has nano06 && run 90 python -m radixserve.bench.offline --model qwen3-0.6b --load-format dummy --workload nanovllm \
  --output "$OUT/offline_nanovllm_qwen3_0.6b_h200.json"
has nano8b && run 120 python -m radixserve.bench.offline $M8 --workload nanovllm \
  --output "$OUT/offline_nanovllm_llama8b_h200.json"
ls -la "$OUT"
