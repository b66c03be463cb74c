"""FlashInfer's fused MoE on the GPU machine: JIT build time, correctness, graph-replay timings.

    python -m bench.flashinfer_probe --out DIR [--jit-budget 420] [--tp 8,2]
        [--batch-sizes 1,8,64,256,1024,4096] [--kernels flashinfer_cutlass,triton,triton_kernels]

Run it through bench/flashinfer_gpu.sh, which sets up the environment (this script installs
nothing). Safe under `timeout`: each result is printed as it comes and DIR/flashinfer_probe.json
and .md are rewritten after each, so a killed run leaves what it measured.

1. environment: GPU, versions, JIT cache folder, the DLPack exchange tvm-ffi's allocator needs.
2. JIT: FlashInfer builds its CUTLASS MoE module (TensorRT-LLM's kernels) with ninja at the first
   call: on SM90 the backend's choice, the bf16-only `fused_moe_90_bf16` (32 translation units,
   moe_dispatch.backends.flashinfer_slim) unless the full `fused_moe_90` (~180) is built or
   MOE_DISPATCH_FLASHINFER_MODULE=full. Here ninja runs on that module's own build file with a
   budget (--jit-budget): stopped early, it keeps its finished objects in the JIT cache and the
   next run resumes. Each run's build seconds are appended to <cache>/moe_dispatch_jit_times.json
   so the total compile time across runs is known. Then the module is loaded as FlashInfer does.
3. correctness: flashinfer_cutlass (autotuned and not) against the torch reference, small cases.
4. per GPT-OSS-120B shard (tp): each kernel prepared once (prepare + autotune seconds, extra
   bytes); per batch size: capture one graph per kernel (graphs.capture), time its replays
   (graphs.timing.time_replays), check the replay's output against the reference, floor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.flashinfer_jit import jit_build
from bench.roofline import Ceilings, floor, measure_ceilings, touched_experts
from graphs import capture, time_replays
from moe_dispatch import ExpertWeights, get_backend, preset, random_inputs, reference_moe, route
from moe_dispatch.backends.flashinfer_moe import FlashInferCutlassBackend, flashinfer_version
from moe_dispatch.spec import GPT_OSS_SWIGLU, SILU, MoESpec, Routing
from moe_dispatch.testing import TOLERANCES, error_stats

KERNELS = ("flashinfer_cutlass", "triton", "triton_kernels")


def say(line: str) -> None:
    print(line, flush=True)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


class Report:
    """The probe's findings so far, rewritten to DIR after every addition."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {
            "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        self.lines: list[str] = ["# FlashInfer fused-MoE probe", ""]

    def add(self, key: str, value: object, md: list[str] | None = None) -> None:
        self.data[key] = value
        self.lines += md or []
        self.flush()

    def flush(self) -> None:
        for name, text in (
            ("flashinfer_probe.json", json.dumps(self.data, indent=1, default=str)),
            ("flashinfer_probe.md", "\n".join(self.lines) + "\n"),
        ):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def environment() -> dict:
    from bench.results import versions

    props = torch.cuda.get_device_properties(0)
    env = {
        k: os.environ.get(k)
        for k in (
            "FLASHINFER_WORKSPACE_BASE",
            "FLASHINFER_CUDA_ARCH_LIST",
            "MAX_JOBS",
            "CUDA_HOME",
            "FLASHINFER_EXTRA_CUDAFLAGS",
            "FLASHINFER_EXTRA_LDFLAGS",
        )
    }
    return {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "cpus": os.cpu_count(),
        "versions": {**versions(), "flashinfer": str(flashinfer_version())},
        "torch_dlpack_c_exchange_api": hasattr(torch.Tensor, "__dlpack_c_exchange_api__"),
        "env": env,
    }


# ---- 3. correctness ----


def small_spec(top_k: int, swiglu: bool, bias: bool) -> MoESpec:
    return MoESpec(
        16,
        top_k,
        256,
        192,
        GPT_OSS_SWIGLU if swiglu else SILU,
        bias,
        routing=Routing.TOPK_SOFTMAX if swiglu else Routing.SOFTMAX_TOPK_RENORM,
        name="probe",
    )


def correctness(report: Report) -> list[dict]:
    rows = []
    cases = [
        (37, small_spec(4, True, True)),
        (129, small_spec(2, False, False)),
        (1, small_spec(8, True, False)),
        (64, preset("gpt-oss-120b", tp=8)),
    ]
    # autotuned once, on the real shard shape: the timing phase then finds its tactics cached
    for autotune, (T, spec) in [(False, c) for c in cases] + [(True, cases[-1])]:
        backend = FlashInferCutlassBackend(autotune=autotune)
        weights = ExpertWeights.random(spec, device="cuda", seed=T)
        x, logits = random_inputs(spec, T, device="cuda", seed=T + 1)
        t0 = time.perf_counter()
        try:
            kernel = backend.prepare(spec, weights)
            prep = time.perf_counter() - t0
            stats = error_stats(kernel(x, logits), reference_moe(spec, weights, x, logits))
        except Exception as error:  # recorded, and the probe goes on to the other kernels' timings
            rows.append(
                {"spec": spec.describe(), "T": T, "autotune": autotune, "error": f"{type(error).__name__}: {error}"}
            )
            say(f"[check] ERROR autotune={autotune} T={T} {spec.describe()}: {rows[-1]['error']}")
            traceback.print_exc()
            continue
        ok = stats.within(TOLERANCES[spec.dtype])
        row = {
            "spec": spec.describe(),
            "T": T,
            "autotune": autotune,
            "router": kernel.router,
            "ok": ok,
            "rms": stats.rms,
            "max": stats.max,
            "prepare_s": round(prep, 2),
            "tune_s": kernel.tune_seconds,
        }
        rows.append(row)
        say(
            f"[check] {'OK  ' if ok else 'FAIL'} autotune={autotune} T={T} {spec.describe()}: "
            f"{stats.describe()} prepare {prep:.1f} s"
        )
    report.add(
        "correctness",
        rows,
        [
            "## Correctness (vs fp32 torch reference)",
            "",
            "| spec | T | autotune | router | ok | rms | max | prepare s |",
            "| --- | --: | --- | --- | --- | --: | --: | --: |",
        ]
        + [
            f"| {r['spec']} | {r['T']} | {r['autotune']} | {r['router']} | {r['ok']} | {r['rms']:.2e} | "
            f"{r['max']:.2e} | {r['prepare_s']} |"
            if "error" not in r
            else f"| {r['spec']} | {r['T']} | {r['autotune']} | - | ERROR: {r['error'][:200]} | | | |"
            for r in rows
        ]
        + [""],
    )
    return rows


# ---- 4. timings ----


def _cell(k: dict) -> str:
    if "error" in k:
        return "error"
    return f"{k['median_us']:.1f} ({k['p20_us']:.1f}-{k['p80_us']:.1f}){'' if k['ok'] else ' WRONG'}"


def time_shard(
    report: Report,
    tp: int,
    sizes: tuple[int, ...],
    names: tuple[str, ...],
    ceilings: Ceilings,
    replays: int,
    autotune: bool,
) -> None:
    spec = preset("gpt-oss-120b", tp=tp)
    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    kernels, prepare = {}, {}
    for name in names:
        backend = FlashInferCutlassBackend(autotune=autotune) if name == "flashinfer_cutlass" else get_backend(name)
        answer = backend.availability() and backend.supports(spec)
        if not answer:
            say(f"[tp={tp}] {name} skipped: {answer.reason}")
            continue
        t0 = time.perf_counter()
        try:
            kernels[name] = backend.prepare(spec, weights)
        except Exception as error:
            say(f"[tp={tp}] {name} failed to prepare: {type(error).__name__}: {error}")
            traceback.print_exc()
            continue
        prepare[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "extra_bytes": kernels[name].extra_bytes,
            "tune_s": getattr(kernels[name], "tune_seconds", None),
        }
        tuned = f", autotune {prepare[name]['tune_s']:.1f} s" if prepare[name]["tune_s"] else ""
        extra_mib = kernels[name].extra_bytes / 2**20
        say(f"[tp={tp}] {name} prepared in {prepare[name]['seconds']} s, extra {extra_mib:.0f} MiB{tuned}")
    cols = list(kernels)
    md = [
        f"## {spec.describe()}",
        "",
        f"prepare: {json.dumps(prepare)}",
        "",
        "| T | touched | "
        + " | ".join(f"{n} us" for n in cols)
        + " | winner | floor us | "
        + " | ".join(f"{n}/floor" for n in cols)
        + " |",
        "| --: | --: | " + " | ".join("---" for _ in cols) + " | --- | --: | " + " | ".join("--:" for _ in cols) + " |",
    ]
    shard = {"spec": spec.to_json(), "tp": tp, "prepare": prepare, "rows": []}
    key = f"tp{tp}"
    for line in md:
        say(f"[tp={tp}] {line}")
    report.add(key, shard, md)
    stream = torch.cuda.Stream()
    for T in sizes:
        x, logits = random_inputs(spec, T, device="cuda", seed=T)
        ref = reference_moe(spec, weights, x, logits)
        touched = touched_experts(route(logits, spec.top_k, spec.routing)[1])
        fl = floor(spec, T, touched, ceilings)
        row: dict = {"T": T, "touched": touched, "floor_us": fl.seconds * 1e6, "bound": fl.bound, "kernels": {}}
        for name, kernel in kernels.items():
            try:
                captured = capture(kernel, [x, logits], torch.cuda.graph_pool_handle(), stream)
                stats = time_replays(captured.graph, warmup=10, replays=replays)
                err = error_stats(captured.output, ref)
                row["kernels"][name] = {
                    "median_us": stats.median_ms * 1e3,
                    "p20_us": stats.p20_ms * 1e3,
                    "p80_us": stats.p80_ms * 1e3,
                    "ok": err.within(TOLERANCES[spec.dtype]),
                    "rms": err.rms,
                }
                del captured
            except Exception as error:  # one kernel failing must not stop the others
                row["kernels"][name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        timed = {n: k["median_us"] for n, k in row["kernels"].items() if "median_us" in k and k["ok"]}
        row["winner"] = min(timed, key=timed.get) if timed else None
        shard["rows"].append(row)
        ratio = [f"{timed[n] / row['floor_us']:.2f}x" if n in timed else "-" for n in cols]
        line = (
            f"| {T} | {touched} | " + " | ".join(_cell(row["kernels"][n]) for n in cols) + f" | {row['winner']} | "
            f"{row['floor_us']:.1f} {'mem' if fl.bound == 'memory' else 'flop'} | " + " | ".join(ratio) + " |"
        )
        say(f"[tp={tp}] {line}")
        for name, k in row["kernels"].items():
            if "error" in k:
                say(f"[tp={tp}] T={T} {name}: {k['error']}")
        report.add(key, shard, [line])
    report.lines.append("")
    del kernels
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jit-budget", type=float, default=420.0, help="seconds of ninja in this run")
    parser.add_argument("--tp", type=ints, default=(8, 2))
    parser.add_argument("--batch-sizes", type=ints, default=(1, 8, 64, 256, 1024, 4096))
    parser.add_argument("--kernels", type=lambda s: tuple(s.split(",")), default=KERNELS)
    parser.add_argument("--replays", type=int, default=100)
    parser.add_argument("--no-autotune", action="store_true", help="time flashinfer_cutlass's heuristic tactic")
    parser.add_argument("--jit-only", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        say("no CUDA GPU: nothing to probe")
        return 1
    report = Report(args.out)
    env = environment()
    say(f"[env] {json.dumps(env)}")
    report.add(
        "environment",
        env,
        [
            f"- GPU: {env['gpu']} ({env['capability']}), {env['cpus']} CPUs",
            f"- versions: {env['versions']}",
            f"- env: {env['env']}",
            "",
        ],
    )
    answer = get_backend("flashinfer_cutlass").availability()
    if not answer:
        say(f"[env] flashinfer_cutlass unavailable: {answer.reason}")
        report.add("unavailable", answer.reason)
        return 2
    try:
        jit = jit_build(args.jit_budget)
    except Exception as error:
        report.add("jit", {"error": f"{type(error).__name__}: {error}"})
        raise
    report.add("jit", jit, [f"JIT: {json.dumps(jit)}", ""])
    if "load_s" not in jit:
        return 3  # build stopped at the budget: run again to resume
    if args.jit_only:
        return 0
    correctness(report)
    ceilings = measure_ceilings("cuda")
    say(f"[ceilings] {ceilings.hbm_bytes_per_s / 1e12:.2f} TB/s, {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s")
    report.add("ceilings", {"hbm_bytes_per_s": ceilings.hbm_bytes_per_s, "bf16_flops_per_s": ceilings.bf16_flops_per_s})
    for tp in args.tp:
        time_shard(report, tp, args.batch_sizes, args.kernels, ceilings, args.replays, not args.no_autotune)
    say(f"[done] {args.out / 'flashinfer_probe.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
