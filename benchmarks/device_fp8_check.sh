#!/usr/bin/env bash
# Short follow-up call: the FP8 kernel tests and parity matrix on the GPU, and FP8 accuracy on random Qwen3.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} NANOVLLM_LOG_LEVEL=WARNING
CONFIG=${CONFIG:-shared-models/qwen3-0.6b/config.json}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
timeout 55 python3 -m pytest -q -p no:cacheprovider tests/backends/test_cuda_fp8_kernels.py \
  tests/backends/test_parity_matrix.py 2>&1 | tee "$OUT/tests.log" | tail -6
timeout 60 python3 benchmarks/kv_accuracy.py --num-prompts 4 --backend cuda --config "$CONFIG" --eager \
  --dtypes fp8_e4m3 --scales per_head,unit --json "$OUT/accuracy.jsonl" 2>&1 | grep -v "INFO\|Warn" | tee "$OUT/accuracy.log"
