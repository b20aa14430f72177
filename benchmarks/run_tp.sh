#!/usr/bin/env bash
# Tensor parallelism on a 2- or 4-GPU host: greedy equality TP=1/2/4 and their speed, Llama-3.1-8B preset
# with dummy weights (the same model at every TP size: each tensor is generated whole from (seed, name)
# and sliced by the weight loaders). Usage, from the repo root on the GPU host:
#   bash benchmarks/run_tp.sh [OUTDIR] [STAGES]     STAGES: comma list of eq,b1,offline (default all)
# eq       strict check: float32 + torch attention, no CUDA graphs, 8 prompts x 32 greedy tokens per TP size;
#          every TP size must produce the same token ids as TP=1 (float32 all-reduce reordering is ~1e-6,
#          far below the top-2 logit gap of this model).
# b1       batch-1 decode ITL, in 128 / out 256, bf16 fast path (Triton, CUDA graphs with NCCL inside).
# offline  minisgl workload (256 requests), bf16 fast path; output ids saved and compared with TP=1
#          for information only (bf16 partial sums rounded before the all-reduce move near-tie argmaxes).
set -uo pipefail
OUT=${1:-benchmarks/results}
STAGES=${2:-eq,b1,offline}
mkdir -p "$OUT"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
run() { echo "=== $*"; "$@" 2>&1 | grep -v "it/s\]\|tensor/s\]" | tail -n 30; }
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
TPS=""
for n in 1 2 4; do (( n <= NGPU )) && TPS="$TPS $n"; done
echo "GPUs: $NGPU; TP sizes:$TPS"
M8="--model llama-3.1-8b --load-format dummy"

compare() {  # compare <label> <file for tp1> <files...>: per file, requests equal and the first divergence
  python - "$@" <<'EOF'
import json, sys
label, ref_path, others = sys.argv[1], sys.argv[2], sys.argv[3:]
ref = json.load(open(ref_path))
ok = True
for path in others:
    out = json.load(open(path))
    same = sum(a == b for a, b in zip(ref, out))
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ref, out)]
    diverged = sorted(f for f in firsts if f is not None)
    toks = sum(len(a) for a in ref)
    agree = sum(f if f is not None else len(a) for f, a in zip(firsts, ref))
    print(f"{label}: {path}: {same}/{len(ref)} requests identical to TP=1, {agree}/{toks} tokens before the "
          f"first divergence; divergence positions {diverged[:10]}")
    ok &= same == len(ref)
print(f"{label}: {'PASS' if ok else 'DIFFERENT'}")
EOF
}

if has eq; then
  for n in $TPS; do
    run python -m radixserve.bench.offline $M8 --tp "$n" --dtype float32 --attention-backend torch --disable-cuda-graph \
      --num-prompts 8 --random-input-len 128 --random-output-len 32 --save-output-ids "$OUT/tp_eq_fp32_tp$n.json" \
      --output "$OUT/tp_eq_fp32_tp$n.report.json"
  done
  compare "fp32 greedy equality" "$OUT/tp_eq_fp32_tp1.json" $(for n in $TPS; do [ "$n" != 1 ] && echo "$OUT/tp_eq_fp32_tp$n.json"; done)
fi
if has b1; then
  for n in $TPS; do
    run python -m radixserve.bench.one_batch $M8 --tp "$n" --batch-size 1 --input-len 128 --output-len 256 \
      --output "$OUT/one_batch_llama8b_bs1_tp$n.json"
  done
fi
if has offline; then
  for n in $TPS; do
    run python -m radixserve.bench.offline $M8 --tp "$n" --workload minisgl --output "$OUT/offline_llama8b_minisgl_tp$n.json" \
      --save-output-ids "/tmp/offline_ids_tp$n.json"
  done
  compare "bf16 offline (information)" /tmp/offline_ids_tp1.json $(for n in $TPS; do [ "$n" != 1 ] && echo "/tmp/offline_ids_tp$n.json"; done)
fi
