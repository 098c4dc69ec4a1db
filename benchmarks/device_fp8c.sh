#!/usr/bin/env bash
# Device call for the FP8 decode kernel's third round (issue #19, branch fp8c), run from the branch's folder inside
# main's checkout: the decode kernel of main (../nanovllm, copied aside) against this branch's in one process
# (benchmarks/fp8_decode.py --compare), the tile sweep, then the GPU tests the branch touches. With SEED=1 also
# the seed benchmark with a bf16 and an FP8 cache. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NANOVLLM_LOG_LEVEL=WARNING
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD
CONFIG=${CONFIG:-.wt-models/qwen3-0.6b/config.json}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if [ -f ../nanovllm/backends/cuda/attention/triton_decode.py ]; then  # main's kernel, importable as main_decode
  mkdir -p /tmp/cmp/main_decode && touch /tmp/cmp/main_decode/__init__.py
  cp ../nanovllm/backends/cuda/attention/triton_{decode,common}.py /tmp/cmp/main_decode/
  sed -i 's/from nanovllm.backends.cuda.attention.triton_common import/from main_decode.triton_common import/' \
    /tmp/cmp/main_decode/triton_decode.py
  md5sum ../nanovllm/backends/cuda/attention/triton_decode.py | tee -a "$OUT/device.txt"
  COMPARE="--compare main_decode.triton_decode"
fi
if [ "${SEED:-0}" = 1 ]; then
  for kv in auto fp8; do
    timeout ${BENCH_S:-100} python3 -m nanovllm.cli bench --backend cuda --config "$CONFIG" --no-progress --kv-cache-dtype $kv \
      --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench-$kv.log" | grep -E "efficiency|tokens/s|Error|error"
  done
fi
PYTHONPATH=$PWD:/tmp/cmp timeout ${DECODE_S:-100} python3 benchmarks/fp8_decode.py ${SWEEP---sweep} ${COMPARE:-} \
  --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | cut -c1-230
TESTS=${TESTS:-tests/backends/test_cuda_fp8_kernels.py tests/backends/test_cuda_kernels.py \
tests/backends/test_parity_matrix.py tests/backends/test_cuda_e2e.py}
timeout ${TESTS_S:-120} python3 -m pytest -q -p no:cacheprovider $TESTS \
  -k "${TESTS_K:-decode or fp8 or widen or order or graphs or compiled}" 2>&1 | tee "$OUT/tests.log" | tail -5
