"""`python -m bench.small_batch_probe`: `small_batch` against SGLang's Triton fused_moe at decode sizes.

Per model shard (GPT-OSS-120B tp=8 and tp=2, Qwen3-30B-A3B tp=1, Mixtral-8x7B tp=8) and
T in 1..32: each kernel's eager output is checked against the torch reference, one CUDA
graph per kernel is captured (graphs.capture) and its replays timed (graphs.timing,
median and p20-p80), next to the roofline floor (bench.roofline) of the experts touched.
Prints a Markdown table; `--out PATH` writes the rows as JSON with the GPU and versions.

`--configs`: sweep mode. Per shard and T, a coordinate search over `SmallBatchConfig`:
first the gate/up knobs (down knobs from the table), then the down knobs with the best
gate/up, then that pair with and without PDL; prints the best per T, to copy into `launch.CONFIGS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

PRESETS = ("gpt-oss-120b:8", "gpt-oss-120b:2", "qwen3-30b-a3b:1", "mixtral-8x7b:8")
TOKENS = (1, 2, 4, 8, 16, 32)
TARGETS_US = {("gpt-oss-120b", 8, 1): 12.0, ("gpt-oss-120b", 8, 8): 60.0, ("gpt-oss-120b", 2, 1): 35.0}
# Sweep grid: rows, columns and (warps, stages, unroll) of each launch.
LOOPS = ((4, 1, False), (4, 3, False), (8, 2, False), (4, 1, True))
GRIDS = {  # name -> (gate/up knobs, down knobs)
    "full": (
        {"block_n": (2, 4, 8, 16), "block_k": (128, 256, 512), "up": LOOPS},
        {"block_h": (4, 8, 16, 32), "block_i": (64, 128, 256, 512), "down": LOOPS},
    ),
    # around what the full grid found at 1-8 tokens (narrow tiles, short loops unrolled): 8 + 8 points
    "narrow": (
        {"block_n": (2, 4), "block_k": (128, 256), "up": ((4, 3, False), (4, 1, True))},
        {"block_h": (4, 8), "block_i": (128, 256), "down": ((4, 3, False), (4, 1, True))},
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.small_batch_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated name:tp, e.g. gpt-oss-120b:8")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated batch sizes")
    p.add_argument("--baselines", default="triton", help="comma-separated kernels timed beside small_batch")
    p.add_argument("--replays", type=int, default=200, help="timed replays per point (>= 100 for the report)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--configs", action="store_true", help="sweep SmallBatchConfig per T instead of comparing")
    p.add_argument("--sweep-replays", type=int, default=50, help="timed replays per config in --configs mode")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full", help="--configs: the knob grid searched")
    p.add_argument("--time-budget", type=float, default=480, help="--configs: start no new (shard, T) after this (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def untied_inputs(spec, num_tokens: int, seed: int):
    """Tie-free random inputs on the GPU (`moe_dispatch.testing.untied_inputs`)."""
    from moe_dispatch.testing import untied_inputs as untied

    return untied(spec, num_tokens, seed, device="cuda")


def measure(kernel, spec, ref, x, logits, warmup: int, replays: int) -> dict:
    """Eager error vs the reference output `ref`, then one graph captured and its replays timed (us)."""
    from graphs import capture, time_replays
    from moe_dispatch.testing import TOLERANCES, error_stats

    stats = error_stats(kernel(x, logits), ref)
    static = [x.clone(), logits.clone()]
    captured = capture(kernel, static, torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    timing = time_replays(captured.graph, warmup=warmup, replays=replays)
    del captured
    return {
        "median_us": timing.median_ms * 1e3,
        "p20_us": timing.p20_ms * 1e3,
        "p80_us": timing.p80_ms * 1e3,
        "rms": stats.rms,
        "max": stats.max,
        "ok": stats.within(TOLERANCES[spec.dtype]),
    }


def shards(text: str):
    from moe_dispatch import preset

    for item in text.split(","):
        name, _, tp = item.strip().partition(":")
        yield name, int(tp or 1), preset(name, tp=int(tp or 1))


def compare(args, ceilings, say) -> list[dict]:
    from bench.roofline import floor, touched_experts
    from moe_dispatch import ExpertWeights, kernel_support, make_kernel, reference_moe, route
    from moe_dispatch.backends.small_batch.launch import config_for

    rows = []
    for name, tp, spec in shards(args.presets):
        weights = ExpertWeights.random(spec, device="cuda", seed=args.seed)
        kernels = {"small_batch": make_kernel("small_batch", spec, weights)}
        for base in filter(None, args.baselines.split(",")):
            answer = kernel_support(base, spec)
            if answer:
                kernels[base] = make_kernel(base, spec, weights)
            else:
                say(f"[{spec.name}] {base} skipped: {answer.reason}")
        for T in args.tokens:
            x, logits = untied_inputs(spec, T, seed=args.seed + T)
            ref = reference_moe(spec, weights, x, logits)
            touched = touched_experts(route(logits, spec.top_k, spec.routing)[1])
            fl = floor(spec, T, touched, ceilings)
            row = {"preset": name, "tp": tp, "spec": spec.to_json(), "T": T, "touched": touched}
            row.update(floor_us=fl.seconds * 1e6, floor_bound=fl.bound, floor_bytes=fl.bytes)
            row["config"] = config_for(T).describe()
            row["target_us"] = TARGETS_US.get((name, tp, T))
            for kname, kernel in kernels.items():
                try:
                    row[kname] = measure(kernel, spec, ref, x, logits, args.warmup, args.replays)
                except Exception as error:  # one kernel failing must not end the probe
                    row[kname] = {"error": f"{type(error).__name__}: {error}"}
            rows.append(row)
            say(f"[{spec.name}] T={T}: " + ", ".join(f"{k}={_cell(row[k])}" for k in kernels))
        del kernels, weights
        torch.cuda.empty_cache()
    return rows


def _cell(result: dict) -> str:
    if "error" in result:
        return "error"
    return f"{result['median_us']:.1f}" + ("" if result["ok"] else " WRONG")


def compare_table(rows: list[dict], baselines: list[str]) -> str:
    head = ["model", "T", "touched", "floor us", "small_batch us", *[f"{b} us" for b in baselines]]
    head += ["small/floor", *[f"{b}/floor" for b in baselines], "small GB/s", "small rms / max err", "target us"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        small = r["small_batch"]
        ok = "error" not in small
        times = [_cell(small)] + [_cell(r[b]) if b in r else "-" for b in baselines]
        ratios = [
            f"{r[k]['median_us'] / r['floor_us']:.2f}x" if k in r and "error" not in r[k] else "-"
            for k in ["small_batch", *baselines]
        ]
        gbs = f"{r['floor_bytes'] / (small['median_us'] * 1e-6) / 1e9:.0f}" if ok else "-"
        err = f"{small['rms']:.1e} / {small['max']:.1e}" if ok else small["error"][:60]
        target = "-"
        if r["target_us"] is not None:
            target = f"{r['target_us']:g} " + ("met" if ok and small["median_us"] <= r["target_us"] else "MISSED")
        cells = [
            f"{r['preset']} tp={r['tp']}",
            str(r["T"]),
            str(r["touched"]),
            f"{r['floor_us']:.1f} {r['floor_bound'][:3]}",
        ]
        lines.append("| " + " | ".join(cells + times + ratios + [gbs, err, target]) + " |")
    return "\n".join(lines)


def _candidates(base, knobs: dict, prefix: str):
    """Configs varying the knobs of one launch around `base`; skips tiles too big for registers."""
    (rows_name, rows), (cols_name, cols), (_, launch) = knobs.items()
    accumulators = 2 if prefix == "up" else 1
    for r in rows:
        for c in cols:
            for warps, stages, unroll in launch:
                if accumulators * r * c > 64 * 32 * warps:  # > 64 fp32 accumulator registers a thread
                    continue
                fields = {rows_name: r, cols_name: c, f"{prefix}_warps": warps, f"{prefix}_stages": stages}
                fields[f"{prefix}_unroll"] = unroll
                yield dataclasses.replace(base, **fields)


def sweep_one(spec, weights, label: dict, T: int, args, say) -> list[dict]:
    """Coordinate search at one (shard, T): gate/up knobs, then down knobs. Every point tried, then the best."""
    from moe_dispatch import reference_moe
    from moe_dispatch.backends.small_batch.backend import SmallBatchBackend
    from moe_dispatch.backends.small_batch.launch import config_for

    x, logits = untied_inputs(spec, T, seed=args.seed + T)
    ref = reference_moe(spec, weights, x, logits)
    tried: dict[str, dict] = {}

    def run(config) -> float:
        key = config.describe()
        if key not in tried:
            kernel = SmallBatchBackend(config).prepare(spec, weights)
            try:
                tried[key] = measure(kernel, spec, ref, x, logits, 5, args.sweep_replays)
            except Exception as error:  # a config the compiler or the GPU refuses
                tried[key] = {"error": f"{type(error).__name__}: {error}"}
            tried[key].update(label, T=T, config=dataclasses.asdict(config))
        result = tried[key]
        return result["median_us"] if "error" not in result and result["ok"] else float("inf")

    default = config_for(T)
    table_us = run(default) if math.isfinite(run(default)) else None
    up_knobs, down_knobs = GRIDS[args.grid]
    best = min(_candidates(default, up_knobs, "up"), key=run)
    best = min(_candidates(best, down_knobs, "down"), key=run)
    best = min((best, dataclasses.replace(best, pdl=not best.pdl)), key=run)  # with and without PDL
    say(
        f"[{spec.name}] T={T}: table {default.describe()} {table_us:.1f} us -> "
        f"best {best.describe()} {run(best):.1f} us ({len(tried)} configs)"
    )
    best_us = run(best) if math.isfinite(run(best)) else None  # None: no config ran correctly
    summary = dict(label, T=T, best=dataclasses.asdict(best), best_us=best_us, table_us=table_us)
    return [*tried.values(), summary]


def sweep_table(summaries: list[dict]) -> str:
    """Markdown: per (shard, T) the table's config and time, and the best config found (as code)."""
    from moe_dispatch.backends.small_batch.launch import SmallBatchConfig, config_for

    lines = ["| model | T | table config | table us | best config | best us |", "|---|---|---|---|---|---|"]
    for p in summaries:
        best = SmallBatchConfig(**p["best"])
        best_us = f"{p['best_us']:.1f}" if p["best_us"] is not None else "none ran correctly"
        table_us = f"{p['table_us']:.1f}" if p["table_us"] is not None else "failed"
        cells = [f"{p['preset']} tp={p['tp']}", str(p["T"]), config_for(p["T"]).describe(), table_us]
        lines.append("| " + " | ".join([*cells, f"{best.describe()} `{best}`", best_us]) + " |")
    return "\n".join(lines)


def sweep(args, say) -> list[dict]:
    from moe_dispatch import ExpertWeights

    points: list[dict] = []
    started = time.perf_counter()
    for name, tp, spec in shards(args.presets):
        weights = ExpertWeights.random(spec, device="cuda", seed=args.seed)
        for T in args.tokens:
            if time.perf_counter() - started > args.time_budget:
                say(f"[{spec.name}] T={T}: skipped, past --time-budget {args.time_budget:.0f} s")
                continue
            points.extend(sweep_one(spec, weights, {"preset": name, "tp": tp}, T, args, say))
        del weights
        torch.cuda.empty_cache()
    return points


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        print("small_batch_probe: no CUDA GPU visible; it times CUDA graphs and needs one.", file=sys.stderr)
        return 1
    args = parse_args(argv)
    args.tokens = tuple(int(t) for t in args.tokens.split(","))
    from bench.results import run_meta
    from bench.roofline import measure_ceilings

    start = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {line}", file=sys.stderr, flush=True)

    props = torch.cuda.get_device_properties(0)
    result = run_meta("bench.small_batch_probe", argv)
    result["sm_count"] = props.multi_processor_count
    if args.configs:
        result["sweep"] = points = sweep(args, say)
        print(sweep_table([p for p in points if "best" in p]))
    else:
        ceilings = measure_ceilings("cuda")
        say(
            f"{props.name}: HBM {ceilings.hbm_bytes_per_s / 1e12:.2f} TB/s, "
            f"bf16 {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s"
        )
        result["ceilings"] = dataclasses.asdict(ceilings)
        result["rows"] = rows = compare(args, ceilings, say)
        baselines = [b for b in args.baselines.split(",") if b and any(b in r for r in rows)]
        print(f"### small_batch under CUDA-graph replay: {props.name}\n\nversions: {result['versions']}\n")
        print(compare_table(rows, baselines))
        print("\nTimes: median of graph replays (us). Floor: bench.roofline (touched experts' bytes / measured HBM).")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
