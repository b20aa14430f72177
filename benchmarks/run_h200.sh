#!/usr/bin/env bash
# Stage-selected H200 runs of this wave's open figures, one device call each (repo root on the GPU host):
#   bash benchmarks/run_h200.sh OUTDIR STAGES
# STAGES (comma list, run in this order):
#   gemvtest    the GEMV (plain, PDL in a CUDA graph) and greedy argmax GPU tests only
#   fp8test     the FP8 kernel tests (GEMV at M <= 4, tensor-core tile, W8A8, FP8 KV, the GEMV under PDL in a
#               CUDA graph) and HiCache's layer-by-layer load against a device-resident prefix
#   attnsweep   decode attention's launch sweep, bf16 and FP8 pools (what kernels.attention.decode_config follows)
#   attnsweep2  the same at batch 64 / 256 only, 128-token tiles, 1-4 warps, 2-4 stages
#   fp8quick    the FP8 attention, fused-quantize and W8A8 GPU tests only
#   fp8acc      FP8 weights / KV / both against bf16 on random weights (first token, common prefix, KL)
#   kerneltest  the attention / fused kernels vs torch (tests/gpu/test_kernels.py)
#   mixedtest   the mixed-batch attention (extend + decode kernels in one forward) vs the torch backend
#   gemvsweep   the W8A16 GEMV's tile sweep inside CUDA graphs (what kernels.fp8.gemv_config follows)
#   fp8graph    bf16 vs W8A16 tile vs W8A8 inside CUDA graphs at 8-128 tokens (where w8a8_min_tokens should be)
#   fp8gemm     per-shape GEMM timings, bf16 vs W8A16 (GEMV and tile) vs W8A8, LM head included (issue 12)
#   fp8b1       batch-1 decode, bf16, --quantization fp8, and fp8 --disable-pdl, 8B preset (issue 12's 1.8x target)
#   bf16nopdl   batch-1 decode, bf16 --disable-pdl (what PDL gives the bf16 path's small kernels)
#   fp8prefill  prefill 8 x 2048, bf16 then --quantization fp8 (issue 12's 1.5x target)
#   enginetest  the GPU engine vs HF transformers (tests/gpu/test_engine_gpu.py; PDL on in the graph modes)
#   fp8profile  the fp8 batch-1 step's kernel table (where the rest of the time goes)
#   fp8offline  offline minisgl, bf16 then fp8 weights + fp8 KV (issue 12's 1.5x target)
#   grammar     constrained vs plain decode at batch 64, 8B preset, with the default serial mask fill and
#               with fill pools of 2-16 threads (issue 15's 5 % target)
#   nano06      offline --workload nanovllm, Qwen3-0.6B (issue 19: compares with nano-vllm's published figures)
#   nano8b      offline --workload nanovllm, 8B preset
#   conserv     --schedule-conservativeness auto vs 1.0, requests ending at "EOS" after ~100 of 1024 tokens
#               (issue 18's H200 target; --eos-every on dummy weights)
#   conservlong the same on 8,192 prompts (auto runs past a minute: the retraction rate per minute of the guide)
#   conservmixed  the same with --enable-mixed-chunk (admissions ride along with the decode step)
#   offlineab   offline minisgl bf16 / fp8 + fp8 KV alternating twice (the 1.5x target's ratio vs run-to-run noise)
#   pdlab       batch-1 fp8 decode alternating --disable-pdl / default, three times each (PDL's effect vs noise)
#   piecewise   concurrency-1 TTFT for 16-, 128- and 512-token prompts, a piecewise-graph server vs an eager
#               one side by side (issue 14's <= 0.8x target)
#   diag        kernel tables: fp8 batch-1 decode; bf16 and fp8+fp8-KV decode at batch 256 (offline's shape);
#               fp8 and bf16 prefill of 8 x 2048 (each table also in OUTDIR/diag_*.json)
#   hicache     the multi-turn workload with and without HiCache, combined context 4.56x the device pool (issue 13)
#   hicache8k   the same with 8,192-token first contexts and a 24,576-token device pool (4.3x)
#   gemvchain   the GEMV tile sweep with each GEMV behind a PDL-triggering RMSNorm, as in a decode step
#               (what kernels.fp8.GEMV_TABLE holds)
#   prefillprof the host time of a concurrency-1 prefill (16 / 128 / 512 tokens), eager and with piecewise graphs,
#               with cProfile's top functions (issue 14: where the 17 ms "prefill launch" hop goes)
#   pwtest      the piecewise-graph GPU test (graphs vs the same pieces eagerly vs the eager model)
#   pwdiag      kernel tables of one 512-token prefill, eager and with piecewise graphs (why piecewise's device
#               time was longer there)
#   burst2k     256 requests at once with --chunked-prefill-size 2048, --enable-mixed-chunk vs without (issue 14's
#               ITL p99 <= 100 ms at >= 95 % of the throughput)
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
run() {  # the last 30 lines to the console, the whole filtered output appended to OUTDIR/run_log.txt
  local t=$1; shift; echo "=== $* (limit ${t}s)" | tee -a "$OUT/run_log.txt"; local t0=$SECONDS
  timeout "$t" "$@" 2>&1 | grep -v "it/s\]\|tensor/s\]" | grep -v "^\[.*\] \(Decode\|Prefill\) batch" \
    | tee -a "$OUT/run_log.txt" | tail -n 30
  echo "--- ${*:1:3}... took $((SECONDS - t0)) s" | tee -a "$OUT/run_log.txt"
}
up() {  # wait for a server's /health (150 s)
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.5; done
  echo "server on $1 did not come up"; return 1
}
has fp8test && run 200 python -m pytest -q -rf tests/gpu/test_fp8_kernels.py tests/gpu/test_hicache_gpu.py
has gemvtest && run 300 python -m pytest -q -rf tests/gpu/test_fp8_kernels.py tests/gpu/test_kernels.py \
  -k "pdl or w8a16 or argmax"
has fp8quick && run 120 python -m pytest -q -rf tests/gpu/test_fp8_kernels.py -k "attention or dot_dtypes or fused or scaled_mm"
has fp8acc && run 200 python -m radixserve.bench.quant_accuracy $M8 --num-prompts 4 --output-len 16 --max-total-tokens 4096 \
  --disable-cuda-graph --output "$OUT/fp8_h200_accuracy_llama8b_dummy_gpu.json"
has kerneltest && run 200 python -m pytest -q -rf tests/gpu/test_kernels.py
has mixedtest && run 120 python -m pytest -q -rf tests/gpu/test_kernels.py -k "backend"
has attnsweep && run 420 python benchmarks/decode_attn_sweep.py --output "$OUT/decode_attn_sweep_h200.json"
has attnsweep2 && run 200 python benchmarks/decode_attn_sweep.py --large-batch \
  --output "$OUT/decode_attn_sweep_large_batch_h200.json"
has gemvchain && run 400 python benchmarks/fp8_gemv_sweep.py --chain --output "$OUT/fp8_gemv_chain_sweep_h200.json"
has gemvsweep && run 300 python benchmarks/fp8_gemv_sweep.py --output "$OUT/fp8_gemv_sweep_h200.json"
has fp8graph && run 200 python benchmarks/fp8_gemm_graph_bench.py --output "$OUT/fp8_gemm_graph_h200.json"
has fp8gemm && run 100 python benchmarks/fp8_gemm_bench.py --output "$OUT/fp8_gemm_h200_gemv.json"
if has fp8b1; then
  run 60 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --output "$OUT/fp8_h200_bs1_bf16.json"
  run 60 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --quantization fp8 \
    --output "$OUT/fp8_h200_bs1_fp8.json"
  run 60 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --quantization fp8 \
    --disable-pdl --output "$OUT/fp8_h200_bs1_fp8_no_pdl.json"
fi
has bf16nopdl && run 60 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --disable-pdl \
  --output "$OUT/fp8_h200_bs1_bf16_no_pdl.json"
if has fp8prefill; then
  run 50 $OB $M8 --batch-size 8 --input-len 2048 --output-len 4 --cuda-graph-max-bs 8 \
    --output "$OUT/fp8_h200_prefill_8x2048_bf16.json"
  run 50 $OB $M8 --batch-size 8 --input-len 2048 --output-len 4 --cuda-graph-max-bs 8 --quantization fp8 \
    --output "$OUT/fp8_h200_prefill_8x2048_fp8.json"
fi
has enginetest && run 240 python -m pytest -q -rf tests/gpu/test_engine_gpu.py
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
has conserv && run 400 python -m radixserve.bench.conservativeness $M8 $TOK --max-total-tokens 32768 \
  --num-prompts 4096 --max-new-tokens 1024 --eos-every 100 --decode-log-interval 40 --cuda-graph-max-bs 256 \
  --output "$OUT/conservativeness_auto_vs_1.0_h200_llama8b.json"
has conservlong && run 560 python -m radixserve.bench.conservativeness $M8 $TOK --max-total-tokens 32768 \
  --num-prompts 8192 --max-new-tokens 1024 --eos-every 100 --decode-log-interval 40 --cuda-graph-max-bs 256 \
  --output "$OUT/conservativeness_auto_vs_1.0_h200_llama8b_8192.json"
has conservmixed && run 240 python -m radixserve.bench.conservativeness $M8 $TOK --max-total-tokens 32768 \
  --num-prompts 2048 --max-new-tokens 1024 --eos-every 100 --decode-log-interval 10 --cuda-graph-max-bs 256 \
  --enable-mixed-chunk --output "$OUT/conservativeness_auto_vs_1.0_h200_llama8b_mixed_chunk.json"
has hicache && run 150 python -m radixserve.bench.offline $M8 $TOK --workload multi-turn --enable-hierarchical-cache \
  --hicache-ratio 5 --max-total-tokens 12288 --cuda-graph-max-bs 16 --num-prompts 12 --num-turns 4 \
  --random-input-len 4096 --turn-input-len 128 --random-output-len 16 --output "$OUT/hicache_multi_turn_llama8b_h200.json"
has hicache8k && run 200 python -m radixserve.bench.offline $M8 $TOK --workload multi-turn --enable-hierarchical-cache \
  --hicache-ratio 5 --max-total-tokens 24576 --cuda-graph-max-bs 16 --num-prompts 12 --num-turns 4 \
  --random-input-len 8192 --turn-input-len 128 --random-output-len 16 \
  --output "$OUT/hicache_multi_turn_8k_llama8b_h200.json"
if has diag; then
  GI="python -m radixserve.bench.gpu_idle $M8 --kernel-table 25"
  diag() { local name=$1; shift; echo "=== diag $name"; timeout 150 $GI "$@" --output "$OUT/diag_$name.json" 2>&1 \
    | grep "us/step\|gpu_idle\|Error\|error" | cut -c1-130; }
  diag fp8_bs1 --quantization fp8 --batch-size 1 --steps 50 --disable-overlap-schedule --cuda-graph-max-bs 4
  diag bf16_bs256 --batch-size 256 --input-len 512 --steps 30 --cuda-graph-max-bs 256
  diag fp8kv_bs256 --quantization fp8 --kv-cache-dtype fp8_e4m3 --batch-size 256 --input-len 512 --steps 30 \
    --cuda-graph-max-bs 256
  diag fp8_prefill --quantization fp8 --phase prefill --batch-size 8 --input-len 2048 --cuda-graph-max-bs 8
  diag bf16_prefill --phase prefill --batch-size 8 --input-len 2048 --cuda-graph-max-bs 8
fi
if has offlineab; then  # offline bf16 / fp8+fp8-KV alternating twice: the ratio within a pair vs the noise between them
  for i in 1 2; do
    run 80 python -m radixserve.bench.offline $M8 --workload minisgl --output "$OUT/fp8_h200_offline_ab_bf16_$i.json" \
      | grep "Output token\|Roofline"
    run 80 python -m radixserve.bench.offline $M8 --workload minisgl --quantization fp8 --kv-cache-dtype fp8_e4m3 \
      --output "$OUT/fp8_h200_offline_ab_fp8_$i.json" | grep "Output token\|Roofline"
  done
fi
if has pdlab; then
  for i in 1 2 3; do
    for mode in no_pdl pdl; do
      flag=""; [[ $mode == no_pdl ]] && flag="--disable-pdl"
      run 60 $OB $M8 --batch-size 1 --input-len 128 --output-len 256 --cuda-graph-max-bs 4 --quantization fp8 $flag \
        --output "$OUT/fp8_h200_bs1_pdlab_${mode}_$i.json" | grep decode_tok_per_s
    done
  done
fi
if has piecewise; then
  S="python -m radixserve $M8 $TOK --max-total-tokens 65536 --cuda-graph-max-bs 8 --decode-log-interval 1000"
  $S --port 30011 --enable-piecewise-cuda-graph --piecewise-cuda-graph-max-tokens 1024 >"$OUT/server_piecewise.log" 2>&1 &
  PA=$!
  $S --port 30012 >"$OUT/server_eager.log" 2>&1 &
  PB=$!
  if up 30011 && up 30012; then
    for len in 16 128 512; do
      for port in 30011 30012; do
        name=$([[ $port == 30011 ]] && echo piecewise || echo eager)
        timeout 60 python -m radixserve.bench.serving --quiet --port $port --num-prompts 12 --random-input-len $len \
          --random-output-len 8 --random-range-ratio 1 --max-concurrency 1 \
          --output "$OUT/serving_llama8b_c1_in${len}_${name}_h200.json"
      done
    done
    python - "$OUT" <<'PYEOF'
import json, os, sys
for n in (16, 128, 512):
    a, b = (json.load(open(os.path.join(sys.argv[1], f"serving_llama8b_c1_in{n}_{m}_h200.json"))) for m in ("piecewise", "eager"))
    print(f"in {n}: TTFT mean piecewise {a['mean_ttft_ms']:.1f} ms, eager {b['mean_ttft_ms']:.1f} ms, "
          f"ratio {a['mean_ttft_ms'] / b['mean_ttft_ms']:.2f}; median {a['median_ttft_ms']:.1f} / {b['median_ttft_ms']:.1f}")
PYEOF
  else
    tail -n 20 "$OUT/server_piecewise.log" "$OUT/server_eager.log"
  fi
  kill $PA $PB 2>/dev/null; wait $PA $PB 2>/dev/null
fi
if has prefillprof; then
  PP="python benchmarks/prefill_host_profile.py $M8 --max-total-tokens 65536 --cuda-graph-max-bs 8 --top 40"
  run 150 $PP --output "$OUT/prefill_host_profile_eager_llama8b_h200.json"
  run 200 $PP --enable-piecewise-cuda-graph --piecewise-cuda-graph-max-tokens 1024 \
    --output "$OUT/prefill_host_profile_piecewise_llama8b_h200.json"
fi
has pwtest && run 200 python -m pytest -q -rf tests/gpu/test_piecewise_gpu.py
if has pwdiag; then
  GI="python -m radixserve.bench.gpu_idle $M8 --kernel-table 25 --phase prefill --batch-size 1 --input-len 512 \
    --steps 8 --cuda-graph-max-bs 8"
  run 120 $GI --output "$OUT/diag_prefill_1x512_eager.json"
  run 200 $GI --enable-piecewise-cuda-graph --piecewise-cuda-graph-max-tokens 1024 \
    --output "$OUT/diag_prefill_1x512_piecewise.json"
fi
if has burst2k; then
  S="python -m radixserve $M8 $TOK --max-total-tokens 250000 --chunked-prefill-size 2048 --enable-metrics \
    --decode-log-interval 200"
  $S --port 30021 --enable-mixed-chunk >"$OUT/server_burst2k_mixed.log" 2>&1 &
  QA=$!
  $S --port 30022 >"$OUT/server_burst2k_plain.log" 2>&1 &
  QB=$!
  if up 30021 && up 30022; then
    for i in 1 2; do  # each pair on fresh prompts (seed i on both): the ratio within a pair vs the noise between them
      for name in mixed plain; do
        port=$([[ $name == mixed ]] && echo 30021 || echo 30022)
        timeout 90 python -m radixserve.bench.serving --quiet --port $port --num-prompts 256 --random-input-len 1024 \
          --random-output-len 256 --random-range-ratio 0.5 --slo-ttft 2000 --slo-tpot 50 --seed $i \
          --output "$OUT/serving_llama8b_burst256_chunk2048_${name}_$i.json"
      done
    done
  else
    tail -n 20 "$OUT/server_burst2k_mixed.log" "$OUT/server_burst2k_plain.log"
  fi
  kill $QA $QB 2>/dev/null; wait $QA $QB 2>/dev/null
  python - "$OUT" <<'PYEOF'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "serving_llama8b_burst256_chunk2048_*.json"))):
    m = json.load(open(f))
    print(os.path.basename(f), {k: round(m[k], 2) for k in ("output_throughput", "median_itl_ms", "p99_itl_ms",
          "max_itl_ms", "median_ttft_ms", "p99_ttft_ms") if k in m})
PYEOF
fi
ls -la "$OUT"
