"""`python -m bench`: the per-batch table of MoE kernels under CUDA-graph replay.

With no arguments (what `make bench` runs): GPT-OSS-120B experts, bf16, tp=2 and tp=8,
batch sizes 1..8192. Prints a Markdown table, saves JSON under bench/results/<gpu>/
and draws the PNG plot from it. Needs a CUDA GPU; without one it says so and exits 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from bench.cli import positive_ints

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from moe_dispatch.spec import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="gpt-oss-120b", choices=PRESETS, help="model whose MoE layer is measured")
    p.add_argument(
        "--dims",
        type=positive_ints,
        metavar="E,K,H,I",
        help="explicit experts, top_k, hidden, intermediate (unsharded); overrides the preset's dims",
    )
    p.add_argument("--tp", type=positive_ints, default=(2, 8), help="tensor-parallel sizes (shards of I), e.g. 2,8")
    p.add_argument("--batch-sizes", type=positive_ints, default=DEFAULT_SIZES, help="token counts to measure")
    p.add_argument("--kernels", default=None, help="comma-separated kernels (default: all available)")
    p.add_argument("--threshold", type=int, default=1536, help="the static rule's threshold (tokens)")
    p.add_argument("--replays", type=int, default=100, help="timed replays per point (median reported)")
    p.add_argument("--skewed-sizes", type=positive_ints, default=(64, 1024), help="sizes also timed, skewed routing")
    p.add_argument("--eager", action="store_true", help="also time eager calls (includes host launch overhead)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--no-plot", action="store_true", help="skip drawing the PNG")
    return p.parse_args(argv)


def build_specs(args: argparse.Namespace):
    import dataclasses

    from moe_dispatch.spec import preset

    specs = []
    for tp in args.tp:
        spec = preset(args.preset, tp=tp)
        if args.dims:
            if len(args.dims) != 4:
                raise SystemExit(f"--dims needs 4 values E,K,H,I, got {args.dims}")
            E, K, H, I = args.dims
            if I % tp:
                raise SystemExit(f"tp={tp} does not divide the intermediate size {I}")
            spec = dataclasses.replace(
                spec,
                num_experts=E,
                top_k=K,
                hidden_size=H,
                intermediate_size=I // tp,
                name=f"custom E={E} K={K} H={H} I={I} tp={tp}",
            )
        specs.append((spec, tp))
    return specs


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "bench: no CUDA GPU visible (torch.cuda.is_available() is False); "
            "make bench measures kernels under CUDA graphs and needs one.",
            file=sys.stderr,
        )
        return 1
    args = parse_args(argv)
    from bench.plot import plot
    from bench.results import BenchRun, now_iso, save, versions
    from bench.roofline import measure_ceilings
    from bench.runner import BenchSettings, run_shard
    from bench.table import render_run

    start = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {line}", file=sys.stderr, flush=True)

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    say(f"GPU {props.name} ({props.multi_processor_count} SMs); measuring ceilings")
    ceilings = measure_ceilings(device)
    say(f"HBM {ceilings.hbm_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s")
    settings = BenchSettings(
        batch_sizes=tuple(sorted(set(args.batch_sizes))),
        kernels=tuple(args.kernels.split(",")) if args.kernels else None,
        replays=args.replays,
        skewed_sizes=args.skewed_sizes,
        eager=args.eager,
        threshold=args.threshold,
        seed=args.seed,
    )
    shards = []
    for spec, tp in build_specs(args):
        shards.append(run_shard(spec, tp, ceilings, settings, say))
        torch.cuda.empty_cache()  # the shard's graphs are gone; hand their pool back before the next
    run = BenchRun(
        gpu=props.name,
        sm_count=props.multi_processor_count,
        versions=versions(),
        ceilings=ceilings,
        seeds={"weights": args.seed, "inputs": args.seed},
        date=now_iso(),
        command="python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        shards=tuple(shards),
    )
    path = save(run, args.out)
    say(f"saved {path}")
    if not args.no_plot:
        say(f"plot {plot(run, path.with_suffix('.png'))}")
        plot(run, path.parent / "latest.png")
    print(render_run(run))
    say(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
