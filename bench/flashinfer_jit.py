"""FlashInfer's CUTLASS MoE module for the probe (bench/flashinfer_probe.py): build it within a time
budget (ninja on the module's own build file, stopped early it keeps its finished objects and the
next run resumes), log each run's compile seconds, then load it as FlashInfer does."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch


def say(line: str) -> None:
    print(line, flush=True)


def _objects(build_dir: Path) -> int:
    return sum(1 for p in build_dir.glob("*.o")) if build_dir.is_dir() else 0


def jit_build(budget_s: float) -> dict:
    """Build (or find) FlashInfer's CUTLASS MoE module for this GPU within budget_s; load it.
    On SM90 the module is the backend's choice (`sm90_module`: the bf16-only one unless the full
    one is built or MOE_DISPATCH_FLASHINFER_MODULE=full)."""
    from flashinfer.fused_moe.core import get_cutlass_fused_moe_module
    from flashinfer.jit import env as jit_env

    from moe_dispatch.backends.flashinfer_moe import sm90_module, sm90_specs
    from moe_dispatch.backends.flashinfer_slim import install

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major * 10 + minor}"
    info: dict = {"arch": arch, "workspace": str(jit_env.FLASHINFER_WORKSPACE_DIR)}
    if arch == "90":
        t0 = time.perf_counter()
        choice = sm90_module()
        spec = sm90_specs()[choice]  # writes the generated kernel sources
        info.update(module=spec.name, sources=len(spec.sources), generate_s=round(time.perf_counter() - t0, 1))
        info.update(aot=spec.is_aot, compiled_before=spec.is_compiled, objects_before=_objects(spec.build_dir))
        say(
            f"[jit] {spec.name}: {len(spec.sources)} sources, {info['objects_before']} objects already built, "
            f"library {'present' if spec.is_compiled else 'absent'} ({spec.build_dir})"
        )
        if not spec.is_compiled:
            info.update(_run_ninja(spec, budget_s))
            _log_jit_time(jit_env.FLASHINFER_WORKSPACE_DIR, info)
            if not info["finished"]:
                return info
        if choice == "slim":
            install()
    t0 = time.perf_counter()
    get_cutlass_fused_moe_module(arch)  # FlashInfer's own path: ninja finds nothing to do, then loads
    info["load_s"] = round(time.perf_counter() - t0, 1)
    say(f"[jit] module loaded in {info['load_s']} s")
    return info


def _run_ninja(spec, budget_s: float) -> dict:
    spec.write_ninja()
    cmd = ["ninja", "-C", str(spec.build_dir), "-f", str(spec.ninja_path)]
    jobs = os.environ.get("MAX_JOBS")
    if jobs and jobs.isdigit():
        cmd += ["-j", jobs]
    say(f"[jit] ninja -j {jobs or 'default'} on {len(spec.sources)} sources, budget {budget_s:.0f} s")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip()[:400])
            del tail[:-80]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped = False
    while proc.poll() is None:
        try:
            proc.wait(timeout=max(1.0, min(30.0, budget_s - (time.perf_counter() - start))))
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.perf_counter() - start
        say(f"[jit] {elapsed:6.0f} s: {_objects(spec.build_dir)}/{len(spec.sources)} objects")
        if proc.poll() is None and elapsed > budget_s:
            os.killpg(proc.pid, signal.SIGINT)  # ninja stops its compilers and keeps finished objects
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stopped = True
    reader.join(timeout=5)
    seconds = round(time.perf_counter() - start, 1)
    done = _objects(spec.build_dir)
    if stopped:
        say(f"[jit] stopped at the budget after {seconds} s, {done}/{len(spec.sources)} objects: run again to resume")
        return {"finished": False, "build_s": seconds, "objects_after": done}
    if proc.returncode != 0:
        say("[jit] ninja FAILED; its last lines:\n" + "\n".join(tail[-40:]))
        raise RuntimeError(f"ninja failed with status {proc.returncode} after {seconds} s")
    say(f"[jit] built in {seconds} s ({done} objects)")
    return {"finished": True, "build_s": seconds, "objects_after": done}


def _log_jit_time(workspace: Path, info: dict) -> None:
    path = Path(workspace) / "moe_dispatch_jit_times.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "cpus": os.cpu_count(),
            "max_jobs": os.environ.get("MAX_JOBS"),
            **{k: info.get(k) for k in ("build_s", "objects_before", "objects_after", "finished")},
        }
    )
    path.write_text(json.dumps(runs, indent=1))
    info["build_s_all_runs"] = round(sum(r["build_s"] or 0 for r in runs), 1)
    info["runs"] = len(runs)
    say(f"[jit] compile time so far, all runs: {info['build_s_all_runs']} s over {len(runs)} run(s)")
