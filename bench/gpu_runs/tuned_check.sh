#!/usr/bin/env bash
# GPU calls for the tuned Triton candidate (one 10-minute call each; logs and results in $OUT, few files:
# the device returns only a handful, so folders are packed into tarballs).
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh tests
#       GPU tiers of graphs (timing), small_batch (incl. PDL) and the plugin (incl. triton_tuned and
#       small_batch in the layer hooks); a narrow small_batch config sweep; the small_batch probe
#   MOE_DISPATCH_GPU_ENGINE=1 source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh engine
#       the triton_kernels views tier and the engine logits test
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh tune PRESET TP BUCKETS SECONDS
#       e.g. tune gpt-oss-120b 2 1,8,32,128,1024 420: tune (resuming from $STATE if carried), then
#       `make bench` for those buckets with every candidate side by side
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh tkprobe PRESET TP TOKENS SECONDS
#       bench.tk_flags_probe (triton_kernels' own opt flags vs variants per matmul), 8 compile workers;
#       its TkFlagsTable goes into $OUT/tuned (a copy of the shipped tables, so buckets merge)
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh tktests
#       the GPU tiers of triton_tuned, tk_combine, tk_routing, triton_kernels_tuned and the plugin
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh measure
#       the graphs, adaptive and plugin GPU tiers (the capture-and-time path), then `make bench` tp=2
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh flashinfer [SO]
#       FlashInfer's bf16 SM90 MoE module: place SO (a build from .fi-prebuilt) or build it with every
#       core, then the flashinfer GPU tier and bench/flashinfer_probe.py (carry .whl and .fi-prebuilt)
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh routing TOKENS
#       tk_routing's GPU tier, then a breakdown of triton_kernels against triton_kernels_tuned
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh breakdown TP TOKENS KERNELS
#       bench.kernel_breakdown: GPT-OSS device time per kernel of each candidate's call
#   source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh bench PRESET TP BUCKETS SECONDS
#       `make bench` with every candidate, the tables in $TUNED (default: the shipped ones)
#   MOE_DISPATCH_GPU_ENGINE=1 source .gpu-deps/env.sh && bash bench/gpu_runs/tuned_check.sh serving [MODEL [MODES [S]]]
#       the serving benchmark, by default with modes off, measure and extra (--adaptive-moe-extra-kernels
#       triton_tuned,triton_kernels_tuned,small_batch)
set -u
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
STATE="${STATE:-bench/results/tune-state.jsonl}"  # in the tree, so a later call can carry it back in
step() {  # seconds, name, command...
  local limit="$1" name="$2"; shift 2
  echo "=== $name (limit ${limit}s) ==="; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "rc=$rc in $((SECONDS - t0)) s"; tail -n 12 "$OUT/$name.log"
}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
case "${1:-}" in
  tests)  # graphs (timing), small_batch (incl. PDL), plugin GPU tiers; then small_batch configs around the best
    step 50 graphs_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_graphs_gpu.py
    step 170 small_batch_gpu env MOE_DISPATCH_ERROR_TABLE="$OUT/small_batch_errors.jsonl" \
      python3 -m pytest -q -p no:logging -m gpu tests/test_small_batch_gpu.py
    step 150 plugin_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_plugin_gpu.py
    step 110 small_batch_sweep python3 -m bench.small_batch_probe --configs --grid narrow \
      --presets gpt-oss-120b:8,gpt-oss-120b:2 --tokens 1,8 --time-budget 90 --out "$OUT/small_batch_sweep.json"
    step 80 small_batch_probe python3 -m bench.small_batch_probe --out "$OUT/small_batch_probe.json"
    ;;
  engine)  # MOE_DISPATCH_GPU_ENGINE=1 before sourcing env.sh: the engine logits test and the views tier
    step 60 tk_views_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_triton_kernels_views_gpu.py
    step 420 engine_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_engine_gpu.py  # 4 engine processes; >170 s
    ;;
  tune)
    preset="$2" tp="$3" buckets="$4" budget="$5"
    mkdir -p "$OUT/tune" "$OUT/tuned" && cp -r moe_dispatch/tuned_data/. "$OUT/tuned/"  # new buckets merge in
    step $((budget + 30)) tune python3 -m bench.tune --preset "$preset" --tp "$tp" --buckets "$buckets" \
      --time-budget "$budget" --state "$STATE" --out "$OUT/tuned" --report "$OUT/tune/report.md"
    cp "$STATE" "$OUT/tune/state.jsonl" 2>/dev/null
    step 120 bench env MOE_DISPATCH_TUNED_DIR="$OUT/tuned" python3 -m bench --preset "$preset" --tp "$tp" \
      --batch-sizes "$buckets" --out "$OUT/bench" --no-plot
    tar czf "$OUT/tuned.tgz" -C "$OUT" tuned tune bench && rm -rf "$OUT/tuned" "$OUT/tune" "$OUT/bench"
    ;;
  tkprobe)
    mkdir -p "$OUT/tuned" && cp -r moe_dispatch/tuned_data/. "$OUT/tuned/"
    step "$5" tk_flags_probe python3 -m bench.tk_flags_probe --preset "$2" --tp "$3" --tokens "$4" --workers 8 \
      --out "$OUT/tk_flags" --tables "$OUT/tuned"
    tar czf "$OUT/tk_flags.tgz" -C "$OUT" tk_flags tuned tk_flags_probe.log && rm -rf "$OUT/tk_flags"
    ;;
  tktests)  # both tuned backends and the plugin's layer hooks (incl. its extra candidates)
    step 90 tuned_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_tuned_gpu.py
    step 90 tk_combine_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_tk_combine_gpu.py
    step 360 tk_routing_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_tk_routing_gpu.py  # 240-360 s on a fresh H200 (cold Triton cache)
    step 300 tk_tuned_gpu env MOE_DISPATCH_ERROR_TABLE="$OUT/tk_tuned_errors.jsonl" \
      python3 -m pytest -q -p no:logging -m gpu tests/test_tk_tuned_gpu.py  # 200+ s on the H200 (82 tests)
    step 170 plugin_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_plugin_gpu.py
    ;;
  measure)  # the capture-and-time path (graphs.measure): its tiers, then make bench at tp=2 for the regret column
    step 60 graphs_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_graphs_gpu.py
    step 120 adaptive_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_adaptive_gpu.py
    step 170 plugin_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_plugin_gpu.py
    step 150 bench python3 -m bench --preset gpt-oss-120b --tp 2 --batch-sizes 8,64,256,1024,2048,4096 \
      --out "$OUT/bench" --no-plot
    tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
    ;;
  flashinfer)  # the wheel goes into .fi-cache/site; the library where FlashInfer loads it without building
    source bench/flashinfer_gpu.sh --env-only || exit 1
    if [ -n "${2:-}" ]; then
      step 60 fi_place python3 -m moe_dispatch.backends.flashinfer_slim --prebuilt "$2"
    fi
    step 420 fi_build python3 -m moe_dispatch.backends.flashinfer_slim --jobs "$(nproc)" --check  # a no-op when placed
    step 200 flashinfer_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_flashinfer_gpu.py
    step 300 fi_probe python3 -m bench.flashinfer_probe --out "$OUT/fi" --jit-budget 60
    tar czf "$OUT/fi.tgz" -C "$OUT" fi && rm -rf "$OUT/fi"
    ;;
  routing)
    step 360 tk_routing_gpu python3 -m pytest -q -p no:logging -m gpu tests/test_tk_routing_gpu.py
    step 150 breakdown python3 -m bench.kernel_breakdown --tp 8 --tokens "$2" \
      --kernels triton_kernels,triton_kernels_tuned --out "$OUT/breakdown-routing.md"
    ;;
  breakdown)  # device time per kernel of each candidate's call: breakdown TP TOKENS KERNELS
    step 150 breakdown python3 -m bench.kernel_breakdown --tp "$2" --tokens "$3" --kernels "$4" --out "$OUT/breakdown.md"
    ;;
  bench)
    step "$5" bench env ${TUNED:+MOE_DISPATCH_TUNED_DIR="$TUNED"} python3 -m bench --preset "$2" --tp "$3" \
      --batch-sizes "$4" --out "$OUT/bench" --no-plot
    tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
    ;;
  serving)  # MOE_DISPATCH_GPU_ENGINE=1 before sourcing env.sh; the opt-in candidates in SGLang's engine
    budget="${4:-530}"
    step $((budget + 30)) serving make bench-serving PYTHON=python3 SERVING_ARGS="--models ${2:-gpt-oss-120b:tp8} \
      --modes ${3:-off,measure,extra} --time-budget $budget --out out/serving --results $OUT/results"
    tar czf "$OUT/serving-runs.tgz" -C out/serving runs runs.jsonl session.json 2>/dev/null
    ;;
  *) echo "usage: $0 tests | engine | measure | flashinfer [SO] | tune PRESET TP BUCKETS SECONDS | tkprobe PRESET TP TOKENS SECONDS | tktests | routing TOKENS | breakdown TP TOKENS KERNELS | bench PRESET TP BUCKETS SECONDS | serving [MODEL [MODES [SECONDS]]]" >&2; exit 2 ;;
esac
