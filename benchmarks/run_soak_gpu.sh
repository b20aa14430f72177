#!/usr/bin/env bash
# Soak on the GPU host (issue 11): a server of the 8B preset (dummy weights, the bundled tokenizer), then
# 10,000 mixed requests at concurrency 128 from radixserve.bench.soak, then SIGTERM and its exit code.
# Usage (repo root, GPU host):  bash benchmarks/run_soak_gpu.sh OUTDIR [NUM_REQUESTS] [MODEL]
set -uo pipefail
OUT=${1:-benchmarks/results}; N=${2:-10000}; MODEL=${3:-llama-3.1-8b}
mkdir -p "$OUT"
PORT=31919
python -m radixserve --model "$MODEL" --load-format dummy --tokenizer-path .gpu/tokenizer --port $PORT \
  --shutdown-grace-period 10 > "$OUT/soak_server.log" 2>&1 &
PID=$!
for _ in $(seq 600); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
python -m radixserve.bench.soak --base-url http://127.0.0.1:$PORT --num-requests "$N" --concurrency 128 \
  --max-tokens 64 --output "$OUT/soak_gpu.json"
echo "soak exit code $?"
kill -TERM $PID; wait $PID; echo "server exit code $?"
grep -c Traceback "$OUT/soak_server.log" | sed 's/^/tracebacks in server log: /'
grep -E "Decode batch|max_total_num_tokens" "$OUT/soak_server.log" | tail -3
