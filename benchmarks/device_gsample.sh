#!/usr/bin/env bash
# The sampler inside the decode graph (branch gsample) against its branch point, both trees in one device call.
# From the branch copy: `bash benchmarks/device_gsample.sh BASE_DIR STEPS`, STEPS a comma list, in order, of tests,
# ops (the sampler op alone), profile256 / profile32 (decode step profiles), bench (the seed benchmark, each tree).
set -uo pipefail
BASE=$(cd "$1" && pwd); STEPS=$2; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NANOVLLM_LOG_LEVEL=WARNING
BR=$PWD; C=$BR/.wt-models/qwen3-0.6b/config.json
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
in_tree() { local dir=$1; shift; (cd "$dir" && PYTHONPATH=$dir "$@"); }
both() { for t in base branch; do local d=$BASE; [ $t = branch ] && d=$BR; echo "== $t"; in_tree "$d" "$@"; done; }
for step in ${STEPS//,/ }; do case $step in
  tests) timeout 110 python3 -m pytest -q -p no:cacheprovider tests/backends/test_cuda_e2e.py \
           tests/backends/test_cuda_kernels.py tests/backends/test_parity_matrix.py -k "sampler or test_cuda_e2e" \
           2>&1 | tee "$OUT/tests.log" | tail -8 ;;
  graphtests) timeout 60 python3 -m pytest -q -p no:cacheprovider tests/backends/test_cuda_e2e.py \
           -k "plain_decode or 16-graphs or compiled" 2>&1 | tee "$OUT/tests.log" | tail -3 ;;
  ops) both timeout 40 python3 benchmarks/bench_ops.py --sampler 2>&1 | grep -E "^==|sampler|Error" ;;
  profile*) b=${step#profile}
    for t in base branch; do d=$BASE; [ $t = branch ] && d=$BR
      in_tree "$d" timeout 45 python3 benchmarks/profile_decode.py --config "$C" --batch "$b" > "$OUT/profile-$t-$b.log" 2>&1
      echo "== $t batch $b"
      grep -E "^decode step|^synchronous|^sampler kernels|Self CUDA time total|_slice|_pick|randint|distribution|Error" \
        "$OUT/profile-$t-$b.log" | cut -c1-150
    done ;;
  bench) both timeout 50 python3 -m nanovllm.cli bench --backend cuda --config "$C" --no-progress 2>&1 \
           | grep -E "^==|efficiency|tokens/s|Error" ;;
esac; done
exit 0
