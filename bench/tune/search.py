"""Coordinate descent over the tile configs of one shape, bucket by bucket.

Per bucket (the configs come from space.py):
    1. default: SGLang's own config for both matmuls (what `triton` runs) -> default_ms
    2. up phase: its steps vary the up config; each candidate runs with the default down
       config at the candidate's block_m (the two matmuls share it); the best is kept
    3. down phase: up fixed to the best; its steps vary the down config at that block_m
    4. the tuned pair is stored when it beats default_ms by `min_gain` and its output
       matches the reference (`check`); otherwise the default pair is stored (honest:
       tuned == default there)

Timing is injected: `time_configs(bucket, {label: (up, down)}) -> {label: result}` with
result = median ms, or None / an error string for a pair that failed to compile or
capture (recorded, never retried). Every result goes to the `State` at once; points it
holds already are not timed again (resume). `Budget` starts no chunk of timings that its
running estimate says would not fit; a bucket cut short is reported, not stored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.tune.space import Point, Space, candidates, default_tile, down_base, steps
from bench.tune.state import Entry, State
from moe_dispatch.tuned_configs import BucketConfig, TileConfig

Pair = tuple[TileConfig, TileConfig]
TimeConfigs = Callable[[int, Mapping[str, Pair]], Mapping[str, "float | str | None"]]
Check = Callable[[int, TileConfig, TileConfig], "str | None"]  # None: matches the reference, else why not


class OutOfTime(Exception):
    """The time budget leaves no room for the next chunk of timings."""


class StopTuning(Exception):
    """Raised by a time_configs that cannot go on (e.g. a broken CUDA context). `results`:
    what it has for the chunk, the culprit included as failed, so a resumed run skips it."""

    def __init__(self, reason: str, results: Mapping[str, float | str | None]) -> None:
        super().__init__(reason)
        self.results = dict(results)


class Budget:
    """Seconds left, and how long one config takes (running mean per bucket, else overall)."""

    def __init__(
        self,
        seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
        first_estimate_s: float = 2.0,
        start: float | None = None,
    ) -> None:
        """`start`: when the budget began on `clock` (default: now)."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"time budget {seconds!r} s; expected > 0 (or None for no limit)")
        self.clock = clock
        self.deadline = None if seconds is None else (clock() if start is None else start) + seconds
        self.first_estimate_s = first_estimate_s
        self._spent: dict[int, tuple[int, float]] = {}  # bucket -> (configs, seconds)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def estimate(self, bucket: int, configs: int) -> float:
        n, s = self._spent.get(bucket, (0, 0.0))
        if not n:
            n, s = map(sum, zip(*self._spent.values(), strict=True)) if self._spent else (0, 0.0)
        return configs * (s / n if n else self.first_estimate_s)

    def allows(self, bucket: int, configs: int) -> bool:
        return self.estimate(bucket, configs) <= self.left()

    def spent(self, bucket: int, configs: int, seconds: float) -> None:
        n, s = self._spent.get(bucket, (0, 0.0))
        self._spent[bucket] = (n + configs, s + seconds)


@dataclass(frozen=True)
class Settings:
    space: Space
    min_gain: float = 0.01  # the tuned pair must be this much faster than the default (noise guard)
    chunk: int = 4  # pairs per time_configs call: one graph pool, one state flush, one budget check

    def __post_init__(self) -> None:
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain={self.min_gain}; expected 0 <= min_gain < 1")
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk}; expected >= 1")


@dataclass(frozen=True)
class Outcome:
    """One bucket's result. `config`: what the table stores (None: nothing to store).

    status: "tuned", "default kept" (no pair beat it by min_gain), "check failed" (the
    winner's output was wrong; default stored), "no config ran", "out of time" (the budget
    ran out; nothing stored), "stopped" (time_configs raised StopTuning; nothing stored).
    `best` / `best_ms`: the fastest pair found, stored or not.
    """

    bucket: int
    default: TileConfig
    default_ms: float | None
    best: Pair | None
    best_ms: float | None
    config: BucketConfig | None
    status: str
    timed: int
    reused: int
    failed: int
    note: str = ""

    @property
    def stored_ms(self) -> float | None:
        return None if self.config is None else self.config.down_ms


def pair_label(up: TileConfig, down: TileConfig) -> str:
    return BucketConfig(up, down).label()


@dataclass
class _Tally:
    timed: int = 0
    reused: int = 0
    failed: int = 0
    seen: set[str] = field(default_factory=set)


class BucketSearch:
    """The descent at one bucket; `run()` returns its Outcome (raises OutOfTime mid-way)."""

    def __init__(
        self,
        point: Point,
        key: str,
        settings: Settings,
        time_configs: TimeConfigs,
        check: Check,
        state: State,
        budget: Budget,
        say: Callable[[str], None],
        tag: str,
    ) -> None:
        self.point, self.key, self.settings = point, key, settings
        self.time_configs, self.check_pair, self.state, self.budget = time_configs, check, state, budget
        self.say, self.tag = say, tag
        self.tally = _Tally()

    @property
    def bucket(self) -> int:
        return self.point.bucket

    # ---- timing through the state file ----

    def _lookup(self, pair: Pair) -> Entry | None:
        return self.state.point(self.key, self.bucket, pair[0].label(), pair[1].label())

    def evaluate(self, phase: str, step: str, pairs: Sequence[Pair], best: float | None) -> dict[Pair, float | None]:
        """ms (None: failed) of each pair, timing only those the state does not hold."""
        pairs = list(dict.fromkeys(pairs))
        todo = [p for p in pairs if self._lookup(p) is None]
        reused = [p for p in pairs if p not in todo and pair_label(*p) not in self.tally.seen]
        if reused:
            self.tally.reused += len(reused)
            self._say(f"{phase} {step}: {len(reused)} of {len(pairs)} pair(s) from the state file")
        for p in pairs:
            self.tally.seen.add(pair_label(*p))
        size = self.settings.chunk
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            if not self.budget.allows(self.bucket, len(chunk)):
                raise OutOfTime(
                    f"bucket {self.bucket} {phase} {step}: {len(chunk)} more config(s) need about "
                    f"{self.budget.estimate(self.bucket, len(chunk)):.0f} s, {self.budget.left():.0f} s left"
                )
            began = self.budget.clock()
            try:
                results = self.time_configs(self.bucket, {pair_label(*p): p for p in chunk})
            except StopTuning as stop:
                for p in chunk:
                    if pair_label(*p) in stop.results:
                        self.state.record(self._entry(phase, p, stop.results[pair_label(*p)]))
                raise
            self.budget.spent(self.bucket, len(chunk), self.budget.clock() - began)
            for i, p in enumerate(chunk, start + 1):
                entry = self._entry(phase, p, results.get(pair_label(*p), "time_configs returned no result"))
                self.state.record(entry)
                self.tally.timed += 1
                self.tally.failed += entry.ms is None
                if entry.ms is not None and (best is None or entry.ms < best):
                    best = entry.ms
                varied = p[1] if phase == "down" else p[0]
                got = f"{entry.ms:.4f} ms" if entry.ms is not None else f"FAILED ({(entry.error or '')[:80]})"
                self._say(
                    f"{phase} {step} {i}/{len(todo)} {varied.label()} {got} (best {_ms(best)}) "
                    f"| {_left(self.budget)} left"
                )
        return {p: self._lookup(p).ms for p in pairs}  # type: ignore[union-attr]

    def _entry(self, phase: str, pair: Pair, result: float | str | None) -> Entry:
        ms, error = None, None
        if isinstance(result, (int, float)) and not isinstance(result, bool) and math.isfinite(result) and result > 0:
            ms = float(result)
        else:
            error = result if isinstance(result, str) and result else f"no time ({result!r})"
        return Entry(self.key, self.bucket, phase, pair[0].label(), pair[1].label(), ms, error)

    def _say(self, text: str) -> None:
        self.say(f"[tune {self.tag}] bucket {self.bucket} {text}")

    # ---- the descent ----

    def _descend(
        self, phase: str, start: TileConfig, pair: Callable[[TileConfig], Pair], best_ms: float | None
    ) -> tuple[TileConfig, float | None]:
        """The best tile of the phase from `start` (whose pair took `best_ms`) and its time."""
        best = start
        for step in steps(self.settings.space, self.point, phase):
            tiles = [best, *candidates(self.settings.space, self.point, phase, step, best)]
            times = self.evaluate(phase, step, [pair(t) for t in tiles], best_ms)
            for tile in tiles:
                ms = times[pair(tile)]
                if ms is not None and (best_ms is None or ms < best_ms):
                    best, best_ms = tile, ms
        return best, best_ms

    def run(self) -> Outcome:
        default = default_tile(self.bucket, self.point.num_experts)
        default_ms = self.evaluate("default", "baseline", [(default, default)], None)[(default, default)]
        # Each phase starts from a pair timed already: the baseline (down_base(default, its own
        # block_m) is the default), then the up phase's winner.
        up, up_ms = self._descend("up", default, lambda t: (t, down_base(default, t.block_m)), default_ms)
        down, down_ms = self._descend("down", down_base(default, up.block_m), lambda t: (up, t), up_ms)
        return self._decide(default, default_ms, (up, down), down_ms, up_ms)

    def _decide(
        self, default: TileConfig, default_ms: float | None, best: Pair, best_ms: float | None, up_ms: float | None
    ) -> Outcome:
        kept = BucketConfig(default, default, default_ms, default_ms, default_ms) if default_ms else None

        def outcome(config: BucketConfig | None, status: str, note: str = "") -> Outcome:
            t = self.tally
            return Outcome(
                self.bucket, default, default_ms, best if best_ms else None, best_ms, config, status,
                t.timed, t.reused, t.failed, note,
            )  # fmt: skip

        if best_ms is None:
            return outcome(kept, "default kept" if kept else "no config ran", "no tuned pair ran")
        if best == (default, default) or (
            default_ms is not None and not best_ms < default_ms * (1 - self.settings.min_gain)
        ):
            return outcome(kept, "default kept")
        error = self._checked(*best)
        if error is not None:
            self._say(f"winner {pair_label(*best)} FAILED the reference check: {error}; storing the default")
            return outcome(kept, "check failed", error)
        return outcome(BucketConfig(best[0], best[1], up_ms, best_ms, default_ms), "tuned")

    def _checked(self, up: TileConfig, down: TileConfig) -> str | None:
        """The reference check of the winner, from the state file when done before."""
        done = self.state.check(self.key, self.bucket, up.label(), down.label())
        if done is not None:
            return done.error
        if not self.budget.allows(self.bucket, 1):
            raise OutOfTime(f"bucket {self.bucket}: no time left to check the winner against the reference")
        began = self.budget.clock()
        error = self.check_pair(self.bucket, up, down)
        self.budget.spent(self.bucket, 1, self.budget.clock() - began)
        self.state.record(Entry(self.key, self.bucket, "check", up.label(), down.label(), None, error))
        return error


def tune_buckets(
    points: Sequence[Point],
    key: str,
    settings: Settings,
    time_configs: TimeConfigs,
    check: Check,
    state: State,
    budget: Budget,
    say: Callable[[str], None] = print,
    tag: str = "",
) -> list[Outcome]:
    """One Outcome per point, in order. A bucket the budget cuts short is "out of time";
    later buckets still run as far as the state file (no GPU time) or the budget allows."""
    outcomes: list[Outcome] = []
    stopped: StopTuning | None = None
    for point in points:
        search = BucketSearch(point, key, settings, time_configs, check, state, budget, say, tag)
        default = default_tile(point.bucket, point.num_experts)
        t = search.tally
        if stopped is not None:
            outcomes.append(Outcome(point.bucket, default, None, None, None, None, "stopped", 0, 0, 0, str(stopped)))
            continue
        try:
            outcomes.append(search.run())
        except (OutOfTime, StopTuning) as stop:
            status = "out of time" if isinstance(stop, OutOfTime) else "stopped"
            outcomes.append(
                Outcome(point.bucket, default, None, None, None, None, status, t.timed, t.reused, t.failed, str(stop))
            )
            say(f"[tune {tag}] bucket {point.bucket}: {status}: {stop}")
            if isinstance(stop, StopTuning):
                stopped = stop
    return outcomes


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _left(budget: Budget) -> str:
    left = budget.left()
    return "no limit" if math.isinf(left) else f"{max(0.0, left):.0f} s"


class _Planner(BucketSearch):
    """A search whose every pair takes 1 ms: the steps and counts of a run where nothing
    beats the starting config (a dry run: no GPU, no state written)."""

    def __init__(self, point: Point, settings: Settings) -> None:
        super().__init__(point, "plan", settings, _no_timer, _no_check, State(None), Budget(None), _quiet, "plan")
        self.steps: list[tuple[str, str, int]] = []
        self._planned: set[Pair] = set()

    def evaluate(self, phase: str, step: str, pairs: Sequence[Pair], best: float | None) -> dict[Pair, float | None]:
        new = [p for p in dict.fromkeys(pairs) if p not in self._planned]
        self._planned.update(new)
        self.steps.append((phase, step, len(new)))
        return dict.fromkeys(pairs, 1.0)


def plan_bucket(point: Point, settings: Settings) -> list[tuple[str, str, int]]:
    """(phase, step, configs timed) of the search at `point`, assuming no candidate beats its start."""
    planner = _Planner(point, settings)
    planner.run()
    return planner.steps


def _no_timer(bucket: int, pairs: Mapping[str, Pair]) -> dict[str, float | str | None]:
    raise AssertionError("the planner times nothing")


def _no_check(bucket: int, up: TileConfig, down: TileConfig) -> str | None:
    raise AssertionError("the planner checks nothing")


def _quiet(line: str) -> None:
    pass
