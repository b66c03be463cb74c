"""Where one MoE call's GPU time goes: each candidate's device kernels, per call, against the floor.

    python -m bench.kernel_breakdown --preset gpt-oss-120b --tp 8 --tokens 32,128,1024 \
        --kernels triton_kernels_tuned,triton_tuned,small_batch --out out/breakdown.md

Per (kernel, T): warm-up calls, then `--calls` eager calls under torch.profiler (CUDA
activity only). Device time is summed per kernel name and divided by the calls; host
launch gaps are not in it, so the sum is what a CUDA graph of the call would keep of the
kernels' own time. The floor is `make bench`'s (touched experts' bytes at the measured
copy rate, or the flops at the measured matmul rate). Uniform random routing, seeded.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from bench.roofline import floor, measure_ceilings, touched_experts
from moe_dispatch import ExpertWeights, make_kernel, random_inputs, route
from moe_dispatch.backends import candidate_at, kernel_support
from moe_dispatch.spec import preset

NAME_WIDTH = 72  # kernel names are long templates; the table keeps their heads


@dataclass(frozen=True)
class KernelTime:
    name: str
    us_per_call: float
    launches_per_call: float


@dataclass(frozen=True)
class Breakdown:
    kernel: str
    num_tokens: int
    touched_experts: int
    floor_us: float
    total_us: float
    parts: tuple[KernelTime, ...]


def profile_call(fn: Callable[[], object], calls: int) -> tuple[KernelTime, ...]:
    """Device time per kernel name of `fn()`, per call, largest first."""
    activity = torch.profiler.ProfilerActivity.CUDA
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    time_us: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            time_us[event.name] += event.device_time
            count[event.name] += 1
    parts = [KernelTime(n, time_us[n] / calls, count[n] / calls) for n in time_us]
    return tuple(sorted(parts, key=lambda p: -p.us_per_call))


def breakdown(preset_name: str, tp: int, tokens: Sequence[int], kernels: Sequence[str], calls: int, seed: int):
    spec = preset(preset_name, tp=tp)
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    weights = ExpertWeights.random(spec, device=device, seed=seed)
    results = []
    for name in kernels:
        support = kernel_support(name, spec)
        if not support:
            print(f"[breakdown] {name}: skipped ({support.reason})", file=sys.stderr)
            continue
        kernel = make_kernel(name, spec, weights)
        for T in tokens:
            if not candidate_at(name, T):
                continue
            x, logits = random_inputs(spec, T, device=device, seed=seed + T)
            call = functools.partial(kernel, x, logits)
            for _ in range(3):
                call()
            parts = profile_call(call, calls)
            touched = touched_experts(route(logits, spec.top_k, spec.routing)[1])
            row = Breakdown(
                kernel=name,
                num_tokens=T,
                touched_experts=touched,
                floor_us=floor(spec, T, touched, ceilings).seconds * 1e6,
                total_us=sum(p.us_per_call for p in parts),
                parts=parts,
            )
            print(f"[breakdown] {name} T={T}: {row.total_us:.1f} us in {len(parts)} kernels", file=sys.stderr)
            results.append(row)
    return spec, results


def markdown(title: str, rows: Sequence[Breakdown]) -> str:
    lines = [f"# {title}", ""]
    for row in rows:
        lines += [
            f"## {row.kernel}, T={row.num_tokens}: {row.total_us:.1f} us of kernels, "
            f"{row.total_us / row.floor_us:.2f}x the floor ({row.floor_us:.1f} us, {row.touched_experts} experts)",
            "",
            "| device kernel | us per call | share | launches per call |",
            "| --- | --: | --: | --: |",
        ]
        for part in row.parts:
            lines.append(
                f"| `{part.name[:NAME_WIDTH]}` | {part.us_per_call:.1f} | "
                f"{part.us_per_call / row.total_us:.0%} | {part.launches_per_call:g} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt-oss-120b")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--tokens", default="32,128,1024", help="comma-separated tokens per call")
    parser.add_argument("--kernels", default="triton_kernels_tuned,triton_tuned,small_batch")
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per (kernel, T)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="markdown path; a .json with the same stem is written too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    spec, rows = breakdown(args.preset, args.tp, tokens, args.kernels.split(","), args.calls, args.seed)
    title = f"Kernel breakdown: {spec.describe()} on {torch.cuda.get_device_name()}"
    with open(args.out, "w") as f:
        f.write(markdown(title, rows) + "\n")
    with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump({"title": title, "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(markdown(title, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
