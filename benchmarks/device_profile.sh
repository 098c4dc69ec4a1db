#!/usr/bin/env bash
# Where a seed run's time goes on the defaults (#18). STEPS picks parts (default "profile decode"); logs to $OUT.
#   profile  step buckets for both KV dtypes: prefill time, decode steps by batch, the GPU's idle time before each
#            (host-bound or not)
#   first    the steps that compiled a kernel or allocated device or pinned host memory (profile_steps
#            --first-times), with and without start-up's pinned-block reservation (core/pinned_blocks.py). Round
#            seventeen: the 7th of 9 prefill steps, the first to sample 33 rows, took ~79 ms (others 23-42) in both
#            KV dtypes
#   ab       seed runs (profile_steps' total) with and without that reservation, alternated, both KV dtypes, twice
#   decode   one batch-256 decode step's kernels (profile_decode.py)
#   blas     the decode products at M 128/256 (gemm_layouts.py), then seed pairs, with torch's default BLAS and with
#            cuBLASLt preferred (TORCH_BLAS_PREFER_CUBLASLT=1): its heuristic may pick other kernels for the o and
#            down products with the residual (6.5 and 7.8 us a layer at M 256 for ~1.4 and ~2 us of tensor work)
# Here first: mkdir -p .wt-models/qwen3-0.6b && cp ../shared/models/qwen3-0.6b/config.json .wt-models/qwen3-0.6b/
# Then on the device (carry .wt-models): STEPS="first ab" bash benchmarks/device_profile.sh [seconds, 560]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s); END=$(( T0 + ${1:-560} ))
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD NANOVLLM_LOG_LEVEL=WARNING PYTHONUNBUFFERED=1
CONFIG=$PWD/.wt-models/qwen3-0.6b/config.json
steps() {  # $1 log name, rest: profile_steps options
  local log=$OUT/$1.log; shift
  [ $(( END - $(date +%s) )) -lt 80 ] && { echo "skip $log"; return 1; }
  timeout 100 python3 benchmarks/profile_steps.py --config "$CONFIG" "$@" > "$log" 2>&1
  echo "== $(basename "$log") rc $? [$(( $(date +%s) - T0 )) s]"
}
for step in ${STEPS:-profile decode}; do
  case $step in
    profile) for kv in auto fp8; do
               steps steps-$kv --kv-cache-dtype $kv && grep -v Warning "$OUT/steps-$kv.log" | head -40
             done ;;
    first) for reserve in "" --no-pinned-reserve; do
             steps first$reserve --first-times $reserve \
               && grep -v Warning "$OUT/first$reserve.log" | sed -n '2,3p;/^steps that/,$p' | head -30
           done ;;
    ab) for i in 1 2; do for kv in auto fp8; do for reserve in "" --no-pinned-reserve; do
          steps ab-$kv$reserve-$i --kv-cache-dtype $kv $reserve \
            && grep -E '^total|^prefill steps' "$OUT/ab-$kv$reserve-$i.log" | tr '\n' ' ' | cut -c1-220 && echo
        done; done; done ;;
    decode) timeout 90 python3 benchmarks/profile_decode.py --config "$CONFIG" --batch 256 --context 1024 \
              > "$OUT/decode.log" 2>&1
            echo "== decode 256 x 1k rc $? [$(( $(date +%s) - T0 )) s]"; grep -v Warning "$OUT/decode.log" | head -60 ;;
    blas) for lt in 0 1; do
            TORCH_BLAS_PREFER_CUBLASLT=$lt timeout 120 python3 benchmarks/gemm_layouts.py --ms 64,128,256 \
              --shapes qkv,o,gate_up,down > "$OUT/layouts-lt$lt.log" 2>&1
            echo "== gemm_layouts, cuBLASLt preferred: $lt"; grep -v Warning "$OUT/layouts-lt$lt.log" | head -30
          done
          for i in 1 2; do for lt in 0 1; do
            TORCH_BLAS_PREFER_CUBLASLT=$lt steps blas-lt$lt-$i \
              && grep -E '^total' "$OUT/blas-lt$lt-$i.log" | sed "s/^/cuBLASLt $lt: /"
          done; done ;;
  esac
done
