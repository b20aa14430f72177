#!/usr/bin/env bash
# Online latency on the GPU in one call (issue 14). Usage (GPU host, repo root, after `source .gpu/env.sh`):
#   bash benchmarks/run_latency_gpu.sh OUTDIR
# 1. two Llama-3.1-8B servers (dummy weights) load side by side: A with --enable-mixed-chunk, B without;
#    both with piecewise graphs and per-hop timing;
# 2. meanwhile the piecewise-graph GPU test on the 8B preset (graphs vs eager), which also times prefills;
# 3. bench.serving against A: concurrency 1 at input 128 and 2000 (with the socket-client check), then a
#    burst of 256; the same burst against B.
# Each JSON lands in OUTDIR; the stages have their own time limits so a slow one cannot starve the rest.
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GIT_COMMIT=${GIT_COMMIT:-unknown}
TOK=.gpu/tokenizer
COMMON="--model llama-3.1-8b --load-format dummy --tokenizer-path $TOK --max-total-tokens 250000
  --enable-piecewise-cuda-graph --piecewise-cuda-graph-max-tokens 1024 --enable-metrics
  --enable-request-time-stats-logging --decode-log-interval 200"
python -m radixserve $COMMON --port 30001 --enable-mixed-chunk >"$OUT/server_mixed.log" 2>&1 &
A=$!
python -m radixserve $COMMON --port 30002 >"$OUT/server_plain.log" 2>&1 &
B=$!
trap 'kill $A $B 2>/dev/null' EXIT

RADIXSERVE_GPU_TEST_PRESET=llama-3.1-8b RADIXSERVE_TOKENIZER_PATH=$TOK \
  RADIXSERVE_PIECEWISE_TIMING="$OUT/piecewise_prefill_llama8b_h200.json" \
  timeout 150 python -m pytest -q -x -rs -s tests/gpu/test_piecewise_gpu.py 2>&1 | grep -v "it/s\]" >"$OUT/pytest_piecewise.log"
tail -n 15 "$OUT/pytest_piecewise.log"

wait_up() {
  for _ in $(seq 240); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.5; done
  echo "server on $1 did not come up"; tail -n 30 "$2"; return 1
}
wait_up 30001 "$OUT/server_mixed.log" || exit 1
BS="timeout 60 python -m radixserve.bench.serving --quiet"
$BS --port 30001 --num-prompts 8 --random-input-len 128 --random-output-len 64 --random-range-ratio 1 \
  --max-concurrency 1 --compare-socket-client 4 --output "$OUT/serving_llama8b_c1_in128_h200.json"
$BS --port 30001 --num-prompts 4 --random-input-len 2000 --random-output-len 64 --random-range-ratio 1 \
  --max-concurrency 1 --compare-socket-client 2 --output "$OUT/serving_llama8b_c1_in2000_h200.json"
$BS --port 30001 --num-prompts 256 --random-input-len 1024 --random-output-len 256 --random-range-ratio 0.5 \
  --slo-ttft 2000 --slo-tpot 50 --output "$OUT/serving_llama8b_burst256_mixed_h200.json"
wait_up 30002 "$OUT/server_plain.log" || exit 1
$BS --port 30002 --num-prompts 256 --random-input-len 1024 --random-output-len 256 --random-range-ratio 0.5 \
  --slo-ttft 2000 --slo-tpot 50 --output "$OUT/serving_llama8b_burst256_plain_h200.json"
python - "$OUT" <<'EOF'
import json, sys, glob, os
for f in sorted(glob.glob(os.path.join(sys.argv[1], "serving_*.json"))):
    m = json.load(open(f))
    print(os.path.basename(f), {k: round(m[k], 2) for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
          "median_itl_ms", "p99_itl_ms", "median_tpot_ms", "output_throughput", "tokens_per_chunk",
          "client_us_per_chunk") if k in m}, {k: round(v, 2) for k, v in (m.get("server_hops_mean_ms") or {}).items()},
          m.get("client_check", {}).get("ttft_diff_ms"))
EOF
grep -h "Prefill batch.*mixed" "$OUT/server_mixed.log" | tail -n 2
