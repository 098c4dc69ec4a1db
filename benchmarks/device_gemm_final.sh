#!/usr/bin/env bash
# The last device call of the GEMM round (#18): the seed benchmark on the checkout's main (repo root) and on a
# branch copy in a sub-folder, in the same call, then the branch's GEMM tests and decode-step profiles, in
# order of importance, each skipped when the time left (default 110 s) is too short.
# Run from the repo root: `bash SUB/benchmarks/device_gemm_final.sh SUB [seconds] [sweep args...]`.
set -uo pipefail
SUB=$1; END=$(( $(date +%s) + ${2:-110} )); shift 2 || shift $#; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $(( END - $(date +%s) )); }
export PYTHONUNBUFFERED=1 NANOVLLM_LOG_LEVEL=WARNING
ROOT=$PWD; C=$ROOT/$SUB/.wt-models/qwen3-0.6b/config.json
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
bench() { timeout "$(left)" python3 -m nanovllm.cli bench --backend cuda --config "$C" --no-progress \
          --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/bench.log" | grep -E "efficiency [0-9]|Error"; }
echo "== main $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"; PYTHONPATH=$ROOT bench
cd "$SUB"; export PYTHONPATH=$PWD
echo "== branch"; bench
echo "tests with $(left)s left"
[ "$(left)" -gt 25 ] && timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider \
    tests/backends/test_cuda_linear.py 2>&1 | tee "$OUT/tests.log" | tail -3
for b in 1 256; do
  [ "$(left)" -gt 30 ] || break
  timeout $(( $(left) - 2 )) python3 benchmarks/profile_decode.py --config "$C" --batch $b --steps 10 \
      > "$OUT/profile-$b.log" 2>&1
  grep -hE "^decode step|^synchronous" "$OUT/profile-$b.log"
  grep -E "^ +[A-Za-z_]" "$OUT/profile-$b.log" | grep -v "Name  " | head -14 | cut -c1-60,159-200
  grep "Self CUDA time total" "$OUT/profile-$b.log"
done
if [ "$#" -gt 0 ] && [ "$(left)" -gt 40 ]; then
  timeout $(( $(left) - 2 )) python3 benchmarks/gemm_sweep.py --out "$OUT/gemm_sweep2.json" "$@" 2>&1 \
      | tee "$OUT/sweep2.log" | grep -v "^  "
fi
echo "done with $(left)s left"
exit 0
