#!/usr/bin/env bash
# The device calls that decide the fused products (#18): the cuda option fuse_products' default and the split-K
# q/k/v tables. STEPS picks parts (default "tests bench"); full logs go to $OUT.
#   tests  the fused products' GPU tests (with linear.py's and the balanced decode's), every thread's stack dumped
#          if one test runs 90 s (round sixteen: after other tests in one process the bf16 engine test failed twice
#          and two runs hung, without a stack)
#   sweep  benchmarks/fused_products.py (split-K q/k/v candidates included) -> $OUT/fused.json
#   bench  seed pairs, fuse_products on and off, both KV dtypes, alternated, while time is left; with a sweep's
#          tables (FUSED_JSON, default $OUT/fused.json when it exists) a third run each, those tables applied
# Here first: mkdir -p .wt-models/qwen3-0.6b && cp ../shared/models/qwen3-0.6b/config.json .wt-models/qwen3-0.6b/
# Then on the device (carry .wt-models): STEPS="tests sweep" bash benchmarks/device_fused_check.sh [seconds, 560]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s); END=$(( T0 + ${1:-560} ))
t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD NANOVLLM_LOG_LEVEL=WARNING PYTHONUNBUFFERED=1
CONFIG=${CONFIG:-$PWD/.wt-models/qwen3-0.6b/config.json}
[ -f "$CONFIG" ] || { echo "no $CONFIG: copy ../shared/models/qwen3-0.6b/config.json there and carry it"; exit 1; }
bench() {  # $1 label, rest: options (a first option --apply PATH runs through fused_products.py)
  local label=$1; shift
  [ $(( END - $(date +%s) )) -lt 70 ] && { echo "skip $label"; return; }
  local cmd=(python3 -m nanovllm.cli)
  [ "${1:-}" = "--apply" ] && { cmd=(python3 benchmarks/fused_products.py --apply "$2" -- ); shift 2; }
  echo "== $label"; timeout 70 "${cmd[@]}" bench --backend cuda --config "$CONFIG" --no-progress \
     --json "$OUT/bench.jsonl" "$@" 2>&1 | tee -a "$OUT/bench-$label.log" \
     | grep -E "efficiency|Error|error" | cut -c60-250
}
for step in ${STEPS:-tests bench}; do
  case $step in
    tests) timeout 240 python3 -m pytest -v -p no:cacheprovider -o faulthandler_timeout=90 \
             tests/backends/test_cuda_fused_products.py tests/backends/test_cuda_linear.py \
             tests/backends/test_cuda_balanced_decode.py > "$OUT/fused-tests.log" 2>&1
           echo "tests rc $?"; grep -E "^FAILED|^ERROR| passed| failed|Timeout" "$OUT/fused-tests.log" | cut -c1-300 ;;
    sweep) timeout 300 python3 benchmarks/fused_products.py --out "$OUT/fused.json" \
             --ms 1,4,8,16,32,48,64,96,128,192,256 2>&1 | tee "$OUT/sweep.log" | grep -v Warning ;;
    bench) tables=${FUSED_JSON:-$OUT/fused.json}
           for i in 1 2; do
             for kv in auto fp8; do
               bench "$kv-fused-$i" --kv-cache-dtype $kv --backend-option fuse_products=1
               bench "$kv-plain-$i" --kv-cache-dtype $kv --backend-option fuse_products=0
               [ -f "$tables" ] && bench "$kv-swept-$i" --apply "$tables" --kv-cache-dtype $kv \
                 --backend-option fuse_products=1
             done
           done ;;
  esac
  t "$step done"
done
