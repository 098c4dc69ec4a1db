#!/usr/bin/env bash
# The device call that decides the cuda option fuse_products' default (#18): the fused products' GPU tests with
# every thread's stack dumped if one hangs (round sixteen: in runs after other tests, the bf16 version of the
# engine test failed twice and two runs timed out without output), then seed pairs with the option on and off in
# both KV dtypes while time is left. Full logs go to $OUT. Here first:
#   mkdir -p .wt-models/qwen3-0.6b && cp ../shared/models/qwen3-0.6b/config.json .wt-models/qwen3-0.6b/
# on the device (carry .wt-models): `bash benchmarks/device_fused_check.sh [seconds, default 560]`.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s); END=$(( T0 + ${1:-560} ))
t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD NANOVLLM_LOG_LEVEL=WARNING PYTHONUNBUFFERED=1
CONFIG=${CONFIG:-$PWD/.wt-models/qwen3-0.6b/config.json}
[ -f "$CONFIG" ] || { echo "no $CONFIG: copy ../shared/models/qwen3-0.6b/config.json there and carry it"; exit 1; }
timeout 240 python3 -m pytest -v -p no:cacheprovider -o faulthandler_timeout=90 \
    tests/backends/test_cuda_fused_products.py tests/backends/test_cuda_linear.py tests/backends/test_cuda_balanced_decode.py \
    > "$OUT/fused-tests.log" 2>&1
echo "tests rc $?"; grep -E "^FAILED|^ERROR| passed| failed|Timeout" "$OUT/fused-tests.log" | cut -c1-300; t "tests done"
bench() {  # $1 label, rest: options
  local label=$1; shift
  [ $(( END - $(date +%s) )) -lt 70 ] && { echo "skip $label"; return; }
  echo "== $label"; timeout 70 python3 -m nanovllm.cli bench --backend cuda --config "$CONFIG" --no-progress \
     --json "$OUT/bench.jsonl" "$@" 2>&1 | tee -a "$OUT/bench-$label.log" | grep -E "efficiency|Error|error" | cut -c60-250
}
for i in 1 2; do
  bench bf16-fused-$i --backend-option fuse_products=1
  bench bf16-plain-$i --backend-option fuse_products=0
  bench fp8-fused-$i --kv-cache-dtype fp8 --backend-option fuse_products=1
  bench fp8-plain-$i --kv-cache-dtype fp8 --backend-option fuse_products=0
done
t "all done"
