"""`python -m bench.tune`: tune SGLang's Triton fused_moe tile configs per batch bucket.

Per tensor-parallel shard of the preset and per bucket: a coordinate descent over the up
and down matmuls' tile configs, each candidate timed as a CUDA graph through
graphs.measure.measure_buckets (see bench/tune/__init__.py); a pair that beats the default
is confirmed side by side with it (--confirm-rounds) before it is stored. Writes one tuned
table per shape into --out (what backend `triton_tuned` reads), a report (Markdown + JSON)
next to the state file, and prints the report. --dry-run prints the planned search (no
GPU). --table-from-report REPORT.json rebuilds the tables from a report (no GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.cli import sorted_positive_ints

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE = REPO / "out" / "tune" / "state.jsonl"
SECONDS_PER_CONFIG = (1.0, 2.5)  # rough range on an H200: mostly the Triton compile of a new config


def _number(kind: type, minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.tune.space import SPACES
    from moe_dispatch.spec import PRESETS, preset

    p = argparse.ArgumentParser(
        prog="python -m bench.tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="gpt-oss-120b", choices=PRESETS, help="model whose MoE layer is tuned")
    p.add_argument("--tp", type=sorted_positive_ints, default=(2, 8), help="tp sizes (shards of I), e.g. 2,8")
    p.add_argument("--buckets", type=sorted_positive_ints, default=DEFAULT_BUCKETS, help="batch sizes (tokens) to tune")
    p.add_argument(
        "--time-budget",
        type=_number(float, 0, strict=True),
        metavar="SECONDS",
        help="start no timing that would end past this many seconds from start; buckets done are still written",
    )
    p.add_argument("--state", type=Path, default=DEFAULT_STATE, help="resume file (JSON lines); reports go next to it")
    p.add_argument("--out", type=Path, default=None, help="tuned-table directory (default: the package's tuned_data)")
    p.add_argument("--report", type=Path, default=None, help="also write the report here (Markdown, + .json)")
    p.add_argument("--replays", type=_number(int, 1, strict=False), default=50, help="timed replays per config")
    p.add_argument("--warmup", type=_number(int, 0, strict=False), default=5, help="untimed replays per config")
    p.add_argument("--space", choices=SPACES, default="small", help="small: pruned local search; full: products")
    p.add_argument(
        "--min-gain", type=float, default=0.01, help="store a tuned pair only when this much faster than the default"
    )
    p.add_argument(
        "--confirm-rounds",
        type=_number(int, 0, strict=False),
        default=3,
        help="side-by-side rounds of default vs tuned pair that decide what is stored (0: the search's timings)",
    )
    p.add_argument(
        "--confirm-replays",
        type=_number(int, 1, strict=False),
        help="timed replays per pair in a confirm round (default: 4 x --replays)",
    )
    p.add_argument(
        "--smem-kib",
        type=_number(int, 1, strict=False),
        help="shared memory per block (default: the GPU's; 200 on CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--dry-run", action="store_true", help="print the planned search per bucket; no GPU needed")
    p.add_argument(
        "--table-from-report",
        type=Path,
        metavar="REPORT.json",
        help="rebuild the tables from a report JSON this tool wrote and save them in --out; no GPU needed",
    )
    p.add_argument("--note", default="", help="with --table-from-report: a line appended to the tables' notes")
    args = p.parse_args(argv)
    if args.confirm_replays is None:
        args.confirm_replays = 4 * args.replays
    if not 0 <= args.min_gain < 1:
        p.error(f"--min-gain {args.min_gain} must be in [0, 1)")
    try:
        args.specs = [preset(args.preset, tp=tp) for tp in args.tp]
    except ValueError as error:
        p.error(f"--preset {args.preset} --tp {','.join(map(str, args.tp))}: {error}")
    if args.out is None:
        from moe_dispatch.tuned_configs import default_tuned_dir

        args.out = default_tuned_dir()
    return args


def _settings(args: argparse.Namespace):
    from bench.tune.search import Settings
    from bench.tune.space import get_space

    return Settings(
        get_space(args.space), args.min_gain, confirm_rounds=args.confirm_rounds, confirm_replays=args.confirm_replays
    )


def _limits(args: argparse.Namespace):
    from bench.tune.space import Limits, device_limits

    return Limits(args.smem_kib * 1024) if args.smem_kib else device_limits()


def dry_run(args: argparse.Namespace) -> str:
    """The planned search per shape and bucket, with config counts (assuming no candidate beats its start)."""
    from bench.tune.plan import plan_bucket
    from bench.tune.space import Point, block_m_choices, default_tile
    from bench.tune.state import State
    from moe_dispatch.tuned_configs import shape_key

    settings = _settings(args)
    limits = _limits(args)
    state = State(args.state)  # ValueError on a damaged file: main reports it
    lines = [
        f"bench.tune dry run: space {args.space}, shared memory <= {limits.smem_bytes // 1024} KiB per block; "
        "counts assume no candidate beats its start (the real search varies by a few). Nothing is timed."
    ]
    total = confirms = 0
    for spec in args.specs:
        shape = shape_key(spec)
        held = state.count(lambda key, shape=shape: key.endswith("|" + shape))
        lines.append(
            f"[tune {spec.name}] {shape}: up GEMM N={2 * spec.intermediate_size} K={spec.hidden_size}, "
            f"down GEMM N={spec.hidden_size} K={spec.intermediate_size}; {held} point(s) in {args.state}"
        )
        shape_total = shape_confirms = 0
        for bucket in args.buckets:
            point = Point.of(spec, bucket, limits)
            plan = plan_bucket(point, settings)
            n = sum(count for phase, _, count in plan if phase != "confirm")
            c = sum(count for phase, _, count in plan if phase == "confirm")
            shape_total, shape_confirms = shape_total + n, shape_confirms + c
            phases = " | ".join(
                f"{phase} " + " + ".join(f"{step} {c}" for ph, step, c in plan if ph == phase)
                for phase in ("up", "down")
            )
            ms = ",".join(map(str, block_m_choices(point)))
            lines.append(
                f"  bucket {bucket:5d}: default {default_tile(bucket, spec.num_experts).label()}, block_m {{{ms}}}: "
                f"baseline 1 | {phases} = {n} configs"
                + (f" | confirm {args.confirm_rounds} rounds x 2 pairs x {args.confirm_replays} replays = {c} timings"
                   if c else " | no confirm")
            )  # fmt: skip
        lines.append(
            f"  {shape_total} configs + {shape_confirms} confirm timings over {len(args.buckets)} buckets"
        )  # fmt: skip
        total, confirms = total + shape_total, confirms + shape_confirms
    lo, hi = (total * s / 60 for s in SECONDS_PER_CONFIG)
    lines.append(
        f"total {total} configs: about {lo:.0f}-{hi:.0f} min of GPU at {SECONDS_PER_CONFIG[0]:g}-"
        f"{SECONDS_PER_CONFIG[1]:g} s each (less where compiles repeat across buckets), plus {confirms} confirm "
        "timings (made only where the search beats the default; compiled already, so mostly the replays) and "
        "the reference checks"
    )
    return "\n".join(lines)


def tune_shape(spec, args, settings, state, budget, say):
    import torch

    from bench.results import now_iso
    from bench.tune.gpu import GpuTuner
    from bench.tune.report import ShapeReport
    from bench.tune.search import SearchContext, tune_buckets
    from bench.tune.space import Point
    from bench.tune.tables import store
    from graphs.measure import TimingPlan
    from moe_dispatch.tuned_configs import current_key

    key = current_key(spec)
    limits = _limits(args)
    say(f"[tune {spec.name}] {key.gpu}, Triton {key.triton_version}, shared memory <= {limits.smem_bytes} B")
    tuner = GpuTuner(spec, max(args.buckets), args.seed, TimingPlan(args.warmup, args.replays))
    points = [Point.of(spec, b, limits) for b in args.buckets]
    state_key = f"{key.gpu}|{key.triton_version}|{key.shape}"
    ctx = SearchContext(state_key, settings, tuner.time_configs, tuner.check, state, budget, say, spec.name)
    outcomes = tune_buckets(points, ctx)
    del tuner
    torch.cuda.empty_cache()
    created = now_iso()
    path = store(key, outcomes, args, say, created)
    say(f"[tune {spec.name}] table: {path or 'nothing to store'}")
    fields = ("space", "replays", "warmup", "min_gain", "seed", "smem_kib", "confirm_rounds", "confirm_replays")
    return ShapeReport(
        spec.name, dataclasses.asdict(key), tuple(outcomes), str(path) if path else None,
        {f: getattr(args, f) for f in fields}, created if path else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    if args.table_from_report is not None:
        from bench.tune.tables import save_from_report

        try:
            paths = save_from_report(args.table_from_report, args.out, args.note)
        except (ValueError, OSError) as error:  # TunedConfigError is a ValueError
            print(f"bench.tune: {error}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"wrote {path}")
        return 0
    if args.dry_run:
        try:
            print(dry_run(args))
        except ValueError as error:  # a damaged state file
            print(f"bench.tune: {error}", file=sys.stderr)
            return 2
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench.tune: no CUDA GPU visible; it times CUDA graphs and needs one (--dry-run works without)",
              file=sys.stderr)  # fmt: skip
        return 1
    from bench.tune import report
    from bench.tune.gpu import SetupError
    from bench.tune.search import Budget
    from bench.tune.state import State

    def say(line: str) -> None:
        print(f"[{time.monotonic() - start:7.1f}s] {line}", file=sys.stderr, flush=True)

    budget = Budget(args.time_budget, clock=time.monotonic, start=start)  # imports and set-up count too
    settings = _settings(args)
    try:
        state = State(args.state)
    except ValueError as error:
        print(f"bench.tune: {error}", file=sys.stderr)
        return 2
    say(f"state {args.state}: {state.loaded} point(s) from earlier runs")
    reports, code = [], 0
    for spec in args.specs:
        try:
            reports.append(tune_shape(spec, args, settings, state, budget, say))
        except SetupError as error:
            print(f"bench.tune: {error}", file=sys.stderr)
            code = 1
            break
        if any(o.status == "stopped" for o in reports[-1].outcomes):
            say("stopping: the device cannot go on (see above); later shapes are not tuned")
            code = 1
            break
    if reports:
        for path in report.write(reports, args.state.parent, args.report):
            say(f"wrote {path}")
        print("\n\n".join(report.markdown(r) for r in reports))
    return code


if __name__ == "__main__":
    sys.exit(main())
