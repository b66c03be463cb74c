"""Timing of CUDA-graph replays and eager calls with CUDA events, and their summary statistics.

Each replay (or call) gets its own pair of events so the spread (p20/p80) is real,
not an average smeared over a loop. The host synchronizes once, after the last pair,
so the timed launches queue back to back as they would in serving.

A queue only forms when the host launches faster than the GPU runs. A ~15 us graph
replayed through a dispatch call whose Python takes longer starves the GPU: each start
event fires at once and the GPU then waits for the launch, so host time would be read as
GPU time. So the timed launches sit behind a GPU-side wait (`torch.cuda._sleep`) long
enough for the host to enqueue them all (`hold_ms`, from the host's measured enqueue
rate during warm-up); the GPU then runs them back to back, as inside a model's graph.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from graphs.capture import require_cuda


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default "linear" method).

    The q-th percentile sits at position q * (n - 1) of the sorted samples; between
    two samples it is interpolated. So p50 of an even count is the mean of the middle two.
    """
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class ReplayStats:
    """Summary of per-replay times in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int

    @staticmethod
    def from_samples(samples_ms: Sequence[float]) -> ReplayStats:
        """Summarize raw times (ms); percentiles by linear interpolation (see `_percentile`)."""
        if len(samples_ms) == 0:
            raise ValueError("samples_ms is empty; expected at least one time in ms")
        ordered = sorted(float(s) for s in samples_ms)
        bad = [s for s in ordered if not math.isfinite(s)]
        if bad:
            raise ValueError(f"samples_ms holds non-finite times {bad[:3]}; expected finite ms")
        return ReplayStats(
            median_ms=_percentile(ordered, 0.5),
            p20_ms=_percentile(ordered, 0.2),
            p80_ms=_percentile(ordered, 0.8),
            samples=len(ordered),
        )

    def to_json(self) -> dict[str, float | int]:
        """A JSON-ready dict (embeddable in a larger document such as a plan file)."""
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping[str, object]) -> ReplayStats:
        """Inverse of `to_json`; ValueError on missing keys or non-numeric values."""
        missing = [k for k in ("median_ms", "p20_ms", "p80_ms", "samples") if k not in data]
        if missing:
            raise ValueError(f"ReplayStats JSON {dict(data)!r} lacks keys {missing}")
        values = {}
        for key in ("median_ms", "p20_ms", "p80_ms"):
            v = data[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"ReplayStats JSON {key}={v!r}; expected a number of ms")
            values[key] = float(v)
        n = data["samples"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"ReplayStats JSON samples={n!r}; expected an int >= 1")
        return ReplayStats(samples=n, **values)


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0:
        raise ValueError(f"warmup={warmup}; expected >= 0")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; expected >= 1")


HOST_US_UNKNOWN = 50.0  # assumed host cost per call (us) when no warm-up measured it
HOLD_CAP_MS = 50.0  # the GPU-side wait never exceeds this (a host slower than that is not hidden)


def hold_ms(host_us_per_call: float, repeats: int) -> float:
    """GPU-side wait (ms) that lets the host enqueue `repeats` calls (plus their events) before the
    first timed one runs: 1.5x the measured host rate plus 0.2 ms, capped at HOLD_CAP_MS."""
    if not math.isfinite(host_us_per_call) or host_us_per_call < 0:
        raise ValueError(f"host_us_per_call={host_us_per_call}; expected a finite time >= 0")
    return min(HOLD_CAP_MS, 0.2 + 1.5 * host_us_per_call * repeats / 1e3)


_cycles_per_ms: dict[int, float] = {}


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles of `torch.cuda._sleep` per ms on the current device (measured once)."""
    device = torch.cuda.current_device()
    if device not in _cycles_per_ms:
        cycles = 1_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)  # first call loads the kernel
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _cycles_per_ms[device] = cycles / max(start.elapsed_time(end), 1e-3)
    return _cycles_per_ms[device]


def _samples_on_current_stream(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    began = time.perf_counter()
    for _ in range(warmup):
        fn()
    host_us = (time.perf_counter() - began) * 1e6 / warmup if warmup else HOST_US_UNKNOWN
    # Events are made up front so creating them is not inside the timed region.
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    cycles_per_ms = _sleep_cycles_per_ms()
    torch.cuda._sleep(int(hold_ms(host_us, repeats) * cycles_per_ms))
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def _time_on_current_stream(fn: Callable[[], object], warmup: int, repeats: int) -> ReplayStats:
    return ReplayStats.from_samples(_samples_on_current_stream(fn, warmup, repeats))


def time_replays(graph: torch.cuda.CUDAGraph, warmup: int = 10, replays: int = 100) -> ReplayStats:
    """Replay `graph` `warmup` times, then time `replays` replays, one event pair each."""
    require_cuda("time_replays")
    _check_counts(warmup, replays)
    return _time_on_current_stream(graph.replay, warmup, replays)


def time_callable(fn: Callable[[], object], warmup: int = 10, repeats: int = 100) -> ReplayStats:
    """Eager counterpart of `time_replays`: times `fn()` (launch overhead included, as eager runs)."""
    require_cuda("time_callable")
    _check_counts(warmup, repeats)
    return _time_on_current_stream(fn, warmup, repeats)


def interleaved_order(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Each round's order of `names`: forward in even rounds, backward in odd ones, so a slow drift
    of the clock (a card heating up over a long run) weighs on every name alike."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}; expected >= 1")
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], warmup: int = 10, repeats: int = 100, rounds: int = 4
) -> dict[str, ReplayStats]:
    """Time several callables against each other: `rounds` rounds, each timing every callable for
    its share of `repeats` (one event pair per call, as `time_callable`), in `interleaved_order`;
    each callable's samples from all rounds are summarized together."""
    require_cuda("time_interleaved")
    _check_counts(warmup, repeats)
    per_round = max(1, math.ceil(repeats / rounds))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for order in interleaved_order(list(fns), rounds):
        for name in order:
            samples[name] += _samples_on_current_stream(fns[name], warmup, per_round)
    return {name: ReplayStats.from_samples(s) for name, s in samples.items()}
