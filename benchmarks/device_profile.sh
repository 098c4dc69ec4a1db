#!/usr/bin/env bash
# Where a seed run's time goes on the defaults (#18): step buckets for both KV dtypes (prefill time, decode steps by
# batch, the GPU's idle time before each: host-bound or not), the steps that compiled or allocated something, and
# one batch-256 decode step's kernels. Logs to $OUT.
# Here first: mkdir -p .wt-models/qwen3-0.6b && cp ../shared/models/qwen3-0.6b/config.json .wt-models/qwen3-0.6b/
# Then on the device (carry .wt-models): bash benchmarks/device_profile.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD NANOVLLM_LOG_LEVEL=WARNING PYTHONUNBUFFERED=1
CONFIG=$PWD/.wt-models/qwen3-0.6b/config.json
for kv in auto fp8; do
  timeout 100 python3 benchmarks/profile_steps.py --config "$CONFIG" --kv-cache-dtype $kv > "$OUT/steps-$kv.log" 2>&1
  echo "== steps $kv rc $? [$(( $(date +%s) - T0 )) s]"; grep -v Warning "$OUT/steps-$kv.log" | head -40
done
# round seventeen: the 7th of 9 prefill steps took ~79 ms (others 23-42) in both KV dtypes; name what it compiled
timeout 100 python3 benchmarks/profile_steps.py --config "$CONFIG" --first-times > "$OUT/steps-first.log" 2>&1
echo "== steps --first-times rc $? [$(( $(date +%s) - T0 )) s]"; grep -v Warning "$OUT/steps-first.log" | sed -n '3p;/^steps that/,$p'
timeout 90 python3 benchmarks/profile_decode.py --config "$CONFIG" --batch 256 --context 1024 > "$OUT/decode.log" 2>&1
echo "== decode 256 x 1k rc $? [$(( $(date +%s) - T0 )) s]"; grep -v Warning "$OUT/decode.log" | head -60
