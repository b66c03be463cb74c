#!/usr/bin/env bash
# One GPU call for the new candidates: small_batch (GPU tier + probe + a short config sweep) and
# triton_kernels on weight views (GPU test + probe). Each step has its own time limit; logs in $OUT.
#   source .gpu-deps/env.sh && bash bench/gpu_runs/kernels_check.sh
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
step() {  # seconds, name, command...
  local limit="$1" name="$2"; shift 2
  echo "=== $name (limit ${limit}s) ==="; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "rc=$rc in $((SECONDS - t0)) s"; tail -n 25 "$OUT/$name.log"
}
step 160 small_batch_gpu env MOE_DISPATCH_ERROR_TABLE="$OUT/small_batch_errors.jsonl" \
  python3 -m pytest -q -x -m gpu tests/test_small_batch_gpu.py
step 130 small_batch_probe python3 -m bench.small_batch_probe --out "$OUT/small_batch_probe.json"
step 80 tk_views_gpu python3 -m pytest -q -m gpu tests/test_triton_kernels_views_gpu.py
step 80 tk_views_probe python3 -m bench.tk_views_probe --out "$OUT" --rounds 2
step 90 small_batch_sweep python3 -m bench.small_batch_probe --configs --presets gpt-oss-120b:8 \
  --tokens 1,8 --time-budget 60 --out "$OUT/small_batch_sweep.json"
