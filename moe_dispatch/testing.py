"""Comparing a kernel's output with the reference: error statistics and tolerances.

Errors are relative to the reference's scale: `rms` = ||out - ref|| / ||ref|| and
`max` = max|out - ref| / max|ref|. A failure message carries both, and where the
largest error sits, so a red test says how wrong and where.
"""

from __future__ import annotations

import dataclasses

import torch

from moe_dispatch.spec import MoESpec


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rms: float
    max: float


# Kernels round operands and intermediates to the storage dtype; the reference is fp32.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.bfloat16: Tolerance(rms=2e-2, max=6e-2),
    torch.float16: Tolerance(rms=4e-3, max=1.5e-2),
    torch.float32: Tolerance(rms=1e-5, max=1e-4),
}


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    rms: float
    max: float
    worst_index: tuple[int, ...]
    nonfinite: int

    def within(self, tol: Tolerance) -> bool:
        return self.nonfinite == 0 and self.rms <= tol.rms and self.max <= tol.max

    def describe(self) -> str:
        return f"rms_rel={self.rms:.2e} max_rel={self.max:.2e} at {self.worst_index} nonfinite={self.nonfinite}"


def error_stats(actual: torch.Tensor, expected: torch.Tensor) -> ErrorStats:
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nonfinite = int((~torch.isfinite(a)).sum())
    if a.numel() == 0:
        return ErrorStats(0.0, 0.0, (), 0)
    diff = (a - e).abs().nan_to_num(nan=float("inf"))
    scale_rms = float(e.norm()) or 1.0
    scale_max = float(e.abs().max()) or 1.0
    flat = int(diff.argmax())
    worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return ErrorStats(float((a - e).norm()) / scale_rms, float(diff.max()) / scale_max, worst, nonfinite)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", tol: Tolerance | None = None
) -> ErrorStats:
    """Raise AssertionError with max and RMS relative error when out of tolerance."""
    tol = tol or TOLERANCES[dtype]
    stats = error_stats(actual, expected)
    if not stats.within(tol):
        raise AssertionError(f"{what}: {stats.describe()} exceeds tolerance rms<={tol.rms:g} max<={tol.max:g}")
    return stats


def untied_inputs(
    spec: MoESpec, num_tokens: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`random_inputs` redrawn until no row's k-th and (k+1)-th largest logits tie.

    At such a tie the chosen expert is arbitrary (torch.topk's order on ties is unspecified;
    small_batch takes the lowest id), so kernels and the reference may differ by design.
    """
    from moe_dispatch.weights import random_inputs

    k = spec.top_k
    for attempt in range(100):
        x, logits = random_inputs(spec, num_tokens, device=device, seed=seed + 7919 * attempt)
        if k == spec.num_experts or num_tokens == 0:
            return x, logits
        top = logits.float().topk(k + 1, dim=-1).values  # [T, k+1]
        if bool((top[:, k - 1] > top[:, k]).all()):
            return x, logits
    raise RuntimeError(f"no tie-free logits for {spec.describe()} T={num_tokens} in 100 draws")


def run_interpreted(test_file: str, worker: str, out_path: str, timeout: int = 600) -> str:
    """Run `worker(out_path)` of `test_file` in a child process under Triton's interpreter.

    TRITON_INTERPRET=1 must be set before triton's first import (its language helpers are
    built for one mode then), so CPU tests run interpreted kernels in a fresh process with
    no visible GPU. The file is loaded by path, not as `tests.<module>` (an installed
    package named `tests` could shadow ours). Returns "" on success, else the child's stderr.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    name = f"{Path(test_file).stem}_worker"
    code = (
        "import importlib.util as u, sys; "
        f"s = u.spec_from_file_location({name!r}, {str(Path(test_file).resolve())!r}); "
        "m = sys.modules[s.name] = u.module_from_spec(s); s.loader.exec_module(m); "
        f"m.{worker}({str(out_path)!r})"
    )
    command = [sys.executable, "-c", code]
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    return "" if proc.returncode == 0 else f"worker exited {proc.returncode}:\n{proc.stderr[-4000:]}"
