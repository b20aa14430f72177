#!/usr/bin/env bash
# The GPU suite in one command: kernel and engine tests, then every benchmark with the HF baseline,
# all recorded with device and commit. Usage (on the GPU host, from the repo root):
#   bash benchmarks/run_gpu.sh [OUTDIR] [STAGES]       STAGES: comma list of test,kernels,b1,prefill,offline,overlap,compile,profile,hf
set -uo pipefail
OUT=${1:-benchmarks/results}
STAGES=${2:-test,kernels,b1,prefill,offline,overlap,hf}
mkdir -p "$OUT"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
run() { echo "=== $*"; "$@" 2>&1 | grep -v "it/s\]\|tensor/s\]" | tail -n 40; }
M8=llama-3.1-8b
D="--load-format dummy"
has test && run python -m pytest -q -rA tests/gpu
has kernels && run python benchmarks/kernels_bench.py --output "$OUT/kernels_h100.json"
has b1 && run python -m radixserve.bench.one_batch --model $M8 $D --batch-size 1 --input-len 128 --output-len 256 \
  --output "$OUT/one_batch_llama8b_bs1.json"
has prefill && run python -m radixserve.bench.one_batch --model $M8 $D --batch-size 8 --input-len 2048 --output-len 4 \
  --output "$OUT/one_batch_llama8b_prefill_8x2048.json"
has offline && run python -m radixserve.bench.offline --model $M8 $D --workload minisgl --output "$OUT/offline_llama8b_minisgl.json"
if has overlap; then
  run python -m radixserve.bench.offline --model qwen3-0.6b $D --workload minisgl --output "$OUT/offline_qwen3_0.6b_overlap.json"
  run python -m radixserve.bench.offline --model qwen3-0.6b $D --workload minisgl --disable-overlap-schedule \
    --output "$OUT/offline_qwen3_0.6b_no_overlap.json"
fi
if has compile; then  # --enable-torch-compile: small model, small batches (the tuning guide's case)
  for bs in 1 8; do
    for c in "" "--enable-torch-compile --torch-compile-max-bs $bs"; do
      run python -m radixserve.bench.one_batch --model qwen3-0.6b $D --batch-size $bs --input-len 128 --output-len 256 \
        --cuda-graph-max-bs 32 $c --output "$OUT/one_batch_qwen3_0.6b_bs${bs}${c:+_compile}.json"
    done
  done
  run python -m radixserve.bench.one_batch --model $M8 $D --batch-size 1 --input-len 128 --output-len 256 \
    --enable-torch-compile --torch-compile-max-bs 1 --output "$OUT/one_batch_llama8b_bs1_compile.json"
fi
has profile && run python -m radixserve.bench.gpu_idle --model $M8 $D --batch-size 1 --steps 50 --kernel-table 25 \
  --disable-overlap-schedule
if has hf; then
  run python -m radixserve.bench.hf_baseline --model $M8 --mode generate --output "$OUT/hf_llama8b_bs1.json"
  run python -m radixserve.bench.hf_baseline --model $M8 --mode cb --num-prompts 64 --output "$OUT/hf_llama8b_cb.json"
fi
