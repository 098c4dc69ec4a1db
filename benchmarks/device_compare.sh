#!/usr/bin/env bash
# One device call: the checkout's main (the repo root) against a branch copied into a sub-folder, in the same
# call so that ratios hold. Run from the repo root: `bash SUB/benchmarks/device_compare.sh SUB [seconds]`.
# Steps run in order of importance and are skipped when the time left (default 560 s) is too short.
set -uo pipefail
SUB=$1; END=$(( $(date +%s) + ${2:-560} )); OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
left() { echo $(( END - $(date +%s) )); }
export PYTHONUNBUFFERED=1
ROOT=$PWD; C=$ROOT/$SUB/shared-models/qwen3-0.6b/config.json
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
bench() { python3 -m nanovllm.cli bench --backend cuda --config "$C" --no-progress --json "$OUT/bench.jsonl" 2>&1 \
          | tee -a "$OUT/bench.log" | grep -E "efficiency [0-9]|Error"; }
echo "== main"; PYTHONPATH=$ROOT bench
cd "$SUB"; export PYTHONPATH=$PWD
echo "== branch"; bench
python3 benchmarks/profile_decode.py --config "$C" --batch 256 > "$OUT/profile-256.log" 2>&1
python3 benchmarks/profile_steps.py --config "$C" 2>&1 | grep -v "^INFO\|WARN\|kernel\|skipped\|->" > "$OUT/steps.log"
cat "$OUT/steps.log"
[ "$(left)" -gt 300 ] && python3 benchmarks/profile_decode.py --config "$C" --batch 32 > "$OUT/profile-32.log" 2>&1
grep -hE "^decode step|^synchronous" "$OUT"/profile-*.log
[ "$(left)" -gt 280 ] && python3 benchmarks/bench_ops.py --sampler 2>&1 | grep "sampler batch"
if [ "$(left)" -gt 230 ] && [ -f .flash-attn/build.sh ]; then
  bash .flash-attn/build.sh .flash-attn/flash-attn-src.tgz > "$OUT/flash.log" 2>&1; tail -2 "$OUT/flash.log"
  echo "== branch with flash-attn installed"; PYTHONPATH=/tmp/flash-attn:$PYTHONPATH bench
  export PYTHONPATH=/tmp/flash-attn:$PYTHONPATH
fi
T=$(( $(left) - 10 )); echo "tests with ${T}s left"
[ "$T" -gt 30 ] && timeout "$T" python3 -m pytest -q tests/backends -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -6
exit 0
