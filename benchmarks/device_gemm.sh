#!/usr/bin/env bash
# One device call for issue #18's GEMM work: the sweep (benchmarks/gemm_sweep.py), then a decode-step profile.
# Run from the branch copy's root: `bash benchmarks/device_gemm.sh [config.json]`; results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
C=${1:-.wt-models/qwen3-0.6b/config.json}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD NANOVLLM_LOG_LEVEL=WARNING PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 240 python3 benchmarks/gemm_sweep.py --out "$OUT/gemm_sweep.json" 2>&1 | tee "$OUT/sweep.log" | grep -v "^  "
echo "sweep rc=$?"
timeout 90 python3 benchmarks/profile_decode.py --config "$C" --batch 256 > "$OUT/profile-256.log" 2>&1
echo "profile rc=$?"
grep -E "^decode step|^synchronous" "$OUT/profile-256.log"
grep -E "nvjet|gemm|cutlass|Triton|triton|_kernel|Memcpy|Memset" "$OUT/profile-256.log" | head -30
exit 0
