"""Coordinate descent over the tile configs of one shape, bucket by bucket.

Per bucket (the configs come from space.py):
    1. default: SGLang's own config for both matmuls (what `triton` runs) -> default_ms
    2. up phase: its steps vary the up config; each candidate runs with the default down
       config at the candidate's block_m (the two matmuls share it); the best is kept
    3. down phase: up fixed to the best; its steps vary the down config at that block_m
    4. confirm (when the best pair is not the default): the default pair and the best pair
       timed side by side in one time_configs call, `confirm_rounds` times, alternating
       which goes first, with `confirm_replays` replays. The steps above compare timings
       taken in different chunks (after compile pauses), which can be off by 15 % for a
       30 us graph; the confirm compares timings taken moments apart.
    5. the tuned pair is stored when the median over the rounds of (tuned ms / default ms)
       is below 1 - `min_gain` and its output matches the reference (`check`); otherwise
       the default pair is stored (honest: tuned == default there). Stored times: default_ms
       and down_ms are the medians of the confirm timings of the default and the tuned pair;
       up_ms (tuned up, default down) is the search's own timing (the confirm does not
       time that pair). With confirm_rounds=0, the search's timings decide and are stored.

Timing is injected: `time_configs(bucket, {label: (up, down)}, replays=None) -> {label:
result}` with result = median ms, or None / an error string for a pair that failed to
compile or capture (recorded, never retried); the search calls it as
`time_configs(bucket, pairs)`, the confirm with `replays=confirm_replays` (None: the
timer's own). Every result goes to the `State` at once, confirm timings as phase
"confirm" per round; what it holds already is not timed again (resume). `Budget` starts
no chunk of timings that its running estimate says would not fit; a bucket cut short is
reported, not stored.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.tune.budget import Budget, OutOfTime, left_text
from bench.tune.space import Point, Space, candidates, default_tile, down_base, steps
from bench.tune.state import Entry, State
from moe_dispatch.tuned_configs import BucketConfig, TileConfig

Pair = tuple[TileConfig, TileConfig]
TimeConfigs = Callable[..., Mapping[str, "float | str | None"]]  # (bucket, pairs, replays=None)
Check = Callable[[int, TileConfig, TileConfig], "str | None"]  # None: matches the reference, else why not


class StopTuning(Exception):
    """Raised by a time_configs that cannot go on (e.g. a broken CUDA context). `results`:
    what it has for the chunk, the culprit included as failed, so a resumed run skips it."""

    def __init__(self, reason: str, results: Mapping[str, float | str | None]) -> None:
        super().__init__(reason)
        self.results = dict(results)


@dataclass(frozen=True)
class Settings:
    space: Space
    min_gain: float = 0.01  # the tuned pair must be this much faster than the default (noise guard)
    chunk: int = 4  # pairs per time_configs call: one graph pool, one state flush, one budget check
    confirm_rounds: int = 3  # side-by-side rounds of default vs tuned (0: the search's timings decide)
    confirm_replays: int | None = None  # replays per pair in a confirm round (None: the timer's own)

    def __post_init__(self) -> None:
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain={self.min_gain}; expected 0 <= min_gain < 1")
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk}; expected >= 1")
        if self.confirm_rounds < 0:
            raise ValueError(f"confirm_rounds={self.confirm_rounds}; expected >= 0")
        if self.confirm_replays is not None and self.confirm_replays < 1:
            raise ValueError(f"confirm_replays={self.confirm_replays}; expected >= 1 (or None)")


@dataclass(frozen=True)
class Outcome:
    """One bucket's result. `config`: what the table stores (None: nothing to store).

    status: "tuned", "default kept" (no pair beat it by min_gain, in the confirm when there
    is one), "check failed" (the winner's output was wrong; default stored), "no config
    ran", "out of time" (the budget ran out; nothing stored), "stopped" (time_configs
    raised StopTuning; nothing stored).
    `default_ms`, `best` / `best_ms`: the search's baseline and the fastest pair it found,
    stored or not. `confirmed`: the median over the confirm rounds of tuned ms / default
    ms (None: no confirm), `confirm_rounds` the rounds it is over. `config` holds the
    times stored (see the module doc).
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
    confirmed: float | None = None
    confirm_rounds: int = 0

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
    confirm_timed: int = 0  # confirm rounds timed in this run
    confirm_reused: int = 0  # confirm rounds read back from the state file


@dataclass(frozen=True)
class Confirmation:
    """The confirm phase of one bucket. `rounds`: (default ms, tuned ms) of each round both
    pairs ran in; `best_failed`: why the tuned pair failed in a round (it is then not stored);
    `skipped`: why rounds without a default time were left out."""

    rounds: tuple[tuple[float, float], ...]
    best_failed: str | None = None
    skipped: tuple[str, ...] = ()

    @property
    def ratio(self) -> float | None:
        """Median over the rounds of tuned ms / default ms (None: no round)."""
        return statistics.median(b / d for d, b in self.rounds) if self.rounds else None

    @property
    def default_ms(self) -> float | None:
        return statistics.median(d for d, _ in self.rounds) if self.rounds else None

    @property
    def best_ms(self) -> float | None:
        return statistics.median(b for _, b in self.rounds) if self.rounds else None


@dataclass(frozen=True)
class SearchContext:
    """What every bucket's search shares: the state key (GPU|Triton|shape), settings, the GPU
    callbacks (time pairs, check a pair against the reference), the state file, the budget,
    and the progress sink with its tag."""

    key: str
    settings: Settings
    time_configs: TimeConfigs
    check: Check
    state: State
    budget: Budget
    say: Callable[[str], None] = print
    tag: str = ""


class BucketSearch:
    """The descent at one bucket; `run()` returns its Outcome (raises OutOfTime mid-way)."""

    def __init__(self, point: Point, ctx: SearchContext) -> None:
        self.point, self.key, self.settings = point, ctx.key, ctx.settings
        self.time_configs, self.check_pair, self.state, self.budget = ctx.time_configs, ctx.check, ctx.state, ctx.budget
        self.say, self.tag = ctx.say, ctx.tag
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
                    f"| {left_text(self.budget)} left"
                )
        return {p: self._lookup(p).ms for p in pairs}  # type: ignore[union-attr]

    def _entry(
        self, phase: str, pair: Pair, result: float | str | None, round: int | None = None, vs: str | None = None
    ) -> Entry:
        ms, error = None, None
        if isinstance(result, (int, float)) and not isinstance(result, bool) and math.isfinite(result) and result > 0:
            ms = float(result)
        else:
            error = result if isinstance(result, str) and result else f"no time ({result!r})"
        return Entry(self.key, self.bucket, phase, pair[0].label(), pair[1].label(), ms, error, round, vs)

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
        confirm: Confirmation | None = None

        def outcome(config: BucketConfig | None, status: str, note: str = "") -> Outcome:
            t = self.tally
            ratio, rounds = (confirm.ratio, len(confirm.rounds)) if confirm else (None, 0)
            return Outcome(
                self.bucket, default, default_ms, best if best_ms else None, best_ms, config, status,
                t.timed, t.reused, t.failed, note, ratio, rounds,
            )  # fmt: skip

        if best_ms is None:
            return outcome(kept, "default kept" if kept else "no config ran", "no tuned pair ran")
        if best == (default, default):
            return outcome(kept, "default kept")
        stored = (up_ms, best_ms, default_ms)
        # When the default cannot run (default_ms None) there is nothing to compare with: the check decides.
        if default_ms is not None and not self.settings.confirm_rounds:
            if not best_ms < default_ms * (1 - self.settings.min_gain):
                return outcome(kept, "default kept")
        elif default_ms is not None:
            confirm = self._confirm((default, default), best)
            if confirm.best_failed is not None:
                return outcome(kept, "default kept", f"the tuned pair failed in the confirm: {confirm.best_failed}")
            if confirm.ratio is None:
                return outcome(kept, "default kept", f"no confirm round timed both pairs: {confirm.skipped[:1]}")
            d, b = confirm.default_ms, confirm.best_ms
            note = f"confirm: tuned/default {confirm.ratio:.3f} (median of {len(confirm.rounds)} rounds)"
            if not confirm.ratio < 1 - self.settings.min_gain:
                self._say(f"{note}: the search's {best_ms / default_ms:.3f} did not hold; storing the default")
                return outcome(BucketConfig(default, default, d, d, d), "default kept", note)
            stored = (up_ms, b, d)
        error = self._checked(*best)
        if error is not None:
            self._say(f"winner {pair_label(*best)} FAILED the reference check: {error}; storing the default")
            return outcome(kept, "check failed", error)
        return outcome(BucketConfig(best[0], best[1], *stored), "tuned")

    # ---- the confirm phase ----

    def _confirm(self, default: Pair, best: Pair) -> Confirmation:
        """Default and best side by side, `confirm_rounds` rounds, alternating which goes first."""
        rounds: list[tuple[float, float]] = []
        skipped: list[str] = []
        total = self.settings.confirm_rounds
        for r in range(total):
            got = self._confirm_round(r, (default, best) if r % 2 == 0 else (best, default))
            d, b = got[default], got[best]
            if b is not None and b.ms is None:
                return Confirmation(tuple(rounds), b.error or "no time", tuple(skipped))
            if d is None or d.ms is None or b is None:  # b is None only when the default failed first
                skipped.append((d.error if d is not None else None) or "no time")
                continue
            rounds.append((d.ms, b.ms))
            self._say(f"confirm {r + 1}/{total}: default {d.ms:.4f} ms, tuned {b.ms:.4f} ms ({b.ms / d.ms:.3f})")
        return Confirmation(tuple(rounds), None, tuple(skipped))

    def _confirm_lookup(self, r: int, pair: Pair, other: Pair) -> Entry | None:
        return self.state.confirm(self.key, self.bucket, pair[0].label(), pair[1].label(), r, pair_label(*other))

    def _confirm_round(self, r: int, order: tuple[Pair, Pair]) -> dict[Pair, Entry | None]:
        """Both pairs' entries of round `r`; timed (both, in `order`) unless the state holds both
        or a failure of either (never retried: a stopped run's culprit; the other is then None)."""
        first, second = order
        others = {first: second, second: first}
        held = {p: self._confirm_lookup(r, p, others[p]) for p in order}
        if all(held.values()) or any(e is not None and e.ms is None for e in held.values()):
            self.tally.confirm_reused += 1
            return held
        if not self.budget.allows(self.bucket, len(order)):
            raise OutOfTime(
                f"bucket {self.bucket} confirm round {r + 1}: needs about "
                f"{self.budget.estimate(self.bucket, len(order)):.0f} s, {self.budget.left():.0f} s left"
            )
        labels = {pair_label(*p): p for p in order}

        def record(results: Mapping[str, float | str | None], missing: str | None) -> None:
            for label, p in labels.items():
                if label in results or missing is not None:
                    result = results.get(label, missing)
                    self.state.record(self._entry("confirm", p, result, round=r, vs=pair_label(*others[p])))

        try:
            results = self.time_configs(self.bucket, labels, replays=self.settings.confirm_replays)
        except StopTuning as stop:  # what it has (the culprit included) is kept; the round is redone whole
            record(stop.results, None)
            raise
        record(results, "time_configs returned no result")
        self.tally.confirm_timed += 1
        return {p: self._confirm_lookup(r, p, others[p]) for p in order}

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


def tune_buckets(points: Sequence[Point], ctx: SearchContext) -> list[Outcome]:
    """One Outcome per point, in order. A bucket the budget cuts short is "out of time";
    later buckets still run as far as the state file (no GPU time) or the budget allows."""
    outcomes: list[Outcome] = []
    stopped: StopTuning | None = None
    for point in points:
        search = BucketSearch(point, ctx)
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
            ctx.say(f"[tune {ctx.tag}] bucket {point.bucket}: {status}: {stop}")
            if isinstance(stop, StopTuning):
                stopped = stop
    return outcomes


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
