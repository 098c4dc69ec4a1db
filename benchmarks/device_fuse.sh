#!/usr/bin/env bash
# The device call of the fused q/k norm + rotary + KV store (#18, branch fuse): the GPU tests it touches, the
# kernel-level comparison (bench_qk_store.py), then the seed benchmark and a decode-step profile for the branch
# base (main, copied into BASE) and the branch, in one call so the ratios hold. Run from the branch copy's root:
# `bash benchmarks/device_fuse.sh ../.wt-fuse-base [seconds]`; steps are skipped when too little time is left.
set -uo pipefail
BASE=$(cd "$1" && pwd); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; END=$(( $(date +%s) + ${2:-240} ))
left() { echo $(( END - $(date +%s) )); }
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export NANOVLLM_LOG_LEVEL=WARNING PYTHONUNBUFFERED=1
BRANCH=$PWD; CONFIG=$BRANCH/.wt-models/qwen3-0.6b/config.json
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PYTHONPATH=$BRANCH timeout 70 python3 -m pytest -q -p no:cacheprovider tests/backends/test_cuda_kernels.py \
    tests/backends/test_cuda_fp8_kernels.py tests/backends/test_parity_matrix.py tests/backends/test_cuda_e2e.py \
    -k "store or elementwise or registers or rotary or cuda-kv_cache or float32_greedy or prefix_cache" \
    > "$OUT/tests.log" 2>&1; tail -4 "$OUT/tests.log" | cut -c1-300
t "tests done"
PYTHONPATH=$BRANCH timeout 40 python3 benchmarks/bench_qk_store.py 2>&1 | tee "$OUT/micro.log" | grep -v Warning
t "kernel comparison done"
bench() {  # $1: label, $2: tree
  [ "$(left)" -lt 60 ] && { echo "skip bench $1 ($(left) s left)"; return; }
  echo "== bench $1"; (cd "$2" && PYTHONPATH=$2 timeout 75 python3 -m nanovllm.cli bench --backend cuda --config "$CONFIG" \
      --no-progress --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log" | grep -E "efficiency|Error|error" | cut -c1-260)
}
profile() {
  [ "$(left)" -lt 45 ] && { echo "skip profile $1 ($(left) s left)"; return; }
  (cd "$2" && PYTHONPATH=$2 timeout 60 python3 benchmarks/profile_decode.py --config "$CONFIG" --batch 256 --steps 5 \
      > "$OUT/profile-$1.log" 2>&1)
  echo "== profile $1"; grep -E "^decode step|qk_norm|store_kv|Self CUDA time total" "$OUT/profile-$1.log" | cut -c1-200
}
bench base "$BASE"; bench branch "$BRANCH"
profile branch "$BRANCH"; profile base "$BASE"
t "all done ($(left) s left)"
exit 0
