#!/usr/bin/env bash
# GPU check of the SGLang plugin's start-up probe in SGLang's own engine (one H200, our GPU machine):
# the plugin GPU tier, then next-token logits off / measure / measure-with-plan / fixed kernels on a
# small GPT-OSS model (dummy weights), compared within bf16 tolerance. Logs under $OUT.
#   MOE_DISPATCH_GPU_ENGINE=1 source .gpu-deps/env.sh && bash bench/gpu_runs/plugin_check.sh MODEL_DIR
set -u
MODEL="$1"; OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SGLANG_PLUGINS=moe_dispatch
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -m pytest -q -m gpu tests/test_plugin_gpu.py 2>&1 | tee "$OUT/plugin_gpu.log" | tail -15
FLAGS=(--cuda-graph-max-bs 64 --cuda-graph-max-bs-prefill 2048)
run() {  # name, then env assignments (and optional extra SGLang flags after "--")
  local name="$1"; shift
  local envs=() extra=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ "${1:-}" = "--" ] && shift && extra=("$@")
  echo "=== engine_logits $name ==="
  env "${envs[@]}" python3 -m bench.engine_logits run --model-path "$MODEL" --out "$OUT/$name.pt" --label "$name" \
    -- "${FLAGS[@]}" "${extra[@]}" > "$OUT/$name.log" 2>&1
  echo "rc=$? $(grep -h -E 'adaptive MoE start-up|Capture target (decode|prefill).*end' "$OUT/$name.log" | tr '\n' ' ')"
}
rm -f "$OUT/plan.json"
# Stock with the Triton runner: the same weight layout, hence the same dummy model, as the plugin's modes.
run stock-triton SGLANG_ADAPTIVE_MOE=0 -- --moe-runner-backend triton
run measure SGLANG_ADAPTIVE_MOE=1 SGLANG_ADAPTIVE_MOE_PLAN="$OUT/plan.json"
run plan SGLANG_ADAPTIVE_MOE=1 SGLANG_ADAPTIVE_MOE_PLAN="$OUT/plan.json"
run triton SGLANG_ADAPTIVE_MOE=1 SGLANG_ADAPTIVE_MOE_POLICY=fixed SGLANG_ADAPTIVE_MOE_KERNEL=triton
run triton_kernels SGLANG_ADAPTIVE_MOE=1 SGLANG_ADAPTIVE_MOE_POLICY=fixed SGLANG_ADAPTIVE_MOE_KERNEL=triton_kernels
grep -h -A 60 "adaptive MoE probe" "$OUT/measure.log" | head -70
python3 -m bench.engine_logits compare "$OUT"/{stock-triton,measure,plan,triton,triton_kernels}.pt | tee "$OUT/compare.md"
