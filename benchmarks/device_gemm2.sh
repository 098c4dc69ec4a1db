#!/usr/bin/env bash
# The second device call of the GEMM round (#18): the kernel's tests on the GPU, then a short sweep of the
# swapped-operand tiles and of gate_up with SiLU in its epilogue (M = 64 and 256, where most decode steps of the
# seed benchmark run), with the layer chain. Run from the branch copy's root: `bash benchmarks/device_gemm2.sh [s]`.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; END=$(( $(date +%s) + ${1:-100} ))
left() { echo $(( END - $(date +%s) )); }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD NANOVLLM_LOG_LEVEL=WARNING PYTHONUNBUFFERED=1
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/backends/test_cuda_linear.py 2>&1 | tee "$OUT/tests.log" \
    | tail -3
echo "sweep with $(left) s left"
timeout $(( $(left) - 2 )) python3 benchmarks/gemm_sweep.py --shapes qkv,o,gate_up,down --ms 64,256 --chain 64,256 \
    --swapped-only --out "$OUT/gemm_sweep2.json" 2>&1 | tee "$OUT/sweep2.log" | grep -v "^  "
echo "done with $(left) s left"
exit 0
