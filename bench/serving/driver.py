"""Runs the serving benchmark: one subprocess per (model, mode, repeat), with a time budget.

Each run is `python -m bench.serving.one_batch_main <SGLang flags>` (SGLang's one-batch benchmark
with the plugin loader) in the repository root, with the mode's environment; stdout and stderr go to
<out>/runs/<model>/<mode>-r<i>/log.txt, the one_batch results to result.jsonl beside it. Modes
alternate within each repeat (off, measure, plan, off, measure, plan, ...) so slow drifts of the
machine spread over all modes. A measure run's plugin writes its plan to plan.json in its folder; a
plan run starts from a copy of the latest one (a priming measure run, repeat 0, is scheduled when
no measure run precedes the first plan run).

Flags are identical across modes; only the environment differs (see modes.py). Every run gets a
timeout; with a time budget no run starts once the runs so far say it would not finish in time,
and no run outlives the budget.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.serving import logparse, records
from bench.serving.modes import MODES, mode_env, overrides
from bench.serving.points import POINTS_ENV, PointPlan, encode_points
from bench.serving.records import RunRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
WRAPPER = "bench.serving.one_batch_main"
# What our GPU machine's SGLang needs (no FlashAttention-3, FlashInfer or xgrammar there), and a
# fixed seed so every mode gets the same dummy weights and prompts.
ENGINE_FLAGS = (
    "--attention-backend",
    "triton",
    "--sampling-backend",
    "pytorch",
    "--grammar-backend",
    "none",
    "--disable-radix-cache",
    "--random-seed",
    "0",
)
PREFILL_GRAPHS = ("bench", "sglang", "off")
MIN_RUN_S = 60.0  # with a budget and nothing measured yet, a run needs at least this much time left
KILL_GRACE_S = 15.0


@dataclasses.dataclass(frozen=True)
class Target:
    """One model as the runs see it: a folder, SGLang's tp size, a static memory fraction (None: SGLang's)."""

    key: str
    model_path: str
    description: str
    tp_size: int = 1
    dummy: bool = True
    mem_fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every run of a session shares.

    prefill_graphs: "bench" captures prefill graphs at the measured prefill lengths only (fast
    start-up); "sglang" keeps SGLang's own capture sizes (58 up to 8192 on an H200: start-up and
    memory as a server sees them); "off" disables prefill graphs.
    """

    plan: PointPlan
    prefill_graphs: str = "bench"
    extra_args: tuple[str, ...] = ()
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.prefill_graphs not in PREFILL_GRAPHS:
            raise ValueError(f"prefill_graphs must be one of {PREFILL_GRAPHS}, got {self.prefill_graphs!r}")


@dataclasses.dataclass(frozen=True)
class Run:
    target: Target
    mode: str
    repeat: int  # 1..repeats; 0: priming measure run (gives the plan mode its plan, not aggregated)
    repeats: int
    run_dir: Path

    @property
    def label(self) -> str:
        which = "prime" if self.repeat == 0 else f"{self.repeat}/{self.repeats}"
        return f"{self.target.key} {self.mode} {which}"

    @property
    def plan_path(self) -> Path | None:
        return self.run_dir / "plan.json" if MODES[self.mode].plan != "none" else None


def sglang_args(target: Target, settings: Settings, run_name: str, result_file: Path) -> list[str]:
    """one_batch's flags for one run; the same for every mode but run name and result file."""
    plan = settings.plan
    args = ["--model-path", target.model_path]
    if target.dummy:
        args += ["--load-format", "dummy"]
    if target.tp_size > 1:
        args += ["--tp-size", str(target.tp_size)]
    if target.mem_fraction is not None:
        args += ["--mem-fraction-static", f"{target.mem_fraction:.2f}"]
    args += ENGINE_FLAGS
    if plan.decode_batch_sizes:
        args += ["--cuda-graph-max-bs-decode", str(max(plan.decode_batch_sizes))]
    lens = sorted(set(plan.prefill_lens))
    if settings.prefill_graphs == "off" or (settings.prefill_graphs == "bench" and not lens):
        args += ["--disable-prefill-cuda-graph"]
    elif settings.prefill_graphs == "bench":
        args += ["--cuda-graph-bs-prefill", *map(str, lens)]
    args += plan.one_batch_args()
    args += ["--run-name", run_name, "--result-filename", str(result_file)]
    return args + list(settings.extra_args)


def command(run: Run, settings: Settings) -> list[str]:
    name = f"{run.mode}-r{run.repeat}"
    return [settings.python, "-m", WRAPPER, *sglang_args(run.target, settings, name, run.run_dir / "result.jsonl")]


def env_overrides(run: Run, settings: Settings) -> dict[str, str]:
    """The variables a run sets on top of the driver's environment (all SGLANG_ADAPTIVE_MOE* are removed first)."""
    plan_path = run.plan_path
    env = overrides(run.mode, None if plan_path is None else str(plan_path))
    env[POINTS_ENV] = encode_points(settings.plan.points())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def schedule(targets: list[Target], modes: tuple[str, ...], repeats: int, out: Path) -> list[Run]:
    """All runs in order: model by model; within a model, the modes in turn for each repeat."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = []
    for target in targets:
        folder = out / "runs" / target.key
        measured = False
        for repeat in range(1, repeats + 1):
            for mode in modes:
                if MODES[mode].plan == "read" and not measured:
                    runs.append(Run(target, "measure", 0, repeats, folder / "measure-prime"))
                    measured = True
                runs.append(Run(target, mode, repeat, repeats, folder / f"{mode}-r{repeat}"))
                measured |= MODES[mode].plan == "write"
    return runs


def estimate_s(run: Run, done: list[tuple[Run, float]]) -> float | None:
    """Wall time the next run is expected to take, from finished runs; None before the first.

    The smaller of the latest run of the same model and mode and the latest run of the same model
    (else the latest run at all): the first runs compile kernels (Triton, SGLang's JIT) into disk
    caches that later runs reuse, so older and first runs overstate what a repeat costs. It errs
    low on purpose: a run that would overrun the budget is killed at its end anyway.
    """
    same_model = [t for r, t in done if r.target.key == run.target.key]
    same_mode = [t for r, t in done if r.target.key == run.target.key and r.mode == run.mode]
    if same_mode:
        return min(same_mode[-1], same_model[-1])
    if same_model:
        return same_model[-1]
    return done[-1][1] if done else None


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the run's process group (its tp ranks included): SIGTERM, then SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _launch(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> int | None:
    """Run `cmd` to completion or timeout (None); its output goes to `log_path`."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True
        )
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None
        except BaseException:
            _kill_group(proc)
            raise


def _record(
    run: Run, settings: Settings, cmd: list[str], rc: int | None, wall_s: float, timeout_s: float, why_timeout: str
) -> RunRecord:
    log_path = run.run_dir / "log.txt"
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    metrics = logparse.parse_log(text)
    record = RunRecord(
        model=run.target.key,
        mode=run.mode,
        repeat=run.repeat,
        status="failed",
        wall_s=round(wall_s, 2),
        returncode=rc,
        command=tuple(cmd),
        env=env_overrides(run, settings),
        log=str(log_path),
        metrics=metrics,
    )
    if rc is None:
        return dataclasses.replace(record, status="timeout", note=f"killed after {timeout_s:.0f} s{why_timeout}")
    result_file = run.run_dir / "result.jsonl"
    results = logparse.parse_results(result_file.read_text(), settings.plan) if result_file.exists() else None
    if rc != 0 or results is None or not (results.decode_ms or results.prefill_ms):
        why = f"exit {rc}" + ("" if results else ", no results")
        return dataclasses.replace(record, note=f"{why}: {metrics.error or logparse.last_lines(text)}")
    missing = [bs for bs in settings.plan.decode_batch_sizes if bs not in results.decode_ms]
    missing += [n for n in settings.plan.prefill_lens if n not in results.prefill_ms]
    note = f"no result for {missing} (one_batch skips batches that do not fit its KV pool)" if missing else None
    return dataclasses.replace(record.with_results(results), status="ok", note=note)


def _summary(record: RunRecord) -> str:
    m = record.metrics
    parts = [f"{record.status}, {record.wall_s:.0f} s"]
    for name, phase in (("decode graphs", m.decode_capture), ("prefill graphs", m.prefill_capture)):
        if phase is not None:
            parts.append(f"{name} {phase.elapsed_s:.1f} s {phase.mem_gb:.2f} GB")
    if m.plugin is not None:
        parts.append(f"plugin measure_s={m.plugin.measure_s:g} source={m.plugin.source}")
    if record.decode_ms:
        first, last = min(record.decode_ms), max(record.decode_ms)
        parts.append(f"decode bs{first} {record.decode_ms[first]:.2f} ms .. bs{last} {record.decode_ms[last]:.2f} ms")
    if record.note:
        parts.append(record.note)
    return "; ".join(parts)


def execute(
    runs: list[Run],
    settings: Settings,
    *,
    runs_file: Path,
    run_timeout_s: float,
    time_budget_s: float | None,
    say: Callable[[str], None],
) -> list[RunRecord]:
    """Run `runs` in order; append each record to `runs_file` as it ends; return all records."""
    start = time.monotonic()
    done: list[tuple[Run, float]] = []
    plans: dict[str, Path] = {}
    out: list[RunRecord] = []

    def keep(record: RunRecord) -> None:
        records.append(runs_file, record)
        out.append(record)

    for index, run in enumerate(runs):
        elapsed = time.monotonic() - start
        timeout_s = run_timeout_s
        if time_budget_s is not None:
            left = time_budget_s - elapsed
            guess = estimate_s(run, done)
            if left < (guess if guess is not None else MIN_RUN_S):
                rest = runs[index:]
                say(
                    f"time budget: {elapsed:.0f} of {time_budget_s:.0f} s used; the next run ({run.label}) "
                    f"needs ~{guess or MIN_RUN_S:.0f} s: stopping, {len(rest)} runs not started"
                )
                for r in rest:
                    keep(RunRecord(r.target.key, r.mode, r.repeat, "skipped", note="time budget"))
                break
            timeout_s = min(run_timeout_s, left)
        why_timeout = " (the end of the time budget)" if timeout_s < run_timeout_s else ""
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "result.jsonl").unlink(missing_ok=True)  # one_batch appends
        if run.plan_path is not None:
            run.plan_path.unlink(missing_ok=True)
        if MODES[run.mode].plan == "read":
            source = plans.get(run.target.key)
            if source is None:
                note = "no plan: no earlier measure run of this model wrote one"
                keep(RunRecord(run.target.key, run.mode, run.repeat, "skipped", note=note))
                say(f"[{elapsed:6.0f}s] {run.label}: skipped ({note})")
                continue
            shutil.copyfile(source, run.plan_path)
        cmd = command(run, settings)
        env = mode_env(run.mode, os.environ, None if run.plan_path is None else str(run.plan_path))
        env.update(env_overrides(run, settings))
        began = time.monotonic()
        rc = _launch(cmd, env, run.run_dir / "log.txt", timeout_s)
        wall_s = time.monotonic() - began
        record = _record(run, settings, cmd, rc, wall_s, timeout_s, why_timeout)
        keep(record)
        if record.status in ("ok", "timeout"):
            done.append((run, wall_s))
        say(f"[{time.monotonic() - start:6.0f}s] {run.label}: {_summary(record)}")
        if MODES[run.mode].plan == "write":
            if run.plan_path.exists():
                plans[run.target.key] = run.plan_path
            elif record.status == "ok":
                say(f"  {run.label} wrote no plan at {run.plan_path}: the plugin should write it in measure policy")
    return out
