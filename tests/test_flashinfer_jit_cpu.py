"""CPU tests of the probe's resumable FlashInfer build (bench.flashinfer_jit) with a stand-in `ninja`:
a finished build, one stopped at its budget keeping its objects, a failed one with its last lines,
and the compile-time log across runs."""

from __future__ import annotations

import json
import stat
import types
from pathlib import Path

import pytest

from bench import flashinfer_jit as jit

FAKE_NINJA = """#!/bin/sh
# the stand-in: `ninja -C DIR -f FILE [-j N]`, behaviour from $FAKE_NINJA_MODE
cd "$2"
case "$FAKE_NINJA_MODE" in
  finish) touch a.o b.o; echo "[2/2] linked" ;;
  slow) touch a.o; echo "[1/2] compiling"; exec sleep 30 ;;
  fail) echo "[1/2] error: no such header"; exit 1 ;;
esac
"""


@pytest.fixture
def spec(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ninja = bin_dir / "ninja"
    ninja.write_text(FAKE_NINJA)
    ninja.chmod(ninja.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path('/bin')}:{Path('/usr/bin')}")
    monkeypatch.setenv("MAX_JOBS", "2")
    build = tmp_path / "build"
    build.mkdir()
    return types.SimpleNamespace(
        build_dir=build, ninja_path=build / "build.ninja", sources=["a.cu", "b.cu"], write_ninja=lambda: None
    )


def test_a_finished_build_counts_its_objects(spec, monkeypatch):
    monkeypatch.setenv("FAKE_NINJA_MODE", "finish")
    info = jit._run_ninja(spec, budget_s=60)
    assert info["finished"] and info["objects_after"] == 2


def test_a_build_past_its_budget_stops_and_keeps_its_objects(spec, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_NINJA_MODE", "slow")
    info = jit._run_ninja(spec, budget_s=1)
    assert not info["finished"] and info["objects_after"] == 1 and info["build_s"] < 25
    assert "run again to resume" in capsys.readouterr().out


def test_a_failed_build_raises_and_prints_ninjas_last_lines(spec, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_NINJA_MODE", "fail")
    with pytest.raises(RuntimeError, match="ninja failed with status 1"):
        jit._run_ninja(spec, budget_s=60)
    assert "no such header" in capsys.readouterr().out


def test_compile_seconds_add_up_over_runs(tmp_path):
    first = {"build_s": 200.0, "objects_before": 0, "objects_after": 20, "finished": False}
    second = {"build_s": 100.5, "objects_before": 20, "objects_after": 32, "finished": True}
    jit._log_jit_time(tmp_path, first)
    jit._log_jit_time(tmp_path, second)
    runs = json.loads((tmp_path / "moe_dispatch_jit_times.json").read_text())
    assert [r["objects_after"] for r in runs] == [20, 32]
    assert second["build_s_all_runs"] == 300.5 and second["runs"] == 2
