"""Capture every candidate variant per bucket, time the replays, agree across ranks, pick the fastest.

The one capture-and-time path of the project: `BucketedGraphs` (the standalone module,
which then keeps or re-captures the winners) and the SGLang plugin (which keeps only
the choice and lets SGLang capture the winner once) both call `measure_buckets`.

    for each bucket, largest first (smaller graphs reuse the pool's freed blocks):
        for each candidate: capture(fn, static_inputs[:bucket]) into `pool`  (capture.py)
        -> time the candidates' replays against each other, interleaved in rounds
           (timing.time_interleaved: a clock that drifts or dips weighs on every candidate alike)
    -> agree_across_ranks: element-wise MAX of every rank's table           (selection.py)
    -> pick_fastest per bucket; `choose` {bucket: variant} skips measuring a bucket

The returned `Measurement` holds the captured graphs; dropping it (and calling
`torch.cuda.empty_cache()`) gives their pool back to the device.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from graphs.capture import CapturedGraph, CaptureError, capture
from graphs.ranges import RangeNamer, no_ranges
from graphs.selection import agree_across_ranks, margin, pick_fastest
from graphs.timing import ReplayStats, time_interleaved


@dataclass(frozen=True)
class BucketResult:
    """What measurement decided for one bucket.

    `timings_ms` holds this rank's replay times, empty when the variant was chosen (not
    measured); `winner` and `margin` (runner-up / winner, None when chosen) come from the
    cross-rank table, so they match on every rank. `seconds` is wall time to capture and
    measure the bucket; `dropped` maps variants whose capture failed to the error.
    """

    bucket: int
    winner: str
    timings_ms: dict[str, ReplayStats]
    margin: float | None
    seconds: float
    dropped: dict[str, str]


@dataclass(frozen=True)
class Measurement:
    """`measure_buckets`' outcome: one result per bucket (ascending) and the graphs captured for it.

    `graphs[bucket][variant]` lives in the pool the caller passed; it stays allocated as
    long as this object (or the caller's copy of a graph) does.
    """

    results: tuple[BucketResult, ...]
    graphs: dict[int, dict[str, CapturedGraph]]
    seconds: float

    def winners(self) -> dict[int, str]:
        """{bucket: winning variant}, ascending bucket order."""
        return {r.bucket: r.winner for r in self.results}


@dataclass(frozen=True)
class TimingPlan:
    """How a bucket's variants are timed: `replays` timed replays each (median kept), spread over
    `rounds` interleaved rounds, each round after `warmup` untimed replays."""

    warmup: int = 10
    replays: int = 100
    rounds: int = 4

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup_replays={self.warmup}; expected >= 0")
        if self.replays < 1:
            raise ValueError(f"timed_replays={self.replays}; expected >= 1")
        if self.rounds < 1:
            raise ValueError(f"timing rounds={self.rounds}; expected >= 1")


def check_rows(name: str, bucket: int, out: torch.Tensor) -> None:
    """ValueError unless `out` has one leading row per input row of `bucket`."""
    if out.dim() == 0 or out.shape[0] != bucket:
        raise ValueError(
            f"variant {name!r} returned shape {tuple(out.shape)} at bucket {bucket}; expected "
            f"{bucket} leading rows (one output row per input row)"
        )


def measure_buckets(
    variants: Mapping[str, Callable[..., torch.Tensor]],
    static_inputs: Sequence[torch.Tensor],
    buckets: Sequence[int],
    pool: tuple[int, int],
    stream: torch.cuda.Stream,
    choose: Mapping[int, str] | None = None,
    timing: TimingPlan | Callable[[int], TimingPlan] = TimingPlan(),
    ranges: RangeNamer = no_ranges,
    progress: Callable[[str], None] | None = None,
    group: object = None,
    eligible: Callable[[str, int], bool] | None = None,
) -> Measurement:
    """Capture each bucket's candidates into `pool`, time the unchosen buckets, select per bucket.

    variants: name -> fn(*inputs) -> Tensor with one output row per input row.
    static_inputs: CUDA tensors [>= max(buckets), ...]; bucket b's graphs read t[:b].
    timing: one TimingPlan, or bucket -> TimingPlan (fewer replays for long graphs).
    eligible: (variant, bucket) -> whether the variant is a candidate there (default: all are);
        it must answer alike on every rank.
    Collective when torch.distributed is initialized: every rank of `group` must call it
    with the same buckets, variants and `choose`. Raises RuntimeError when a bucket is
    left with no variant that captured (on every rank).
    """
    chosen = dict(choose or {})
    plan_for = timing if callable(timing) else (lambda _bucket: timing)
    start = time.perf_counter()
    order = [
        (b, (chosen[b],) if b in chosen else candidates(variants, b, eligible)) for b in sorted(buckets, reverse=True)
    ]
    total = sum(len(names) for _, names in order)
    steps = iter(range(1, total + 1))  # one progress step per (bucket, variant)
    measured: dict[int, _Measured] = {}
    for b, names in order:
        measured[b] = _capture_bucket(
            variants,
            static_inputs,
            b,
            names,
            b not in chosen,
            pool,
            stream,
            plan_for(b),
            ranges,
            progress,
            steps,
            total,
        )
    # Every rank reaches this collective, even one whose captures all failed, so none is left waiting.
    local = {b: {n: s.median_ms for n, s in m.stats.items()} for b, m in measured.items() if b not in chosen}
    agreed = agree_across_ranks(local, list(variants), group)
    results = _select(sorted(buckets), measured, chosen, agreed)
    graphs = {b: m.graphs for b, m in measured.items()}
    return Measurement(tuple(results), graphs, time.perf_counter() - start)


def candidates(
    variants: Mapping[str, object], bucket: int, eligible: Callable[[str, int], bool] | None
) -> tuple[str, ...]:
    """The variants eligible at `bucket`, in order; ValueError when there is none."""
    names = tuple(n for n in variants if eligible is None or eligible(n, bucket))
    if not names:
        raise ValueError(f"no variant of {sorted(variants)} is eligible at bucket {bucket}")
    return names


@dataclass(frozen=True)
class _Measured:
    """One bucket's local capture results, before cross-rank selection."""

    graphs: dict[str, CapturedGraph]
    stats: dict[str, ReplayStats]
    dropped: dict[str, str]
    seconds: float


def _capture_bucket(
    variants: Mapping[str, Callable[..., torch.Tensor]],
    static_inputs: Sequence[torch.Tensor],
    bucket: int,
    names: tuple[str, ...],
    timed: bool,
    pool: tuple[int, int],
    stream: torch.cuda.Stream,
    timing: TimingPlan,
    ranges: RangeNamer,
    progress: Callable[[str], None] | None,
    steps: Iterator[int],
    total: int,
) -> _Measured:
    start = time.perf_counter()
    args = tuple(t[:bucket] for t in static_inputs)
    graphs: dict[str, CapturedGraph] = {}
    dropped: dict[str, str] = {}
    prefixes = {name: f"[{next(steps)}/{total}] bs={bucket} {name}" for name in names}
    for name in names:
        try:
            with ranges("capture", bucket, name):
                captured = capture(variants[name], args, pool, stream)
        except CaptureError as exc:
            dropped[name] = str(exc)
            warnings.warn(f"dropping variant {name!r} at bucket {bucket}: {exc}", RuntimeWarning, stacklevel=4)
            _say(progress, f"{prefixes[name]}: dropped ({exc})")
            continue
        check_rows(name, bucket, captured.output)
        graphs[name] = captured
        if not timed:
            _say(progress, f"{prefixes[name]}: captured (chosen, not timed)")
    stats: dict[str, ReplayStats] = {}
    if timed and graphs:
        replays = {name: RangedReplay(g.graph, ranges, bucket, name) for name, g in graphs.items()}
        stats = time_interleaved(replays, timing.warmup, timing.replays, timing.rounds)
        for name, s in stats.items():
            _say(progress, f"{prefixes[name]}: {s.median_ms:.3f} ms")
    return _Measured(graphs, stats, dropped, time.perf_counter() - start)


@dataclass(frozen=True)
class RangedReplay:
    """One replay of `graph` inside the caller's "measure" range for (bucket, variant)."""

    graph: torch.cuda.CUDAGraph
    ranges: RangeNamer
    bucket: int
    variant: str

    def __call__(self) -> None:
        with self.ranges("measure", self.bucket, self.variant):
            self.graph.replay()


def _select(
    buckets: list[int],
    measured: Mapping[int, _Measured],
    chosen: Mapping[int, str],
    agreed: Mapping[int, Mapping[str, float]],
) -> list[BucketResult]:
    """One BucketResult per bucket, ascending: the chosen variant, or the fastest in the cross-rank table."""
    results = []
    for b in buckets:
        m = measured[b]
        if b in chosen:
            winner, gap = chosen[b], None
            if winner not in m.graphs:
                raise RuntimeError(f"bucket {b}: chosen variant {winner!r} failed to capture: {m.dropped[winner]}")
        else:
            row = agreed[b]
            if not row:
                raise RuntimeError(_no_variant_left(b, m))
            winner = pick_fastest(row)
            gap = margin(row, winner)
        assert winner in m.graphs, (b, winner, sorted(m.graphs))
        results.append(BucketResult(b, winner, m.stats, gap, m.seconds, m.dropped))
    return results


def _no_variant_left(bucket: int, m: _Measured) -> str:
    if not m.graphs:
        errors = "; ".join(f"{name}: {error}" for name, error in m.dropped.items())
        return f"bucket {bucket}: every variant failed to capture: {errors}"
    return f"bucket {bucket}: variants {sorted(m.graphs)} captured on this rank, but each failed on another rank"


def _say(progress: Callable[[str], None] | None, line: str) -> None:
    if progress is not None:
        progress(line)
