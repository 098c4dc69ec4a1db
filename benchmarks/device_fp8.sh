#!/usr/bin/env bash
# One device call for the FP8 KV cache (issue #19): the seed benchmark with a bf16 and an FP8 cache, the decode
# kernel's bandwidth (bf16 vs FP8, with an FP8 tile sweep), the FP8 kernel tests and parity matrix on the GPU,
# and the accuracy of FP8 against bf16 KV on the random-weight Qwen3 shape. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} NANOVLLM_LOG_LEVEL=WARNING
CONFIG=${CONFIG:-shared-models/qwen3-0.6b/config.json}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
for kv in auto fp8; do
  timeout 100 python3 -m nanovllm.cli bench --backend cuda --config "$CONFIG" --no-progress --kv-cache-dtype $kv \
    --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench-$kv.log" | grep -E "efficiency|Error|error"
done
timeout 40 python3 benchmarks/fp8_decode.py --sweep --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | cut -c1-200
timeout 40 python3 -m pytest -q -x -p no:cacheprovider tests/backends/test_cuda_fp8_kernels.py \
  tests/backends/test_parity_matrix.py 2>&1 | tee "$OUT/tests.log" | tail -4
timeout 50 python3 benchmarks/kv_accuracy.py --num-prompts 4 --backend cuda --config "$CONFIG" --eager --dtypes fp8_e4m3 \
  --scales per_head,unit --json "$OUT/accuracy.jsonl" 2>&1 | grep -v "INFO\|Warn" | tee "$OUT/accuracy.log"
