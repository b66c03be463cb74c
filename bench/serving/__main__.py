"""`python -m bench.serving`: SGLang's own engine with the moe-dispatch plugin off and on, per model.

Each run is one process of SGLang's one-batch benchmark (offline, ModelRunner with its decode and
prefill CUDA-graph runners, dummy weights) in one mode (see modes.py: off, measure, plan, threshold,
triton, triton_kernels). It reports, per model and mode, median (min-max) over repeats of:
decode step per batch size, prefill latency per prompt length (batch 1), CUDA-graph memory and
capture time (decode + prefill, from SGLang's log), and the plugin's start-up line.

Models (--models NAME[:tpN][:layers=L], comma-separated) are built from the project's presets with
the per-rank shapes of tp=N, run on one GPU (see models.py for the default depth). `--tp N` runs a
real N-GPU tensor-parallel engine on the full model instead; `--model-path` a real checkpoint.
Extra SGLang flags go after `--`.

One 10-minute GPU run holds one model with the default modes and repeats, e.g.
    python -m bench.serving --models gpt-oss-120b:tp8 --time-budget 530
The default set (three models) takes three such runs, one per model; `--report-from <out>` redraws
the reports from a session's folder.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench.cli import positive_ints
from bench.serving import driver, host, models, records, report
from bench.serving.modes import BASELINE, DEFAULT_MODES, MODES, parse_modes
from bench.serving.points import PointPlan

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BATCH_SIZES = (1, 8, 32, 64, 128, 256)
DEFAULT_PREFILL_LENS = (512, 2048, 8192)


def _modes(text: str) -> tuple[str, ...]:
    try:
        return parse_modes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the SGLang flags after `--` (passed to every run unchanged)."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m bench.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default=",".join(models.DEFAULT_MODELS), help="NAME[:tpN][:layers=L],...")
    p.add_argument("--modes", type=_modes, default=DEFAULT_MODES, help=f"some of {', '.join(MODES)}, or all")
    p.add_argument("--repeats", type=int, default=2, help="processes per model and mode (modes alternate)")
    p.add_argument("--batch-sizes", type=positive_ints, default=DEFAULT_BATCH_SIZES, help="decode batch sizes")
    p.add_argument("--prefill-lens", type=positive_ints, default=DEFAULT_PREFILL_LENS, help="prefill tokens (batch 1)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per sequence before decoding")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per decode point (steps + 1)")
    p.add_argument("--prefill-repeats", type=int, default=3, help="prefills per length per run (median kept)")
    p.add_argument(
        "--prefill-graphs",
        choices=driver.PREFILL_GRAPHS,
        default="bench",
        help="bench: capture prefill graphs at --prefill-lens only; sglang: SGLang's own sizes; off: none",
    )
    p.add_argument("--model-path", help="a real checkpoint instead of the presets (no dummy weights)")
    p.add_argument("--tp", type=int, default=1, help="SGLang --tp-size; above 1 the presets are built whole")
    p.add_argument("--mem-fraction-static", type=float, help="override the per-model value")
    p.add_argument("--out", type=Path, default=REPO / "out" / "serving", help="logs, run records, model folders")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results", help="where reports go")
    p.add_argument("--time-budget", type=float, help="seconds for all runs; no run starts that would not fit")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds before one run is killed")
    p.add_argument("--dry-run", action="store_true", help="print each run's environment and command, run nothing")
    p.add_argument("--report-from", type=Path, help="rebuild reports from a session folder (its --out)")
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # runs start in the repository root
    if args.repeats < 1 or args.prefill_repeats < 1 or args.output_len < 2 or args.input_len < 1:
        p.error("--repeats and --prefill-repeats must be >= 1, --output-len >= 2, --input-len >= 1")
    return args, extra


def _describe(choice: models.ModelChoice, config: dict, per_rank: bool) -> str:
    experts, top_k, hidden, inter = models.moe_dims(config)
    arch = models.ARCHS[choice.name]
    where = f"per-rank shapes of tp={choice.tp} on 1 GPU" if per_rank else f"tp={choice.tp} on {choice.tp} GPUs"
    return (
        f"{choice.name} {where}: {config['num_hidden_layers']} of {arch.num_layers} layers, E={experts} "
        f"top-{top_k} H={hidden} I={inter}, {config['num_attention_heads']} q / {config['num_key_value_heads']} "
        f"kv heads, vocab {config['vocab_size']}"
    )


def build_targets(args: argparse.Namespace, gpu: host.GpuInfo, say) -> list[tuple[driver.Target, records.ModelInfo]]:
    """The models to run, each as the driver's Target and the session's ModelInfo."""
    if args.model_path:
        path = Path(args.model_path)
        model_path = str(path.resolve()) if path.exists() else args.model_path  # else a hub id
        key = path.name or "checkpoint"
        description = f"{key} (checkpoint), tp={args.tp}"
        target = driver.Target(key, model_path, description, args.tp, False, args.mem_fraction_static)
        return [(target, records.ModelInfo(key, description, args.tp, None, args.mem_fraction_static))]
    gpu_bytes = gpu.memory_bytes or host.DEFAULT_GPU_BYTES
    per_rank = args.tp == 1
    out = []
    for text in filter(None, (t.strip() for t in args.models.split(","))):
        choice = models.parse_model(text, default_tp=args.tp)
        if not per_rank and choice.tp != args.tp:
            say(f"skip {text}: --tp {args.tp} runs the full model on {args.tp} GPUs; give it as NAME:tp{args.tp}")
            continue
        config = models.model_config(choice.name, choice.tp, choice.depth, per_rank=per_rank)
        weights = models.weight_bytes(config) / (1 if per_rank else args.tp)
        fraction = args.mem_fraction_static or models.mem_fraction_static(int(weights), gpu_bytes)
        description = _describe(choice, config, per_rank)
        path = str(args.out / "models" / choice.key)
        target = driver.Target(choice.key, path, description, args.tp, True, fraction)
        info = records.ModelInfo(choice.key, description, args.tp, round(weights / 1e9, 2), fraction, config)
        out.append((target, info))
    return out


def _print_dry_run(runs: list[driver.Run], settings: driver.Settings) -> None:
    for i, run in enumerate(runs, 1):
        env = driver.env_overrides(run, settings)
        print(f"# run {i}/{len(runs)}: {run.label}  (every other SGLANG_ADAPTIVE_MOE* variable unset)")
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print(f"cd {shlex.quote(str(driver.REPO_ROOT))} && {assignments} {shlex.join(driver.command(run, settings))}")


def _report(session: records.Session, runs: list[records.RunRecord], results: Path) -> int:
    """Save and print each model's report and draw its plot; 1 when no run counted."""
    counted = 0
    for info in session.models:
        path, text = report.save(session, info.key, runs, results)
        print(text)
        mine = [r for r in runs if r.model == info.key and r.counted]
        counted += len(mine)
        saved = f"saved {path}, {path.with_suffix('.md')}"
        if mine:
            try:
                from bench.serving.plot import plot_file

                saved += f", {plot_file(path)}"
            except ImportError as err:  # matplotlib is a dev extra; the data is saved either way
                saved += f" (no plot: {err})"
        print(saved, file=sys.stderr)
    return 0 if counted else 1


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.report_from:
        folder = args.report_from
        return _report(records.load_session(folder), records.load(folder / records.RUNS_FILE), args.results)
    gpu = host.gpu_info()
    if gpu.memory_bytes is None and not args.model_path:
        say(f"nvidia-smi gave no GPU memory: sizing --mem-fraction-static for {host.DEFAULT_GPU_BYTES / 2**30:.1f} GiB")
    try:
        targets = with_enough_gpus(build_targets(args, gpu, say), gpu, args.dry_run, say)
    except ValueError as err:  # a bad --models entry, or weights that leave no room on this GPU
        say(f"bench.serving: {err}")
        return 2
    if not targets:
        return 1
    plan = PointPlan(args.batch_sizes, args.input_len, args.output_len, args.prefill_lens, args.prefill_repeats)
    settings = driver.Settings(plan, args.prefill_graphs, tuple(extra))
    runs = driver.schedule([t for t, _ in targets], args.modes, args.repeats, args.out)
    if any(m != BASELINE for m in args.modes) and not host.plugin_installed():
        say("the moe_dispatch plugin's entry point is not installed (pip install -e .; make bench-serving does it)")
        if not args.dry_run:
            return 1
    for target, info in targets:
        weights = f"~{info.weights_gb} GB weights per GPU, " if info.weights_gb else ""
        say(f"{target.key}: {info.description}; {weights}mem-fraction-static {target.mem_fraction}")
    if args.dry_run:
        _print_dry_run(runs, settings)
        return 0
    for target, info in targets:
        if info.config is not None:
            models.write_model_folder(target.model_path, info.config)
    from bench.results import now_iso, versions

    command = "python -m bench.serving " + shlex.join(sys.argv[1:] if argv is None else argv)
    session = records.Session(
        gpu=gpu.name or "unknown GPU",
        versions=versions(),
        date=now_iso(),
        command=command,
        settings={
            "batch_sizes": list(plan.decode_batch_sizes),
            "prefill_lens": list(plan.prefill_lens),
            "decode_input_len": plan.decode_input_len,
            "output_len": plan.output_len,
            "prefill_repeats": plan.prefill_repeats,
            "prefill_graphs": settings.prefill_graphs,
            "extra_sglang_args": list(extra),
        },
        modes=args.modes,
        repeats=args.repeats,
        models=tuple(info for _, info in targets),
    )
    records.save_session(args.out, session)
    runs_file = args.out / records.RUNS_FILE
    runs_file.unlink(missing_ok=True)
    budget = f", time budget {args.time_budget:.0f} s" if args.time_budget else ""
    say(f"{len(runs)} runs ({', '.join(args.modes)} x {args.repeats}){budget}; logs under {args.out}/runs")
    done = driver.execute(
        runs, settings, runs_file=runs_file, run_timeout_s=args.run_timeout, time_budget_s=args.time_budget, say=say
    )
    return _report(session, done, args.results)


def with_enough_gpus(targets: list, gpu: host.GpuInfo, dry_run: bool, say) -> list:
    """`targets` without those needing more GPUs than are visible (said why); a dry run keeps them all."""
    kept = []
    for target, info in targets:
        if target.tp_size > gpu.count:
            seen = f"{gpu.count} visible" if gpu.name else "nvidia-smi shows none"
            say(f"{target.key} needs {target.tp_size} GPU(s), {seen}: {'would be ' if dry_run else ''}skipped")
            if not dry_run:
                continue
        kept.append((target, info))
    return kept


if __name__ == "__main__":
    sys.exit(main())
