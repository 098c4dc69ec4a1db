#!/usr/bin/env bash
# Device runs in few calls: STEPS picks parts, in order. Results land under $OUT (bench.jsonl, *.log, kernels.json).
#   STEPS="bench profile"        the seed throughput benchmark twice (cold, then warm caches); where a seed run's time
#                                goes: decode steps at batch 256 and 32 (profile_decode.py), and step buckets for both
#                                KV dtypes (profile_steps.py: prefill time, decode steps by batch, the GPU's idle time
#                                before each)
#   STEPS="first stall"          the steps that compiled a kernel or allocated device or pinned memory
#                                (profile_steps --first-times); where the seed run's 7th prefill step (the first of
#                                34 sequences) waits: its GPU time is the others', its launch ~65 ms against 14-33
#                                (round eighteen; lazy kernel loading and pinned allocations ruled out, RESULTS.md).
#                                A run with --sync-check (torch's sync debug mode: which nanovllm line makes a host
#                                sync), then steps 5 and 6 alone under torch.profiler. Round nineteen: no nanovllm
#                                sync; step 6 spends 16.7 ms in aten::mm on the host (a new cuBLAS shape: ~3 ms)
#                                Round twenty: that first cuBLAS call was it; prefill pads LM-head rows (STEPS=pad)
#   STEPS="pad"                  prefill's LM head at its own sampled row count against padded to a captured size
#                                (model_runner.padded_rows; profile_steps --no-logit-padding), alternated, both KV
#                                dtypes: the prefill steps' launch and GPU times and the run's idle time
#   STEPS="blas"                 the decode products at M 64-256 (gemm_layouts.py), then seed runs, with torch's default
#                                BLAS and with cuBLASLt preferred (TORCH_BLAS_PREFER_CUBLASLT=1): its heuristic may pick
#                                other kernels for the o and down products with the residual
#   STEPS="shapes"               launch shapes of rotary.qk_store and act.silu_mul (elementwise_shapes.py; round
#                                twenty-one chose rotary_store.launch_shape's and silu_mul's prefill shape by it)
#   STEPS="prefill"              tile shapes of the Triton prefill attention, FlashAttention-2 varlen beside them on
#                                steps with no cache (prefill_tiles.py; round twenty-two chose prefill_config's
#                                short-context tiles, two query heads a program, by it; round twenty-three moved
#                                prefix-free steps from FA2 varlen, 1.4-1.7x slower, to the Triton prefill)
#   STEPS="chain"                a decode step's 112 products as one persistent Triton kernel against a launch a
#                                product (persistent_chain.py; round twenty-three: 1.0-2.3x cuBLAS's time, ruled out)
#   STEPS="flash tests kernels"  build flash-attn, run the GPU tests and the kernel table (ours beside flash-attn);
#                                tests-kernels and tests-rest split the GPU tests (453 s in all) over two calls
#   STEPS="recheck"              the parity matrix's cuda cells and the Triton-GEMM-in-graphs test
# Here first: mkdir -p .wt-models/qwen3-0.6b && cp ../shared/models/qwen3-0.6b/config.json .wt-models/qwen3-0.6b/,
# then on the device (carry .wt-models): STEPS="..." bash benchmarks/device_run.sh [seconds for the profile_steps
# runs, default 560]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s); END=$(( T0 + ${1:-560} ))
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} NANOVLLM_LOG_LEVEL=${NANOVLLM_LOG_LEVEL:-WARNING}
CONFIG=${CONFIG:-$PWD/.wt-models/qwen3-0.6b/config.json}
[ -f "$CONFIG" ] || { echo "no $CONFIG: copy ../shared/models/qwen3-0.6b/config.json there and carry it"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed; using PYTHONPATH"
steps() {  # $1 log name, rest: profile_steps options; skipped when under 80 s of the budget is left
  local log=$OUT/$1.log; shift
  [ $(( END - $(date +%s) )) -lt 80 ] && { echo "skip $log"; return 1; }
  timeout 150 python3 benchmarks/profile_steps.py --config "$CONFIG" "$@" > "$log" 2>&1
  echo "== $(basename "$log") rc $? [$(( $(date +%s) - T0 )) s]"
}
for step in ${STEPS:-bench profile}; do
  case $step in
    bench) for run in cold warm; do
             python3 -m nanovllm.cli bench --backend cuda --config "$CONFIG" --no-progress --json "$OUT/bench.jsonl" \
               2>&1 | tee "$OUT/bench-$run.log" | grep -E "efficiency [0-9]|Error"; done ;;
    profile) python3 benchmarks/profile_decode.py --config "$CONFIG" --batch 256 --context 1024 > "$OUT/profile-256.log" 2>&1
             python3 benchmarks/profile_decode.py --config "$CONFIG" --batch 32 --context 1024 > "$OUT/profile-32.log" 2>&1
             grep -E "^decode step|^synchronous" "$OUT"/profile-*.log
             for kv in auto fp8; do
               steps steps-$kv --kv-cache-dtype $kv && grep -v Warning "$OUT/steps-$kv.log" | head -40
             done ;;
    first) steps first --first-times && grep -v Warning "$OUT/first.log" | sed -n '2,4p;/^steps that/,$p' | head -30 ;;
    stall) steps sync --sync-check && sed -n '/^host syncs/,/^total/p' "$OUT/sync.log" | head -18
           steps trace --trace-steps 5,6 && grep -v Warning "$OUT/trace.log" | sed -n '/^prefill steps/p;/^step [0-9]/,$p' \
             | grep -v -E "^-+$" | cut -c1-150 | head -75 ;;
    pad) for i in 1 2; do for kv in auto fp8; do for mode in padded own; do
           [ $kv = fp8 ] && [ $i = 2 ] && continue
           steps pad-$kv-$mode-$i --kv-cache-dtype $kv $([ $mode = own ] && echo --no-logit-padding) \
             && grep -E '^total|^prefill steps \(gpu|^idle in total' "$OUT/pad-$kv-$mode-$i.log" | sed "s/^/$kv $mode: /"
         done; done; done ;;
    blas) for lt in 0 1; do
            TORCH_BLAS_PREFER_CUBLASLT=$lt timeout 120 python3 benchmarks/gemm_layouts.py --ms 64,128,256 \
              --shapes qkv,o,gate_up,down > "$OUT/layouts-lt$lt.log" 2>&1
            echo "== gemm_layouts, cuBLASLt preferred: $lt"; grep -v Warning "$OUT/layouts-lt$lt.log" | head -30
          done
          for i in 1 2; do for lt in 0 1; do
            TORCH_BLAS_PREFER_CUBLASLT=$lt steps blas-lt$lt-$i \
              && grep -E '^total' "$OUT/blas-lt$lt-$i.log" | sed "s/^/cuBLASLt $lt: /"
          done; done ;;
    shapes) timeout 300 python3 benchmarks/elementwise_shapes.py --json "$OUT/shapes.json" > "$OUT/shapes.log" 2>&1
            grep -v Warning "$OUT/shapes.log" ;;
    prefill) timeout 200 python3 benchmarks/prefill_tiles.py --json "$OUT/prefill_tiles.json" > "$OUT/prefill_tiles.log" 2>&1
             grep -v Warning "$OUT/prefill_tiles.log" ;;
    chain) timeout 300 python3 benchmarks/persistent_chain.py --json "$OUT/chain.json" > "$OUT/chain.log" 2>&1
           grep -v Warning "$OUT/chain.log" | tail -60 ;;
    flash) bash .flash-attn/build.sh .flash-attn/flash-attn-src.tgz 2>&1 | tail -3; export PYTHONPATH=/tmp/flash-attn:$PYTHONPATH ;;
    tests) python3 -m pytest -q tests/backends -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -4 ;;
    # the GPU tests took 453 s in round twenty-three (most of it Triton compiling): in two calls, the kernel files
    # (test_cuda_kernels.py, test_cuda_fp8_kernels.py) in one and the rest in the other
    tests-kernels) python3 -m pytest -q tests/backends/test_cuda_kernels.py tests/backends/test_cuda_fp8_kernels.py \
                     -p no:cacheprovider 2>&1 | tee "$OUT/tests-kernels.log" | tail -4 ;;
    tests-rest) python3 -m pytest -q tests/backends --ignore=tests/backends/test_cuda_kernels.py \
                  --ignore=tests/backends/test_cuda_fp8_kernels.py -p no:cacheprovider 2>&1 \
                  | tee "$OUT/tests-rest.log" | tail -4 ;;
    recheck) python3 -m pytest -q -p no:cacheprovider tests/backends/test_parity_matrix.py \
               tests/backends/test_cuda_linear.py -k "cuda or cublas" 2>&1 | tee "$OUT/recheck.log" | tail -4 ;;
    kernels) python3 benchmarks/kernels_cuda.py --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; tail -40 "$OUT/kernels.log" ;;
  esac
done
