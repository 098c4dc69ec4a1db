#!/usr/bin/env bash
# Device runs in few calls: STEPS picks parts. Results land under $OUT (bench.jsonl, *.log, kernels.json).
#   STEPS="bench profile"        the seed throughput benchmark twice (cold, then warm caches) and step profiles
#   STEPS="flash tests kernels"  build flash-attn, run the GPU tests and the kernel table (ours beside flash-attn)
#   STEPS="recheck"              what round four's last call did not reach: the parity matrix's cuda cells and the
#                                rewritten Triton-GEMM-in-graphs test (tests/backends takes ~300 s now: give it that)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
CONFIG=${CONFIG:-shared-models/qwen3-0.6b/config.json}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed; using PYTHONPATH"
for step in ${STEPS:-bench profile}; do
  case $step in
    bench) for run in cold warm; do
             python3 -m nanovllm.cli bench --backend cuda --config "$CONFIG" --no-progress --json "$OUT/bench.jsonl" \
               2>&1 | tee "$OUT/bench-$run.log" | grep -E "efficiency [0-9]|Error"; done ;;
    profile) python3 benchmarks/profile_decode.py --config "$CONFIG" --batch 256 --context 1024 > "$OUT/profile-256.log" 2>&1
             python3 benchmarks/profile_decode.py --config "$CONFIG" --batch 32 --context 1024 > "$OUT/profile-32.log" 2>&1
             grep -E "^decode step|^synchronous" "$OUT"/profile-*.log
             python3 benchmarks/profile_steps.py --config "$CONFIG" 2>&1 | grep -v "^INFO\|WARN\|kernel\|skipped\|->" | tee "$OUT/steps.log" ;;
    flash) bash .flash-attn/build.sh .flash-attn/flash-attn-src.tgz 2>&1 | tail -3; export PYTHONPATH=/tmp/flash-attn:$PYTHONPATH ;;
    tests) python3 -m pytest -q tests/backends -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -4 ;;
    recheck) python3 -m pytest -q -p no:cacheprovider tests/backends/test_parity_matrix.py \
               tests/backends/test_cuda_linear.py -k "cuda or cublas" 2>&1 | tee "$OUT/recheck.log" | tail -4 ;;
    kernels) python3 benchmarks/kernels_cuda.py --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; tail -40 "$OUT/kernels.log" ;;
  esac
done
