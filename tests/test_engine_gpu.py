"""The plugin inside SGLang's own engine: next-token logits per mode agree within bf16 tolerance.

A 2-layer GPT-OSS-120B with one tp=8 rank's shapes (dummy weights, seeded, so every process
holds the same model) runs `python -m bench.engine_logits run` once per mode, each in its own
process (the plugin patches SGLang per process): stock SGLang with the Triton runner (the
plugin's weight layout), the plugin measuring, and each fixed kernel. `compare` then checks
every file against stock within the bf16 tolerance of moe_dispatch.testing (exit 1 otherwise).
About a minute per mode on an H200.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.serving.models import model_config, write_model_folder

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
GRAPH_FLAGS = ("--cuda-graph-max-bs", "64", "--cuda-graph-max-bs-prefill", "2048")
MODES = {
    "stock-triton": ({"SGLANG_ADAPTIVE_MOE": "0"}, ("--moe-runner-backend", "triton")),
    "measure": ({"SGLANG_ADAPTIVE_MOE": "1", "SGLANG_ADAPTIVE_MOE_POLICY": "measure"}, ()),
    "triton": (
        {"SGLANG_ADAPTIVE_MOE": "1", "SGLANG_ADAPTIVE_MOE_POLICY": "fixed", "SGLANG_ADAPTIVE_MOE_KERNEL": "triton"},
        (),
    ),
    "triton_kernels": (
        {
            "SGLANG_ADAPTIVE_MOE": "1",
            "SGLANG_ADAPTIVE_MOE_POLICY": "fixed",
            "SGLANG_ADAPTIVE_MOE_KERNEL": "triton_kernels",
        },
        (),
    ),
}


def _engine_reason() -> str | None:
    """None when SGLang's engine imports here, else why not (the test is skipped with it)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sglang.srt.model_executor.model_runner"], capture_output=True, text=True
    )
    if probe.returncode == 0:
        return None
    return "SGLang's engine does not import here: " + (probe.stderr.strip().splitlines() or ["?"])[-1]


def _mode_env(overrides: dict[str, str], plan: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_ADAPTIVE_MOE")}
    env.update(overrides, SGLANG_PLUGINS="moe_dispatch", PYTHONUNBUFFERED="1")
    if overrides.get("SGLANG_ADAPTIVE_MOE_POLICY") == "measure":
        env["SGLANG_ADAPTIVE_MOE_PLAN"] = str(plan)
    return env


def test_engine_logits_agree_across_modes(tmp_path):
    reason = _engine_reason()
    if reason:
        pytest.skip(reason)
    model = write_model_folder(tmp_path / "model", model_config("gpt-oss-120b", tp=8, num_layers=2))
    files = []
    for name, (overrides, flags) in MODES.items():
        out = tmp_path / f"{name}.pt"
        command = [
            sys.executable, "-m", "bench.engine_logits", "run", "--model-path", str(model),
            "--out", str(out), "--label", name, "--", *GRAPH_FLAGS, *flags,
        ]  # fmt: skip
        run = subprocess.run(
            command, cwd=ROOT, env=_mode_env(overrides, tmp_path / "plan.json"), capture_output=True, text=True
        )
        log = (run.stdout + run.stderr)[-3000:]
        assert run.returncode == 0 and out.exists(), f"engine_logits run ({name}) failed, rc={run.returncode}:\n{log}"
        if name == "measure":  # the plugin measured and saved its plan
            assert (tmp_path / "plan.json").exists(), f"the measure run wrote no plan:\n{log}"
        files.append(str(out))
    compare = subprocess.run(
        [sys.executable, "-m", "bench.engine_logits", "compare", *files], cwd=ROOT, capture_output=True, text=True
    )
    assert compare.returncode == 0, f"logits out of bf16 tolerance:\n{compare.stdout}\n{compare.stderr[-2000:]}"
