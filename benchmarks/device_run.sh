#!/usr/bin/env bash
# One device call: versions, GPU tests, kernel benchmarks, the seed throughput benchmark. Results under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed; using PYTHONPATH"
for step in ${STEPS:-tests kernels bench}; do
  case $step in
    tests) python3 -m pytest -q -x tests/backends -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    kernels) python3 benchmarks/kernels_cuda.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -30 ;;
    bench) python3 -m nanovllm.cli bench --backend cuda --config shared-models/qwen3-0.6b/config.json --no-progress \
             --json "$OUT/bench.jsonl" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^INFO" | tail -5 ;;
    eager) python3 -m nanovllm.cli bench --backend cuda --config shared-models/qwen3-0.6b/config.json --no-progress \
             --enforce-eager --json "$OUT/bench.jsonl" 2>&1 | tee "$OUT/bench-eager.log" | tail -3 ;;
  esac
done
