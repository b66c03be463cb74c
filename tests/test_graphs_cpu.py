"""CPU tier for `graphs`: bucket rule, statistics, selection, cross-rank agreement (real gloo group), CUDA checks."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import pickle
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import graphs.bucketed as bucketed
import graphs.measure as measure
from graphs import (
    DEFAULT_BUCKETS,
    BucketedGraphs,
    ReplayStats,
    agree_across_ranks,
    bucket_for,
    margin,
    padding_rows,
    pick_fastest,
    validate_buckets,
)

# ---- buckets -------------------------------------------------------------------------------


def test_default_buckets_are_sglang_decode_sizes():
    assert DEFAULT_BUCKETS[:8] == (1, 2, 4, 8, 12, 16, 24, 32)
    assert DEFAULT_BUCKETS[8:] == tuple(range(40, 257, 8))
    assert DEFAULT_BUCKETS[-1] == 256
    assert validate_buckets(DEFAULT_BUCKETS) == DEFAULT_BUCKETS


@pytest.mark.parametrize("i", range(len(DEFAULT_BUCKETS)))
def test_bucket_for_every_default_edge(i):
    b = DEFAULT_BUCKETS[i]
    below = DEFAULT_BUCKETS[i - 1] if i else 0
    above = DEFAULT_BUCKETS[i + 1] if i + 1 < len(DEFAULT_BUCKETS) else None
    assert bucket_for(b, DEFAULT_BUCKETS) == b
    if b - 1 > below:
        assert bucket_for(b - 1, DEFAULT_BUCKETS) == b
    else:  # b - 1 is the previous bucket itself, or 0, which the smallest bucket serves
        assert bucket_for(b - 1, DEFAULT_BUCKETS) == (below or DEFAULT_BUCKETS[0])
    assert bucket_for(b + 1, DEFAULT_BUCKETS) == above
    assert bucket_for(below + 1, DEFAULT_BUCKETS) == b  # the whole range (below, b] maps to b


def test_bucket_for_zero_large_and_negative():
    assert bucket_for(0, DEFAULT_BUCKETS) == 1
    assert bucket_for(0, (4, 8)) == 4
    assert bucket_for(257, DEFAULT_BUCKETS) is None
    assert bucket_for(10**9, (4, 8)) is None
    with pytest.raises(ValueError, match="-1"):
        bucket_for(-1, DEFAULT_BUCKETS)


@pytest.mark.parametrize(
    ("buckets", "match"),
    [
        ((), "empty"),
        ([], "empty"),
        ((1, 4, 2), r"buckets\[1\]=4 >= buckets\[2\]=2"),
        ((1, 2, 2, 4), r"duplicate buckets \[2\]"),
        ((0, 1, 2), "bucket 0 is not positive"),
        ((-4, 1), "bucket -4 is not positive"),
        ((1, 2.0, 4), "2.0 .*float.* not an int"),
        ((True, 2), "True .*bool.* not an int"),
        ((1, "8"), "not an int"),
    ],
)
def test_validate_buckets_errors(buckets, match):
    with pytest.raises(ValueError, match=match):
        validate_buckets(buckets)


def test_validate_buckets_returns_tuple():
    assert validate_buckets([1, 3, 7]) == (1, 3, 7)


def test_padding_rows():
    assert padding_rows(5, 8) == 3
    assert padding_rows(8, 8) == 0
    assert padding_rows(0, 1) == 1
    with pytest.raises(ValueError, match="bucket 8 is smaller than num_tokens=9"):
        padding_rows(9, 8)
    with pytest.raises(ValueError, match="negative"):
        padding_rows(-1, 8)


# ---- timing statistics ---------------------------------------------------------------------


def test_replay_stats_odd_count():
    s = ReplayStats.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])  # sorted 1..5, positions q*(n-1)
    assert (s.median_ms, s.p20_ms, s.p80_ms, s.samples) == (3.0, 1.8, 4.2, 5)


def test_replay_stats_even_count():
    s = ReplayStats.from_samples([4.0, 1.0, 3.0, 2.0])  # positions 1.5, 0.6, 2.4
    assert s.median_ms == 2.5
    assert s.p20_ms == pytest.approx(1.6)
    assert s.p80_ms == pytest.approx(3.4)
    assert s.samples == 4


def test_replay_stats_single_and_empty():
    assert ReplayStats.from_samples([0.25]) == ReplayStats(0.25, 0.25, 0.25, 1)
    with pytest.raises(ValueError, match="empty"):
        ReplayStats.from_samples([])
    with pytest.raises(ValueError, match="non-finite"):
        ReplayStats.from_samples([1.0, math.nan])


def test_replay_stats_json_round_trip():
    s = ReplayStats.from_samples([0.041, 0.043, 0.040, 0.05])
    text = json.dumps(s.to_json())
    assert ReplayStats.from_json(json.loads(text)) == s
    with pytest.raises(ValueError, match="lacks keys"):
        ReplayStats.from_json({"median_ms": 1.0})
    with pytest.raises(ValueError, match="samples"):
        ReplayStats.from_json({**s.to_json(), "samples": 0})


def test_hold_covers_the_host_enqueue_and_is_capped():
    from graphs.timing import HOLD_CAP_MS, hold_ms

    assert hold_ms(0.0, 100) == pytest.approx(0.2)  # a floor even for a free host
    assert hold_ms(20.0, 100) == pytest.approx(0.2 + 3.0)  # 1.5 x 100 calls x 20 us
    assert hold_ms(400.0, 1000) == HOLD_CAP_MS
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="host_us_per_call"):
            hold_ms(bad, 10)


def test_interleaved_order_alternates_direction_each_round():
    from graphs import interleaved_order

    assert interleaved_order(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    with pytest.raises(ValueError, match="rounds"):
        interleaved_order(["a"], 0)


# ---- selection -----------------------------------------------------------------------------


def test_pick_fastest_and_margin():
    t = {"triton": 0.05, "triton_kernels": 0.04, "torch": 0.2}
    assert pick_fastest(t) == "triton_kernels"
    assert margin(t, "triton_kernels") == pytest.approx(0.05 / 0.04)
    assert margin(t, "torch") == pytest.approx(0.04 / 0.2)  # below 1: not the fastest


def test_pick_fastest_tie_goes_to_first_name_whatever_the_order():
    assert pick_fastest({"b": 1.0, "a": 1.0, "c": 2.0}) == "a"
    assert pick_fastest({"a": 1.0, "b": 1.0}) == "a"
    assert margin({"a": 1.0, "b": 1.0}, "a") == 1.0


def test_single_variant_and_errors():
    assert pick_fastest({"only": 3.0}) == "only"
    assert margin({"only": 3.0}, "only") == 1.0
    with pytest.raises(ValueError, match="empty"):
        pick_fastest({})
    with pytest.raises(ValueError, match="NaN"):
        pick_fastest({"a": math.nan, "b": 1.0})
    with pytest.raises(ValueError, match="'x' is not among"):
        margin({"a": 1.0}, "x")


def test_agree_without_distributed_returns_a_copy():
    assert not dist.is_initialized()
    table = {8: {"a": 1.0, "b": 2.0}, 1: {"a": 0.5}}
    agreed = agree_across_ranks(table, ["a", "b"])
    assert agreed == table
    assert agreed is not table and agreed[8] is not table[8]
    agreed[8]["a"] = 9.0
    assert table[8]["a"] == 1.0
    with pytest.raises(ValueError, match=r"variants \['c'\]"):
        agree_across_ranks({1: {"c": 1.0}}, ["a"])


# ---- agreement over a real 2-process gloo group ----------------------------------------------

# Rank r's timings; the expected result is the per-entry MAX, with "c" (missing on rank 1) dropped.
_RANK_TABLES = {
    0: {1: {"a": 1.0, "b": 3.0, "c": 0.1}, 8: {"a": 5.0, "b": 2.0}},
    1: {1: {"a": 2.0, "b": 1.5}, 8: {"a": 4.0, "b": 2.5, "c": 9.0}},
}
_EXPECTED = {1: {"a": 2.0, "b": 3.0}, 8: {"a": 5.0, "b": 2.5}}


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result: dict[str, object] = {"agreed": agree_across_ranks(_RANK_TABLES[rank], ["a", "b", "c"])}
        # Same buckets, different variant names: every rank must raise, none may hang.
        names = ["a", "b", "c"] if rank == 0 else ["a", "b", "d"]
        try:
            agree_across_ranks({1: {"a": 1.0}}, names)
        except RuntimeError as exc:
            result["names_error"] = str(exc)
        try:
            agree_across_ranks({1: {"a": 1.0}} if rank == 0 else {2: {"a": 1.0}}, ["a"])
        except RuntimeError as exc:
            result["buckets_error"] = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_gloo_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    results = []
    for rank in range(2):
        with open(tmp / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def test_agree_across_two_gloo_ranks_takes_the_max(gloo_results):
    assert gloo_results[0]["agreed"] == _EXPECTED
    assert gloo_results[1]["agreed"] == _EXPECTED
    assert pick_fastest(gloo_results[0]["agreed"][8]) == pick_fastest(gloo_results[1]["agreed"][8]) == "b"


def test_agree_across_gloo_ranks_rejects_mismatched_layouts(gloo_results):
    for rank in range(2):
        assert "variants" in gloo_results[rank]["names_error"]
        assert "'d'" in gloo_results[rank]["names_error"] or "'c'" in gloo_results[rank]["names_error"]
        assert "buckets" in gloo_results[rank]["buckets_error"]


# ---- BucketedGraphs argument checks and the CUDA requirement --------------------------------


def _variants():
    return {"double": lambda x: x * 2, "add": lambda x: x + x}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_capture_without_cuda_raises_runtime_error():
    g = BucketedGraphs(_variants(), [torch.zeros(8, 4)], buckets=(1, 2, 8))
    with pytest.raises(RuntimeError, match="CUDA"):
        g.capture()


@pytest.mark.parametrize(("buckets", "match"), [((), "empty"), ((8, 2), "not strictly increasing")])
def test_bad_buckets_are_value_errors_before_any_cuda_check(buckets, match):
    with pytest.raises(ValueError, match=match):
        BucketedGraphs(_variants(), [torch.zeros(8, 4)], buckets=buckets).capture()


def test_constructor_and_choose_checks_come_before_cuda():
    x = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="leading dim >= the largest bucket 16"):
        BucketedGraphs(_variants(), [x], buckets=(1, 16))
    with pytest.raises(ValueError, match="variants is empty"):
        BucketedGraphs({}, [x], buckets=(1, 8))
    with pytest.raises(TypeError, match="variant 'bad'"):
        BucketedGraphs({"bad": 3}, [x], buckets=(1, 8))
    with pytest.raises(TypeError, match=r"static_inputs\[0\]"):
        BucketedGraphs(_variants(), [[0.0] * 8], buckets=(1, 8))
    g = BucketedGraphs(_variants(), [x], buckets=(1, 8))
    with pytest.raises(ValueError, match="'nope' is not a variant"):
        g.capture(choose={8: "nope"})
    with pytest.raises(ValueError, match="bucket 4"):
        g.capture(choose={4: "add"})


def test_replay_before_capture_is_an_error():
    g = BucketedGraphs(_variants(), [torch.zeros(8, 4)], buckets=(1, 8))
    assert g.buckets == (1, 8) and g.max_bucket == 8 and g.winners == {}
    assert g.bucket_for(3) == 8 and g.bucket_for(9) is None
    assert g.replay_counts == {"double": 0, "add": 0}
    with pytest.raises(RuntimeError, match="capture"):
        g.run(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no captured graph"):
        g.replay(8)


# ---- BucketedGraphs orchestration on CPU, with the CUDA pieces replaced by fakes ---------------


class _FakeGraph:
    """Stands in for a CUDA graph: replay re-runs the callable on the captured views into the static output."""

    def __init__(self, fn, inputs, output):
        self.fn, self.inputs, self.output = fn, inputs, output

    def replay(self):
        self.output.copy_(self.fn(*self.inputs))


class _Toy:
    """A row-independent variant (x * scale) whose fake replay time is `ms(bucket)`."""

    def __init__(self, scale, ms, fail=None):
        self.scale, self.ms, self.fail = scale, ms, fail

    def __call__(self, x):
        if self.fail:
            raise RuntimeError(self.fail)
        return x * self.scale


class _FakeCuda:
    """Records what the fakes saw: each capture as (variant fn, rows, pool, weakref to its graph), each release."""

    def __init__(self):
        self.captures = []
        self.releases = []  # per _release_cached call: how many captured graphs were still alive
        self.timed = []  # per time_interleaved call: the names it timed, with their rounds
        self._pools = itertools.count()

    def pool(self):
        return (next(self._pools), 0)

    def capture(self, fn, inputs, pool, stream, warmup=2):
        try:
            out = fn(*inputs).clone()
        except Exception as exc:
            raise bucketed.CaptureError(f"capture failed: {exc}") from exc
        graph = _FakeGraph(fn, inputs, out)
        self.captures.append((fn, inputs[0].shape[0], pool, weakref.ref(graph)))
        return bucketed.CapturedGraph(graph=graph, output=out)

    def time_interleaved(self, fns, warmup, repeats, rounds):
        """Each measure.RangedReplay's fake replay time: its graph's variant's `ms(rows)` (no replay)."""
        self.timed.append((list(fns), rounds))
        stats = {}
        for name, replay in fns.items():
            graph = replay.graph
            stats[name] = ReplayStats.from_samples([graph.fn.ms(graph.output.shape[0])] * repeats)
        return stats

    def release(self):
        self.releases.append(sum(ref() is not None for *_, ref in self.captures))

    def pools(self):
        return [pool for _, _, pool, _ in self.captures]


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(bucketed, "require_cuda", lambda what: None)
    monkeypatch.setattr(bucketed, "_check_devices", lambda static: None)
    monkeypatch.setattr(bucketed, "capture", fake.capture)  # the winners' re-capture
    monkeypatch.setattr(measure, "capture", fake.capture)  # measure_buckets' captures
    monkeypatch.setattr(measure, "time_interleaved", fake.time_interleaved)
    monkeypatch.setattr(bucketed, "_read_memory", lambda: bucketed.MemoryReading(0, 0))
    monkeypatch.setattr(bucketed, "_release_cached", fake.release)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", fake.pool)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    return fake


FAKE_BUCKETS = (1, 2, 8, 16)


def _fake_variants(**extra):
    # "small" wins below ~11 rows, "large" above, "slow" never.
    return {
        "small": _Toy(2.0, lambda b: 1 + b / 4),
        "large": _Toy(2.0, lambda b: 3 + b / 16),
        "slow": _Toy(2.0, lambda b: 100.0),
        **extra,
    }


def _recorder():
    calls = []

    def ranges(stage, bucket, variant):
        calls.append((stage, bucket, variant))
        return contextlib.nullcontext()

    return calls, ranges


def test_fake_capture_order_selection_and_report(fake_cuda):
    calls, ranges = _recorder()
    lines = []
    g = BucketedGraphs(
        _fake_variants(), [torch.zeros(16, 3)], buckets=FAKE_BUCKETS, ranges=ranges, progress=lines.append
    )
    report = g.capture()
    captured = [b for stage, b, _ in calls if stage == "capture"]
    scratch, serving = captured[:12], captured[12:]
    assert scratch == sorted(scratch, reverse=True)  # largest bucket first
    assert serving == [16, 8, 2, 1]  # the winners' re-capture, largest first
    assert g.winners == report.winners() == {1: "small", 2: "small", 8: "small", 16: "large"}
    r16 = report.results[-1]
    assert r16.margin == pytest.approx((1 + 16 / 4) / (3 + 1))
    assert set(r16.timings_ms) == {"small", "large", "slow"} and r16.dropped == {}
    assert lines[0] == "[1/12] bs=16 small: 5.000 ms" and len(lines) == 13
    assert lines[-1] == "re-capturing 4 winners into the serving pool"
    table = report.table().splitlines()
    assert [line.split()[0] for line in table[2:]] == ["1", "2", "8", "16"]
    assert table[1].split() == ["bucket", "small", "large", "slow", "winner", "margin", "seconds"]


def test_fake_each_bucket_times_its_variants_together_in_the_plans_rounds(fake_cuda):
    g = BucketedGraphs(_fake_variants(), [torch.zeros(16, 3)], buckets=FAKE_BUCKETS, timed_replays=9)
    g.capture()
    assert fake_cuda.timed == [(["small", "large", "slow"], 4)] * len(FAKE_BUCKETS)  # one call per bucket
    with pytest.raises(ValueError, match="rounds=0"):
        measure.TimingPlan(rounds=0)


def test_fake_run_copies_rows_pads_and_returns_a_view(fake_cuda):
    static = torch.full((16, 3), 5.0)
    calls, ranges = _recorder()
    g = BucketedGraphs(_fake_variants(), [static], buckets=FAKE_BUCKETS, ranges=ranges)
    g.capture()
    x = torch.arange(15.0).reshape(5, 3)
    out = g.run(x)
    assert torch.equal(out, x * 2) and out.shape == (5, 3)
    assert torch.equal(static[5:8], torch.full((3, 3), 5.0))  # padding rows keep what they held
    full = g.replay(8)
    assert out.data_ptr() == full.data_ptr() and full.shape == (8, 3)
    assert calls[-2:] == [("replay", 8, "small"), ("replay", 8, "small")]
    assert g.replay_counts == {"small": 2, "large": 0, "slow": 0}
    assert g.run(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="T=17 rows exceed the largest captured bucket 16"):
        g.run(torch.zeros(17, 3))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        g.run(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(2, 4\); expected \(2, 3\)"):
        g.run(torch.zeros(2, 4))


def test_fake_choose_keep_all_and_replay_variant(fake_cuda):
    g = BucketedGraphs(_fake_variants(), [torch.ones(16, 3)], buckets=FAKE_BUCKETS)
    report = g.capture(choose={16: "slow"})
    assert g.winners[16] == "slow" and report.results[-1].timings_ms == {} and report.results[-1].margin is None
    assert len(report.results[0].timings_ms) == 3
    with pytest.raises(ValueError, match=r"'large' is not kept at bucket 8; kept: \['small'\].*keep_all"):
        g.replay_variant(8, "large")
    assert torch.equal(g.replay_variant(8, "small"), torch.full((8, 3), 2.0))

    g = BucketedGraphs(_fake_variants(), [torch.ones(16, 3)], buckets=FAKE_BUCKETS, keep_all=True)
    g.capture()
    assert torch.equal(g.replay_variant(8, "slow"), torch.full((8, 3), 2.0))
    assert g.replay_counts["slow"] == 1


def test_fake_failed_variants_are_dropped_or_fatal(fake_cuda):
    g = BucketedGraphs(_fake_variants(bad=_Toy(1.0, lambda b: 0.1, fail="boom")), [torch.ones(16, 3)], FAKE_BUCKETS)
    with pytest.warns(RuntimeWarning, match=r"dropping variant 'bad' at bucket \d+: .*boom") as record:
        report = g.capture()
    assert len(record) == len(FAKE_BUCKETS) and record[0].filename == __file__
    assert all(r.dropped == {"bad": "capture failed: boom"} for r in report.results)
    assert "bad" not in g.winners.values() and "failed" in report.table()

    broken = {"a": _Toy(1.0, lambda b: 1.0, fail="boom"), "b": _Toy(1.0, lambda b: 1.0, fail="bang")}
    g = BucketedGraphs(broken, [torch.ones(16, 3)], FAKE_BUCKETS)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every variant failed.*boom.*bang"):
        g.capture()
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="chosen variant 'a' failed"):
        BucketedGraphs(broken, [torch.ones(16, 3)], FAKE_BUCKETS).capture(choose=dict.fromkeys(FAKE_BUCKETS, "a"))


def test_fake_winner_comes_from_the_cross_rank_table(fake_cuda, monkeypatch):
    def another_rank_lacks_small(table, variants, group=None):
        return {b: {n: ms for n, ms in row.items() if n != "small"} for b, row in table.items()}

    monkeypatch.setattr(measure, "agree_across_ranks", another_rank_lacks_small)
    g = BucketedGraphs(_fake_variants(), [torch.ones(16, 3)], FAKE_BUCKETS)
    report = g.capture()
    assert set(g.winners.values()) == {"large"}
    assert "small" in report.results[0].timings_ms  # the local measurement is still reported


def test_fake_output_rows_must_match_the_bucket(fake_cuda):
    g = BucketedGraphs({"sum": lambda x: x.sum(0)}, [torch.ones(16, 3)], FAKE_BUCKETS)
    with pytest.raises(ValueError, match="'sum' returned shape"):
        g.capture()


# ---- re-capture of the winners into a fresh serving pool --------------------------------------


def test_fake_winners_are_recaptured_into_a_fresh_pool(fake_cuda):
    variants = _fake_variants()
    names = {id(fn): name for name, fn in variants.items()}
    static = torch.ones(16, 3)
    g = BucketedGraphs(variants, [static], buckets=FAKE_BUCKETS)
    report = g.capture()
    winners = {1: "small", 2: "small", 8: "small", 16: "large"}
    assert g.winners == winners
    scratch, serving = fake_cuda.captures[:12], fake_cuda.captures[12:]
    assert len({pool for _, _, pool, _ in scratch}) == 1
    # Once per bucket, the winner only, largest first, into one fresh pool.
    assert [(rows, names[id(fn)]) for fn, rows, _, _ in serving] == sorted(winners.items(), reverse=True)
    assert len({pool for _, _, pool, _ in serving}) == 1 and serving[0][2] != scratch[0][2]
    # Every scratch graph (winners' first captures included) was gone before the serving captures.
    assert fake_cuda.releases == [0]
    assert all(ref() is None for *_, ref in scratch) and all(ref() is not None for *_, ref in serving)
    # The served graph is the re-captured one, and replays the winner.
    served = {rows: ref() for _, rows, _, ref in serving}
    assert g._table[8][0] is served[8] and g._table[8][1] is served[8].output
    assert torch.equal(g.run(torch.full((5, 3), 3.0)), torch.full((5, 3), 6.0))
    assert torch.equal(g.replay_variant(16, "large"), static * 2)
    assert report.recapture_seconds > 0 and report.seconds >= report.recapture_seconds


def test_fake_keep_all_is_not_recaptured(fake_cuda):
    lines = []
    static = [torch.ones(16, 3)]
    g = BucketedGraphs(_fake_variants(), static, buckets=FAKE_BUCKETS, keep_all=True, progress=lines.append)
    report = g.capture()
    assert len(fake_cuda.captures) == 12 and len(set(fake_cuda.pools())) == 1
    assert fake_cuda.releases == [] and report.recapture_seconds == 0.0
    assert not any(line.startswith("re-capturing") for line in lines)
    assert all(ref() is not None for *_, ref in fake_cuda.captures)  # every variant kept, in the one pool


def test_fake_all_chosen_is_captured_once_in_the_serving_pool(fake_cuda):
    lines = []
    g = BucketedGraphs(_fake_variants(), [torch.ones(16, 3)], buckets=FAKE_BUCKETS, progress=lines.append)
    report = g.capture(choose=dict.fromkeys(FAKE_BUCKETS, "large"))
    assert [rows for _, rows, _, _ in fake_cuda.captures] == [16, 8, 2, 1]
    assert len(set(fake_cuda.pools())) == 1 and fake_cuda.releases == []
    assert report.recapture_seconds == 0.0 and len(lines) == 4
    assert g.winners == dict.fromkeys(FAKE_BUCKETS, "large")


def test_fake_single_variant_is_not_recaptured(fake_cuda):
    g = BucketedGraphs({"only": _Toy(2.0, lambda b: 1.0)}, [torch.ones(16, 3)], buckets=FAKE_BUCKETS)
    report = g.capture()
    assert len(fake_cuda.captures) == 4 and fake_cuda.releases == [] and report.recapture_seconds == 0.0


def test_fake_partial_choice_recaptures_every_bucket(fake_cuda):
    variants = _fake_variants()
    names = {id(fn): name for name, fn in variants.items()}
    g = BucketedGraphs(variants, [torch.ones(16, 3)], buckets=FAKE_BUCKETS)
    report = g.capture(choose={16: "slow"})
    assert len(fake_cuda.captures) == 1 + 3 * 3 + 4
    serving = fake_cuda.captures[10:]
    expected = [(16, "slow"), (8, "small"), (2, "small"), (1, "small")]
    assert [(rows, names[id(fn)]) for fn, rows, _, _ in serving] == expected
    assert fake_cuda.releases == [0] and report.recapture_seconds > 0


class _OncePerBucket(_Toy):
    """Captures fine the first time at each bucket (the scratch pool), fails the second (the re-capture)."""

    def __init__(self, scale, ms):
        super().__init__(scale, ms)
        self.seen = set()

    def __call__(self, x):
        if x.shape[0] in self.seen:
            raise RuntimeError("out of memory")
        self.seen.add(x.shape[0])
        return x * self.scale


def test_fake_failed_recapture_names_bucket_and_variant(fake_cuda):
    variants = {"flaky": _OncePerBucket(2.0, lambda b: 0.5), **_fake_variants()}
    g = BucketedGraphs(variants, [torch.ones(16, 3)], buckets=FAKE_BUCKETS)
    with pytest.raises(RuntimeError, match=r"bucket 16: winner 'flaky' failed to re-capture.*out of memory"):
        g.capture()
    assert g.winners == {}


# ---- per-bucket eligibility (a kernel built for small batches) -----------------------------------


def test_fake_ineligible_variants_are_neither_captured_nor_chosen(fake_cuda):
    # "small" would win at 1, 2 and 8, but it is a candidate only up to 2 rows.
    g = BucketedGraphs(
        _fake_variants(), [torch.zeros(16, 3)], FAKE_BUCKETS, eligible=lambda name, b: name != "small" or b <= 2
    )
    report = g.capture()
    assert report.winners() == {1: "small", 2: "small", 8: "large", 16: "large"}
    by_bucket = {r.bucket: set(r.timings_ms) for r in report.results}
    assert by_bucket[8] == by_bucket[16] == {"large", "slow"} and by_bucket[1] == {"small", "large", "slow"}
    scratch = [(fn, rows) for fn, rows, *_ in fake_cuda.captures][:10]
    assert all(rows <= 2 for fn, rows in scratch if fn is g._variants["small"])


def test_fake_a_bucket_without_candidates_is_refused(fake_cuda):
    g = BucketedGraphs(_fake_variants(), [torch.zeros(16, 3)], FAKE_BUCKETS, eligible=lambda name, b: b < 16)
    with pytest.raises(ValueError, match="no variant .* is eligible at bucket 16"):
        g.capture()


def test_candidate_at_follows_the_backend_limit():
    from moe_dispatch.backends import candidate_at, get_backend

    limit = get_backend("small_batch").max_tokens
    assert limit is not None and candidate_at("small_batch", limit) and not candidate_at("small_batch", limit + 1)
    assert get_backend("triton").max_tokens is None and candidate_at("triton", 10**6)
