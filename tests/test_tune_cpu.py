"""CPU tests of bench.tune: config spaces, the descent and confirm with a fake timer, resume, budget,
CLI, report, tables rebuilt from a report."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from bench.tune import report
from bench.tune.__main__ import DEFAULT_BUCKETS, main, parse_args
from bench.tune.plan import plan_bucket
from bench.tune.search import (
    Budget,
    Outcome,
    SearchContext,
    Settings,
    StopTuning,
    pair_label,
    tune_buckets,
)
from bench.tune.space import (
    SPACES,
    Limits,
    Point,
    block_m_choices,
    candidates,
    default_tile,
    get_space,
    grouping_matters,
    smem_bytes,
    steps,
    unfit,
)
from bench.tune.state import Entry, State
from bench.tune.tables import parse_label, store, tables_from_report
from moe_dispatch.spec import preset
from moe_dispatch.tuned_configs import (
    BucketConfig,
    TileConfig,
    TunedKey,
    TunedTable,
    find_table,
    load_table,
    save_table,
    shape_key,
    table_path,
)

TP8 = preset("gpt-oss-120b", tp=8)  # E=128, k=4, H=2880, I=360
TP2 = preset("gpt-oss-120b", tp=2)
SMALL = Settings(SPACES["small"])
KEY = "GPU|3.6.0|shape"


def tile(label_fields: str) -> TileConfig:
    """'16,64,128,1,4,3' -> TileConfig."""
    return TileConfig(*map(int, label_fields.split(",")))


# ---- space ----


def test_default_tile_is_sglangs_bf16_default():
    assert default_tile(1, 128).label() == "m16n32k64g1w4s3"
    assert default_tile(128, 128).label() == "m16n32k64g1w4s3"  # M <= E
    assert default_tile(129, 128).label() == "m64n64k32g8w4s3"


@pytest.mark.parametrize(
    "bucket, expected",
    [(1, (16,)), (32, (16,)), (256, (16,)), (512, (16, 32)), (1024, (16, 32, 64)), (2048, (16, 32, 64, 128))],
)
def test_block_m_rule_per_bucket(bucket, expected):
    # rows per expert = bucket * 4 / 128; block_m > 16 only when block_m <= 2 * rows
    assert block_m_choices(Point.of(TP8, bucket)) == expected


def test_grouping_only_when_an_expert_spans_several_blocks():
    assert not grouping_matters(Point.of(TP8, 64), 16)  # 2 rows per expert
    assert grouping_matters(Point.of(TP8, 8192), 64)  # 256 rows per expert


def test_shared_memory_filter():
    big = tile("16,256,256,1,4,3")
    assert smem_bytes(big) == (16 * 256 + 256 * 256) * 2 * 3
    point = Point.of(TP8, 1, Limits(200 * 1024))
    assert "shared memory" in unfit(big, point, "up")
    assert unfit(big, Point.of(TP8, 1, Limits(1 << 20)), "up") is None
    assert "accumulators" in unfit(tile("128,256,64,1,4,2"), point, "up")
    tiny = dataclasses.replace(TP8, hidden_size=64, intermediate_size=32)
    assert "exceeds the GEMM" in unfit(tile("16,128,64,1,4,3"), Point.of(tiny, 1), "down")  # N = H = 64
    for space in SPACES.values():
        for phase in ("up", "down"):
            for step in steps(space, Point.of(TP8, 8192), phase):
                for t in candidates(space, Point.of(TP8, 8192), phase, step, default_tile(8192, 128)):
                    assert smem_bytes(t) <= 200 * 1024


def test_space_sizes_small_and_full():
    point = Point.of(TP8, 1)
    start = default_tile(1, 128)
    small, full = SPACES["small"], SPACES["full"]
    assert steps(small, point, "up") == ("tiles", "launch")
    assert steps(small, Point.of(TP8, 2048), "up") == ("block_m", "tiles", "launch")
    assert steps(small, Point.of(TP8, 2048), "down") == ("tiles", "launch")
    assert steps(full, Point.of(TP8, 2048), "up") == ("tiles", "launch")
    tiles = candidates(small, point, "up", "tiles", start)
    assert 6 <= len(tiles) <= 12 and {t.block_m for t in tiles} == {16}
    assert {(t.num_warps, t.num_stages) for t in tiles} == {(4, 3)}
    launch = candidates(small, point, "up", "launch", start)
    assert len(launch) <= 8 and {(t.block_n, t.block_k) for t in launch} == {(32, 64)}
    probe = candidates(small, Point.of(TP8, 2048), "up", "block_m", default_tile(2048, 128))
    assert {t.block_m for t in probe} == {16, 32, 64, 128} and len(probe) == 8
    assert len(candidates(full, Point.of(TP8, 2048), "up", "tiles", start)) > 3 * len(tiles)
    with pytest.raises(ValueError, match="unknown step"):
        candidates(small, point, "up", "warp", start)
    with pytest.raises(ValueError, match="unknown phase"):
        steps(small, point, "sideways")
    with pytest.raises(ValueError, match="unknown search space 'huge'"):
        get_space("huge")


@pytest.mark.parametrize("spec", [TP8, TP2, preset("qwen3-30b-a3b"), preset("mixtral-8x7b", tp=8)])
def test_small_space_times_at_most_24_configs_per_phase(spec):
    for bucket in DEFAULT_BUCKETS:
        plan = plan_bucket(Point.of(spec, bucket), SMALL)
        assert plan[0] == ("default", "baseline", 1) and plan[-1] == ("confirm", "rounds", 6)
        for phase in ("up", "down"):
            assert 0 < sum(n for ph, _, n in plan if ph == phase) <= 24, (spec.name, bucket, plan)


def test_down_candidates_keep_block_m():
    point = Point.of(TP8, 4096)
    for space in SPACES.values():
        best = tile("64,128,64,8,4,3")
        for step in steps(space, point, "down"):
            assert {t.block_m for t in candidates(space, point, "down", step, best)} == {64}


# ---- search with a fake timer ----


class FakeTimer:
    """ms = cost(up) + cost(down); advances a fake clock by `seconds` per config; records every call:
    the search's in `calls`, the confirm's (those with `replays`) in `confirms` as (replays, pairs)."""

    def __init__(self, up_best: TileConfig, down_best: TileConfig, fail=(), seconds: float = 1.0):
        self.up_best, self.down_best, self.fail, self.seconds = up_best, down_best, set(fail), seconds
        self.calls: list[dict] = []
        self.confirms: list[tuple[int | None, dict]] = []
        self.now = 0.0

    @staticmethod
    def cost(t: TileConfig, best: TileConfig) -> float:
        fields = dataclasses.fields(TileConfig)
        return 0.01 + 0.002 * sum(getattr(t, f.name) != getattr(best, f.name) for f in fields)

    def __call__(self, bucket, pairs, **kwargs):
        if kwargs:
            assert set(kwargs) == {"replays"}, kwargs
            self.confirms.append((kwargs["replays"], dict(pairs)))
        else:
            self.calls.append(dict(pairs))
        self.now += self.seconds * len(pairs)
        out = {}
        for label, (up, down) in pairs.items():
            assert up.block_m == down.block_m, label
            if up.label() in self.fail or down.label() in self.fail:
                out[label] = f"OutOfResources: {up.label()}"
            else:
                out[label] = self.cost(up, self.up_best) + self.cost(down, self.down_best)
        return out

    def labels(self) -> set[str]:
        return {label for call in self.calls for label in call}


def run(points, timer, state=None, budget=None, check=lambda b, u, d: None, settings=SMALL):
    state = state if state is not None else State(None)
    budget = budget or Budget(None, clock=lambda: timer.now)
    return tune_buckets(points, SearchContext(KEY, settings, timer, check, state, budget, lambda line: None, "t"))


def test_descent_finds_planted_optimum_up_then_down():
    up, down = tile("16,128,128,1,8,4"), tile("16,256,64,1,4,2")
    timer = FakeTimer(up, down)
    (o,) = run([Point.of(TP8, 8)], timer)
    assert o.status == "tuned" and o.config.up == up and o.config.down == down
    assert o.config.down_ms == pytest.approx(0.02) and o.config.default_ms > o.config.down_ms
    assert o.config.up_ms > o.config.down_ms  # up_ms: tuned up with the default down
    assert o.timed == len(timer.labels()) and o.failed == 0


def test_descent_picks_block_m_and_keeps_it_for_down():
    up, down = tile("64,128,64,8,8,3"), tile("64,64,128,8,4,4")
    timer = FakeTimer(up, down)
    (o,) = run([Point.of(TP8, 4096)], timer)
    assert o.config.up == up and o.config.down == down
    assert all(u.block_m == d.block_m for call in timer.calls for u, d in call.values())


def test_default_is_stored_when_nothing_beats_it():
    default = default_tile(8, 128)
    timer = FakeTimer(default, default)  # the default is the optimum
    (o,) = run([Point.of(TP8, 8)], timer)
    assert o.status == "default kept"
    assert o.config == BucketConfig(default, default, o.default_ms, o.default_ms, o.default_ms)
    # a winner only 0.5 % faster than the default is noise under min_gain=1 %
    timer = FakeTimer(tile("16,64,64,1,4,3"), default)
    timer.cost = lambda t, best: 1.0 - 0.005 * (t == best)  # type: ignore[method-assign]
    (o,) = run([Point.of(TP8, 8)], timer)
    assert o.status == "default kept" and o.best_ms < o.default_ms


def test_failed_configs_are_recorded_and_never_retried(tmp_path):
    bad = tile("16,64,128,1,4,3")
    state = State(tmp_path / "state.jsonl")
    timer = FakeTimer(tile("16,128,128,1,8,4"), tile("16,256,64,1,4,2"), fail={bad.label()})
    (o,) = run([Point.of(TP8, 8)], timer, state=state)
    assert o.failed >= 1 and o.status == "tuned"
    lines = [json.loads(x) for x in (tmp_path / "state.jsonl").read_text().splitlines()]
    failed = [x for x in lines if x["ms"] is None and x["phase"] != "check"]
    assert failed and all("OutOfResources" in x["error"] for x in failed) and failed[0]["up"] == bad.label()
    again = FakeTimer(timer.up_best, timer.down_best)  # would now succeed: it must not be asked
    (o2,) = run([Point.of(TP8, 8)], again, state=State(tmp_path / "state.jsonl"))
    assert again.calls == [] and again.confirms == [] and o2.config == o.config and o2.reused == o.timed


def test_resume_times_only_missing_points(tmp_path):
    path = tmp_path / "state.jsonl"
    up, down = tile("16,128,128,1,8,4"), tile("16,256,64,1,4,2")
    full = FakeTimer(up, down)
    (reference,) = run([Point.of(TP8, 8)], full)
    first = FakeTimer(up, down)
    (cut,) = run([Point.of(TP8, 8)], first, state=State(path), budget=Budget(9, clock=lambda: first.now))
    assert cut.status == "out of time" and cut.config is None and 0 < len(first.labels()) < len(full.labels())
    second = FakeTimer(up, down)
    (resumed,) = run([Point.of(TP8, 8)], second, state=State(path))
    assert not (first.labels() & second.labels())  # nothing timed twice
    assert first.labels() | second.labels() == full.labels()
    assert resumed.config == reference.config and resumed.reused == len(first.labels())


def test_budget_stops_early_and_returns_the_buckets_done():
    default = default_tile(1, 128)
    per_bucket = sum(n for phase, _, n in plan_bucket(Point.of(TP8, 1), SMALL) if phase != "confirm")
    timer = FakeTimer(default, default)  # ties everywhere: the run follows plan_bucket exactly
    budget = Budget(per_bucket + 0.5, clock=lambda: timer.now, first_estimate_s=1.0)
    outcomes = run([Point.of(TP8, b) for b in (1, 2, 4)], timer, budget=budget)
    assert [o.status for o in outcomes] == ["default kept", "out of time", "out of time"]
    assert outcomes[0].config is not None and outcomes[1].config is None
    assert len(timer.labels()) == per_bucket and "left" in outcomes[1].note


def test_check_failure_stores_the_default_and_is_remembered(tmp_path):
    path = tmp_path / "state.jsonl"
    checks = []

    def check(bucket, up, down):
        checks.append((bucket, up, down))
        return "rms_rel=1.0e+00 max_rel=2.0e+00 exceeds tolerance"

    timer = FakeTimer(tile("16,128,128,1,8,4"), tile("16,256,64,1,4,2"))
    (o,) = run([Point.of(TP8, 8)], timer, state=State(path), check=check)
    assert o.status == "check failed" and "rms_rel" in o.note and o.config.up == default_tile(8, 128)
    (o2,) = run([Point.of(TP8, 8)], FakeTimer(timer.up_best, timer.down_best), state=State(path), check=check)
    assert len(checks) == 1 and o2.status == "check failed"


def test_stop_tuning_records_the_culprit_and_stops():
    state = State(None)

    def broken(bucket, pairs):
        first = next(iter(pairs))
        raise StopTuning("the CUDA context broke", {first: "illegal memory access"})

    ctx = SearchContext(KEY, SMALL, broken, lambda *a: None, state, Budget(None), lambda s: None)
    outcomes = tune_buckets([Point.of(TP8, 1), Point.of(TP8, 2)], ctx)
    assert [o.status for o in outcomes] == ["stopped", "stopped"]
    d = default_tile(1, 128)
    assert state.point(KEY, 1, d.label(), d.label()).error == "illegal memory access"


def test_settings_and_budget_reject_bad_values():
    with pytest.raises(ValueError, match="min_gain"):
        Settings(SPACES["small"], min_gain=1.0)
    with pytest.raises(ValueError, match="chunk"):
        Settings(SPACES["small"], chunk=0)
    with pytest.raises(ValueError, match="time budget"):
        Budget(0)


# ---- the confirm phase ----


class ConfirmTimer(FakeTimer):
    """FakeTimer whose confirm calls return planted (default ms, tuned ms), one per round."""

    def __init__(self, up_best, down_best, rounds, stop_at: int | None = None):
        super().__init__(up_best, down_best)
        self.rounds, self.stop_at = list(rounds), stop_at

    def __call__(self, bucket, pairs, **kwargs):
        if not kwargs:
            return super().__call__(bucket, pairs)
        if self.stop_at is not None and len(self.confirms) == self.stop_at:
            raise StopTuning("the CUDA context broke", {})
        super().__call__(bucket, pairs, **kwargs)
        default_ms, tuned_ms = self.rounds[len(self.confirms) - 1]
        d = default_tile(bucket, 128)
        return {label: default_ms if pair == (d, d) else tuned_ms for label, pair in pairs.items()}


UP, DOWN = tile("16,128,128,1,8,4"), tile("16,256,64,1,4,2")  # the search's planted optimum at bucket 8


def test_confirm_keeps_the_default_when_the_search_read_it_high():
    # the search says 0.02 vs 0.034 ms; side by side the tuned pair is no faster (the bucket-1 case on the H200)
    timer = ConfirmTimer(UP, DOWN, [(0.0290, 0.0297), (0.0291, 0.0295), (0.0290, 0.0289)])
    checks = []
    (o,) = run([Point.of(TP8, 8)], timer, check=lambda *a: checks.append(a))
    assert o.best == (UP, DOWN) and o.best_ms < o.default_ms * 0.9  # the search alone would store it
    assert o.status == "default kept" and "confirm: tuned/default 1.014" in o.note
    d = default_tile(8, 128)
    assert o.config == BucketConfig(d, d, 0.0290, 0.0290, 0.0290)  # the confirm's median default time
    assert o.confirmed == pytest.approx(0.0295 / 0.0291) and o.confirm_rounds == 3
    assert checks == []  # nothing to check: the default is stored


def test_confirm_stores_the_tuned_pair_on_the_median_ratio():
    settings = Settings(SPACES["small"], confirm_replays=200)
    timer = ConfirmTimer(UP, DOWN, [(0.030, 0.024), (0.030, 0.033), (0.031, 0.026)])  # ratios 0.8, 1.1, 0.84
    (o,) = run([Point.of(TP8, 8)], timer, settings=settings)
    assert o.status == "tuned" and (o.config.up, o.config.down) == (UP, DOWN)
    assert o.confirmed == pytest.approx(0.026 / 0.031) and o.confirm_rounds == 3
    assert (o.config.default_ms, o.config.down_ms) == (0.030, 0.026)  # medians of the confirm timings
    assert o.config.up_ms == pytest.approx(0.02 + 0.002 * 2)  # the search's: tuned up, default down (n, s off)
    d, best = pair_label(default_tile(8, 128), default_tile(8, 128)), pair_label(UP, DOWN)
    assert [list(pairs) for _, pairs in timer.confirms] == [[d, best], [best, d], [d, best]]  # one call a round
    assert {replays for replays, _ in timer.confirms} == {200}
    assert report.confirmed_speedup(o) == pytest.approx(0.031 / 0.026)
    # without a confirm the search's own timings decide and are stored
    (o,) = run([Point.of(TP8, 8)], timer := FakeTimer(UP, DOWN), settings=Settings(SPACES["small"], confirm_rounds=0))
    assert o.status == "tuned" and timer.confirms == [] and o.config.down_ms == o.best_ms and o.confirmed is None


def test_confirm_rounds_are_resumed_not_repeated(tmp_path):
    path = tmp_path / "state.jsonl"
    rounds = [(0.030, 0.024), (0.030, 0.025), (0.030, 0.026)]
    first = ConfirmTimer(UP, DOWN, rounds, stop_at=1)  # the context breaks in round 2
    (o,) = run([Point.of(TP8, 8)], first, state=State(path))
    assert o.status == "stopped" and len(first.confirms) == 1
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    confirm = [x for x in lines if x["phase"] == "confirm"]
    assert [(x["round"], x["ms"]) for x in confirm] == [(0, 0.030), (0, 0.024)]
    assert confirm[0]["vs"] == pair_label(UP, DOWN) and all("round" not in x for x in lines if x not in confirm)
    second = ConfirmTimer(UP, DOWN, rounds[1:])
    (o,) = run([Point.of(TP8, 8)], second, state=State(path))
    assert second.calls == [] and len(second.confirms) == 2  # rounds 2 and 3 only
    assert o.status == "tuned" and o.config.down_ms == 0.025 and o.confirm_rounds == 3
    third = ConfirmTimer(UP, DOWN, [])
    (again,) = run([Point.of(TP8, 8)], third, state=State(path))
    assert third.calls == third.confirms == [] and again.config == o.config


def test_a_tuned_pair_that_fails_in_the_confirm_is_not_stored():
    class Failing(ConfirmTimer):
        def __call__(self, bucket, pairs, **kwargs):
            out = super().__call__(bucket, pairs, **kwargs)
            return {k: "capture failed" if kwargs and k == pair_label(UP, DOWN) else v for k, v in out.items()}

    (o,) = run([Point.of(TP8, 8)], Failing(UP, DOWN, [(0.03, 0.02)] * 3))
    assert o.status == "default kept" and "failed in the confirm: capture failed" in o.note
    assert o.config.up == default_tile(8, 128)


# ---- state file ----


def test_state_round_trip_torn_line_and_bad_line(tmp_path):
    path = tmp_path / "s.jsonl"
    state = State(path)
    state.record(Entry(KEY, 8, "up", "m16n32k64g1w4s3", "m16n32k64g1w4s3", 0.05))
    state.record(Entry(KEY, 8, "up", "m16n64k64g1w4s3", "m16n32k64g1w4s3", None, "boom"))
    with path.open("a") as f:
        f.write('{"key": "GPU|3.6.0|sha')  # killed mid-write
    with pytest.warns(RuntimeWarning, match="torn last line"):
        again = State(path)
    assert again.loaded == 2 and again.point(KEY, 8, "m16n64k64g1w4s3", "m16n32k64g1w4s3").error == "boom"
    path.write_text("garbage\n" + path.read_text())
    with pytest.raises(ValueError, match=r"s\.jsonl:1: not a tuner state line"):
        State(path)
    with pytest.raises(ValueError, match="either ms or an error"):
        Entry(KEY, 8, "up", "a", "b", None, None)
    with pytest.raises(ValueError, match="phase"):
        Entry(KEY, 8, "sideways", "a", "b", 1.0)
    with pytest.raises(ValueError, match="confirm line needs an int"):
        Entry(KEY, 8, "confirm", "a", "b", 1.0, vs="up=a down=b")
    with pytest.raises(ValueError, match="confirm lines only"):
        Entry(KEY, 8, "up", "a", "b", 1.0, round=0)


# ---- CLI ----


def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert main(["--dry-run", "--tp", "8", "--buckets", "1,512", "--state", str(tmp_path / "s.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "[tune gpt-oss-120b tp=8]" in out and "E=128,H=2880,I=360" in out
    assert "bucket     1: default m16n32k64g1w4s3, block_m {16}" in out
    assert "bucket   512: default m64n64k32g8w4s3, block_m {16,32}" in out and "up block_m 4" in out
    assert "= 27 configs | confirm 3 rounds x 2 pairs x 200 replays = 6 timings" in out  # bucket 1
    assert "configs + 12 confirm timings over 2 buckets" in out and "min of GPU" in out
    assert not (tmp_path / "s.jsonl").exists()
    main(["--dry-run", "--tp", "8", "--buckets", "1", "--confirm-rounds", "0", "--state", str(tmp_path / "s.jsonl")])
    assert "= 27 configs | no confirm" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--tp", "7"], "does not divide"),
        (["--buckets", "0,4"], "positive integers"),
        (["--buckets", "a"], "comma-separated integers"),
        (["--time-budget", "0"], "expected > 0"),
        (["--replays", "0"], "expected >= 1"),
        (["--confirm-rounds", "-1"], "expected >= 0"),
        (["--confirm-replays", "0"], "expected >= 1"),
        (["--min-gain", "1.5"], "must be in"),
        (["--space", "huge"], "invalid choice"),
        (["--preset", "nope"], "invalid choice"),
    ],
)
def test_bad_args_give_clear_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--dry-run", *argv])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_without_a_gpu_main_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["--tp", "8", "--buckets", "1"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def _outcome(bucket: int, default_ms: float, config: BucketConfig | None, status: str) -> Outcome:
    d = default_tile(bucket, 128)
    best = None if config is None else (config.up, config.down)
    best_ms = None if config is None else config.down_ms
    return Outcome(bucket, d, default_ms, best, best_ms, config, status, 10, 2, 1)


def test_store_merges_with_an_existing_table(tmp_path):
    key = TunedKey("NVIDIA H200", "3.6.0", "E=128,H=2880,I=360,k=4,bf16,swiglu,bias")
    old = {b: BucketConfig(default_tile(b, 128), default_tile(b, 128), 0.1, 0.1, 0.1) for b in (1, 8)}
    save_table(TunedTable(key, old, created="2026-01-01T00:00:00+00:00"), tmp_path)
    args = argparse.Namespace(out=tmp_path, space="small", replays=50, warmup=5, min_gain=0.01, seed=0)
    new = BucketConfig(tile("16,64,128,1,4,3"), tile("16,128,64,1,4,3"), 0.09, 0.08, 0.1)
    outcomes = [_outcome(8, 0.1, new, "tuned"), _outcome(16, 0.1, None, "out of time")]
    path = store(key, outcomes, args, say=lambda s: None)
    table = load_table(path, expect=key)
    assert dict(table.buckets) == {1: old[1], 8: new}
    assert "[1] kept from the earlier table" in table.notes
    assert store(key, [_outcome(16, 0.1, None, "out of time")], args, say=lambda s: None) is None


def test_report_markdown_and_json(tmp_path):
    new = BucketConfig(tile("16,64,128,1,4,3"), tile("16,128,64,1,4,3"), 0.09, 0.08, 0.1)
    shape = report.ShapeReport(
        "gpt-oss-120b tp=8",
        {"gpu": "NVIDIA H200", "triton_version": "3.6.0", "shape": "E=128"},
        (_outcome(8, 0.1, new, "tuned"), _outcome(16, 0.1, None, "out of time")),
        "tuned_data/x.json",
        {"space": "small"},
    )
    text = report.markdown(shape)
    assert "| 8 | 0.1000 | 0.0800 | 1.25x | - | `m16n64k128g1w4s3` | `m16n128k64g1w4s3` | tuned |" in text
    assert "| 16 | 0.1000 | - | - | - | - | - | out of time |" in text
    written = report.write([shape], tmp_path / "tune", tmp_path / "r.md")
    assert {p.name for p in written} == {"report.md", "report.json", "r.md", "r.json"}
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["shapes"][0]["buckets"][0]["speedup"] == pytest.approx(1.25)
    assert pair_label(new.up, new.down) == new.label()


def test_damaged_state_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "s.jsonl"
    bad.write_text("not json\n{}\n")
    assert main(["--dry-run", "--tp", "8", "--buckets", "1", "--state", str(bad)]) == 2
    assert "s.jsonl:1: not a tuner state line" in capsys.readouterr().err


# ---- gpu.py's bookkeeping, with measure_buckets and CUDA faked ----


@pytest.fixture
def fake_gpu(monkeypatch):
    import torch

    from bench.tune import gpu
    from graphs.measure import BucketResult, Measurement
    from graphs.timing import ReplayStats

    bad_compile, bad_capture = tile("16,256,64,1,4,3"), tile("16,128,64,1,4,3")
    seen: dict[str, object] = {}

    def kernel(up, down):
        def run(x, logits):
            if up == bad_compile:
                raise RuntimeError("OutOfResources: shared memory, Required: 300000 " + "x" * 1000)
            return x

        run.up = up  # type: ignore[attr-defined]
        return run

    def measure(variants, args, buckets, pool, stream, timing):
        seen.update(variants=dict(variants), buckets=buckets, rows=args[0].shape[0], timing=timing)
        dropped = {n: "capture failed" for n, fn in variants.items() if fn.up == bad_capture}
        if len(dropped) == len(variants):
            raise RuntimeError(f"bucket {buckets[0]}: every variant failed to capture: ...")
        stats = {n: ReplayStats(0.05, 0.04, 0.06, 10) for n in variants if n not in dropped}
        return Measurement((BucketResult(buckets[0], next(iter(stats)), stats, None, 0.1, dropped),), {}, 0.1)

    tuner = object.__new__(gpu.GpuTuner)
    tuner.inputs, tuner.timing, tuner.stream = (torch.zeros(16, 4), torch.zeros(16, 2)), gpu.TUNE_TIMING, None
    tuner.kernel = kernel  # type: ignore[method-assign]
    monkeypatch.setattr(gpu, "measure_buckets", measure)
    monkeypatch.setattr(gpu, "_device_error", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 0))
    return tuner, seen, bad_compile, bad_capture


def test_gpu_time_configs_reports_times_and_each_failure(fake_gpu):
    tuner, seen, bad_compile, bad_capture = fake_gpu
    good = tile("16,64,64,1,4,3")
    pairs = {pair_label(t, t): (t, t) for t in (good, bad_compile, bad_capture)}
    out = tuner.time_configs(8, pairs)
    assert out[pair_label(good, good)] == 0.05
    assert out[pair_label(bad_capture, bad_capture)] == "capture failed"
    error = out[pair_label(bad_compile, bad_compile)]
    assert error.startswith("RuntimeError: OutOfResources") and len(error) <= 300
    assert set(seen["variants"]) == {pair_label(good, good), pair_label(bad_capture, bad_capture)}
    assert seen["buckets"] == [8] and seen["rows"] == 8
    only_bad = {pair_label(bad_capture, bad_capture): (bad_capture, bad_capture)}
    assert "every variant failed" in tuner.time_configs(8, only_bad)[pair_label(bad_capture, bad_capture)]
    with pytest.raises(ValueError, match="exceeds the static inputs"):
        tuner.time_configs(32, pairs)


def test_gpu_time_configs_stops_on_a_broken_context(fake_gpu, monkeypatch):
    from bench.tune import gpu

    tuner, _, bad_compile, _ = fake_gpu
    monkeypatch.setattr(gpu, "_device_error", lambda: "CUDA error: an illegal memory access was encountered")
    with pytest.raises(StopTuning, match="illegal memory access") as stop:
        tuner.time_configs(8, {"bad": (bad_compile, bad_compile), "next": (bad_compile, bad_compile)})
    assert list(stop.value.results) == ["bad"]  # the culprit, recorded so a resumed run skips it


def test_gpu_time_configs_takes_a_replays_override(fake_gpu):
    from bench.tune import gpu
    from graphs.measure import TimingPlan

    tuner, seen, *_ = fake_gpu
    good = tile("16,64,64,1,4,3")
    tuner.time_configs(8, {"a": (good, good)})
    assert seen["timing"] == gpu.TUNE_TIMING
    tuner.time_configs(8, {"a": (good, good)}, replays=200)
    assert seen["timing"] == TimingPlan(gpu.TUNE_TIMING.warmup, 200)


# ---- tables rebuilt from a report ----


def test_parse_label_round_trips_and_rejects_others():
    for t in (tile("16,32,256,1,8,4"), tile("128,256,32,16,32,5")):
        assert parse_label(t.label()) == t
    for bad in ("m16n32k64g1w4", "up=m16n32k64g1w4s3", "m15n32k64g1w4s3", None):
        with pytest.raises(ValueError):
            parse_label(bad)


def _shape_report(tmp_path, timer_rounds):
    key = TunedKey("NVIDIA H200", "3.6.0", shape_key(TP8))
    outcomes = run([Point.of(TP8, b) for b in (1, 8, 32)], ConfirmTimer(UP, DOWN, timer_rounds))
    args = argparse.Namespace(out=tmp_path / "run", space="small", replays=50, warmup=5, min_gain=0.01, seed=0)
    created = "2026-11-29T15:00:00+00:00"
    path = store(key, outcomes, args, say=lambda s: None, created=created)
    shape = report.ShapeReport(
        "gpt-oss-120b tp=8", dataclasses.asdict(key), tuple(outcomes), str(path), {"space": "small"}
    )
    return load_table(path, expect=key), dataclasses.replace(shape, created=created)


def test_table_from_report_round_trip(tmp_path, capsys):
    # bucket 1: tuned, 8: the confirm keeps the default, 32: tuned (3 confirm rounds each)
    rounds = [(0.03, 0.02)] * 3 + [(0.03, 0.0301)] * 3 + [(0.03, 0.02)] * 3
    table, shape = _shape_report(tmp_path, rounds)
    assert [o.status for o in shape.outcomes] == ["tuned", "default kept", "tuned"]
    (rebuilt,) = tables_from_report(report.to_json([shape]), "r.json", note="side by side: 29.0/29.7")
    assert rebuilt.key == table.key and dict(rebuilt.buckets) == dict(table.buckets)
    assert rebuilt.created == table.created and "rebuilt from the report r.json" in rebuilt.notes
    assert rebuilt.notes.endswith("; side by side: 29.0/29.7") and "(up_ms not in it)" not in rebuilt.notes
    report.write([shape], tmp_path / "tune")
    out = tmp_path / "shipped"
    argv = ["--table-from-report", str(tmp_path / "tune" / "report.json"), "--out", str(out), "--note", "n"]
    assert main(argv) == 0
    path = table_path(table.key, out)
    assert f"wrote {path}" in capsys.readouterr().out
    assert dict(load_table(path, expect=table.key).buckets) == dict(table.buckets)
    assert find_table(TP8, [out], key=table.key) is not None


def test_table_from_a_report_written_before_the_confirm(tmp_path, capsys):
    data = {
        "tool": "bench.tune",
        "shapes": [
            {
                "name": "gpt-oss-120b tp=8",
                "key": {"gpu": "NVIDIA H200", "triton_version": "3.6.0", "shape": shape_key(TP8)},
                "settings": {"space": "small", "replays": 50},
                "buckets": [
                    {"bucket": 1, "default_ms": 0.0334, "stored_ms": 0.0279, "status": "tuned",
                     "config": {"up": "m16n32k256g1w8s4", "down": "m16n32k64g1w4s3"}},
                    {"bucket": 2, "default_ms": None, "stored_ms": None, "status": "out of time", "config": None},
                ],
            }
        ],
    }  # fmt: skip
    (table,) = tables_from_report(data, "old.json")
    assert dict(table.buckets) == {1: BucketConfig(tile("16,32,256,1,8,4"), default_tile(1, 128), None, 0.0279, 0.0334)}
    assert "(up_ms not in it)" in table.notes and "space=small replays=50" in table.notes and table.created
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tool": "bench.tune", "shapes": [{"key": {}, "buckets": []}]}))
    assert main(["--table-from-report", str(bad), "--out", str(tmp_path)]) == 2
    assert "bad.json: shape 0" in capsys.readouterr().err
    bad.write_text("{}")
    assert main(["--table-from-report", str(bad), "--out", str(tmp_path)]) == 2
    assert "is not a bench.tune report" in capsys.readouterr().err
    data["shapes"][0]["buckets"][0]["config"]["up"] = "m32n32k256g1w8s4"  # block_m differs from down's
    with pytest.raises(ValueError, match="old.json: shape 0 .*block_m"):
        tables_from_report(data, "old.json")


@pytest.mark.parametrize(
    "spec, buckets",
    [
        (TP8, [1, 8, 32, 128, 256, 1024]),
        (TP2, [8, 64, 256, 1024]),
        (preset("qwen3-30b-a3b"), [1, 8, 32, 128, 256, 1024]),
    ],
    ids=["gpt-oss-120b-tp8", "gpt-oss-120b-tp2", "qwen3-30b-a3b"],
)
def test_the_shipped_h200_tables_load(spec, buckets):
    """The tables shipped for the issue's three shapes pass the schema, checksum and key checks,
    and every stored bucket was decided by the tuner's confirm phase."""
    from moe_dispatch.tuned_configs import default_tuned_dir

    key = TunedKey("NVIDIA H200", "3.6.0", shape_key(spec))
    table = find_table(spec, [default_tuned_dir()], key=key)
    assert table is not None and sorted(table.buckets) == buckets
    assert "confirm_rounds=3" in table.notes
    for config in table.buckets.values():
        assert config.down_ms is not None and config.down_ms <= config.default_ms
