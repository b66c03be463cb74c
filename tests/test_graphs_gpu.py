"""GPU tier for `graphs`: capture, timing, selection and replay of toy row-independent variants."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from graphs import BucketedGraphs, bucket_for, margin, pick_fastest

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BUCKETS = (1, 2, 8, 16)
HIDDEN = 64
REPLAYS = 20


def _toy_variants(w: torch.Tensor) -> dict:
    """Two equal-result implementations of x @ w and a deliberately slow one (the same GEMM 20 times)."""

    def matmul(x):
        return x @ w

    def einsum(x):
        return torch.einsum("th,hk->tk", x, w)

    def slow(x):
        y = x @ w
        for _ in range(19):
            y = x @ w
        return y

    return {"matmul": matmul, "einsum": einsum, "slow": slow}


class _Recorder:
    """A RangeNamer that records every (stage, bucket, variant) it is asked to open."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, stage: str, bucket: int, variant: str) -> contextlib.AbstractContextManager[None]:
        self.calls.append((stage, bucket, variant))
        return contextlib.nullcontext()


def _static(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    w = torch.randn(HIDDEN, HIDDEN, device="cuda")
    x = torch.randn(BUCKETS[-1], HIDDEN, device="cuda")  # finite padding from the start
    return w, x


@pytest.fixture(scope="module")
def captured():
    w, x = _static()
    variants = _toy_variants(w)
    recorder, lines = _Recorder(), []
    g = BucketedGraphs(variants, [x], buckets=BUCKETS, timed_replays=REPLAYS, ranges=recorder, progress=lines.append)
    report = g.capture()
    return g, x, variants, report, recorder, lines


def test_replay_matches_eager_bitwise(captured):
    g, x_static, variants, *_ = captured
    for t in (1, 2, 5, 8, 13, 16):
        x = torch.randn(t, HIDDEN, device="cuda")
        out = g.run(x).clone()
        bucket = g.bucket_for(t)
        # Eager on the same padded bucket-sized input, so the GEMM shape (and kernel) matches the graph's.
        eager = variants[g.winners[bucket]](x_static[:bucket])[:t]
        assert out.shape == (t, HIDDEN)
        assert torch.equal(out, eager), f"T={t} bucket={bucket}"


def test_every_bucket_edge_routes_to_its_bucket(captured):
    g, *_ = captured
    for b in BUCKETS:
        for t in (b - 1, b, b + 1):
            expected = bucket_for(t, BUCKETS)
            assert g.bucket_for(t) == expected
            x = torch.randn(t, HIDDEN, device="cuda")
            if expected is None:
                with pytest.raises(ValueError, match=f"T={t} rows exceed the largest captured bucket 16"):
                    g.run(x)
                continue
            out = g.run(x)
            assert out.shape == (t, HIDDEN)
            if t:  # the result is a view of that bucket's static output (an empty view has no data_ptr)
                assert out.data_ptr() == g.replay(expected).data_ptr()
            assert g.replay(expected).shape == (expected, HIDDEN)


def test_padding_rows_never_change_real_rows(captured):
    g, x_static, *_ = captured
    for t in (5, 9, 15):
        bucket = g.bucket_for(t)
        x = torch.randn(t, HIDDEN, device="cuda")
        x_static[t:bucket] = 1e3 * torch.randn(bucket - t, HIDDEN, device="cuda")
        first = g.run(x).clone()
        x_static[t:bucket] = -7.0
        second = g.run(x).clone()
        assert torch.equal(first, second), f"T={t}: padding changed real rows"


def test_winner_is_the_measured_fastest_and_slow_never_wins(captured):
    *_, report, _, _ = captured
    assert [r.bucket for r in report.results] == list(BUCKETS)
    for r in report.results:
        medians = {name: s.median_ms for name, s in r.timings_ms.items()}
        assert set(medians) == {"matmul", "einsum", "slow"}
        assert all(s.samples == REPLAYS for s in r.timings_ms.values())
        assert r.winner == pick_fastest(medians)
        assert r.winner != "slow"
        assert medians["slow"] > medians[r.winner]
        assert r.margin == pytest.approx(margin(medians, r.winner))
        assert r.margin >= 1.0
        assert r.dropped == {}
        assert r.seconds > 0
    assert report.winners() == captured[0].winners
    assert report.pool_bytes_all_variants >= 0


def test_capture_order_ranges_and_progress(captured):
    g, *_, report, recorder, lines = captured
    captures = [(b, v) for stage, b, v in recorder.calls if stage == "capture"]
    measures = {(b, v) for stage, b, v in recorder.calls if stage == "measure"}  # a range per timed replay
    scratch, serving = captures[: len(measures)], captures[len(measures) :]
    assert [b for b, _ in scratch] == sorted((b for b, _ in scratch), reverse=True)  # largest bucket first
    assert sorted(scratch) == sorted(measures) == sorted((b, v) for b in BUCKETS for v in ("matmul", "einsum", "slow"))
    assert serving == [(b, g.winners[b]) for b in reversed(BUCKETS)]  # winners re-captured, largest first
    assert len(lines) == len(BUCKETS) * 3 + 1
    assert lines[0].startswith("[1/12] bs=16 ") and lines[0].endswith(" ms")
    assert lines[-1] == f"re-capturing {len(BUCKETS)} winners into the serving pool"
    assert report.recapture_seconds > 0 and report.seconds > report.recapture_seconds
    before = len(recorder.calls)
    g.run(torch.randn(3, HIDDEN, device="cuda"))
    assert recorder.calls[before:] == [("replay", 8, g.winners[8])]


def test_report_table_lists_every_bucket(captured):
    *_, report, _, _ = captured
    table = report.table()
    first_cells = [line.split()[0] for line in table.splitlines()[2:]]
    assert first_cells == [str(b) for b in BUCKETS]
    for name in ("matmul", "einsum", "slow", "winner", "margin"):
        assert name in table.splitlines()[1]


def test_replay_counts_increment():
    w, x = _static(1)
    g = BucketedGraphs(_toy_variants(w), [x], buckets=BUCKETS, timed_replays=REPLAYS)
    g.capture()
    assert g.replay_counts == {"matmul": 0, "einsum": 0, "slow": 0}  # timing replays are not counted
    for _ in range(3):
        g.run(torch.randn(5, HIDDEN, device="cuda"))
    g.replay(16)
    expected = Counter({g.winners[8]: 3})
    expected[g.winners[16]] += 1
    assert g.replay_counts == {name: expected[name] for name in ("matmul", "einsum", "slow")}


def test_run_checks_inputs(captured):
    g, *_ = captured
    with pytest.raises(TypeError, match="dtype"):
        g.run(torch.randn(4, HIDDEN, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="shape"):
        g.run(torch.randn(4, HIDDEN + 1, device="cuda"))
    with pytest.raises(ValueError, match="expected 1"):
        g.run(torch.randn(4, HIDDEN, device="cuda"), torch.randn(4, HIDDEN, device="cuda"))
    with pytest.raises(ValueError, match="no captured graph"):
        g.replay(4)


def test_choose_captures_only_the_given_variant_and_times_nothing():
    w, x = _static(2)
    calls: Counter = Counter()

    def counted(name, fn):
        def call(t):
            calls[name] += 1
            return fn(t)

        return call

    variants = {name: counted(name, fn) for name, fn in _toy_variants(w).items()}
    g = BucketedGraphs(variants, [x], buckets=BUCKETS, timed_replays=REPLAYS)
    report = g.capture(choose=dict.fromkeys(BUCKETS, "einsum"))
    assert calls["matmul"] == calls["slow"] == 0 and calls["einsum"] > 0
    assert g.winners == dict.fromkeys(BUCKETS, "einsum")
    for r in report.results:
        assert r.winner == "einsum" and r.timings_ms == {} and r.margin is None
    out = g.run(x[:3].clone())
    assert torch.equal(out, variants["einsum"](x[:8])[:3])

    # A partial choice: the chosen bucket keeps its (slow) variant untimed, the others are measured.
    report = g.capture(choose={16: "slow"})
    by_bucket = {r.bucket: r for r in report.results}
    assert by_bucket[16].winner == "slow" and by_bucket[16].timings_ms == {}
    assert all(by_bucket[b].winner != "slow" and len(by_bucket[b].timings_ms) == 3 for b in BUCKETS[:-1])


def test_keep_all_allows_replay_variant():
    w, x = _static(3)
    variants = _toy_variants(w)
    g = BucketedGraphs(variants, [x], buckets=BUCKETS, timed_replays=REPLAYS, keep_all=True)
    g.capture()
    for b in BUCKETS:
        for name, fn in variants.items():
            out = g.replay_variant(b, name).clone()
            assert torch.equal(out, fn(x[:b])), f"bucket {b} variant {name}"
    assert g.replay_counts["slow"] == len(BUCKETS)

    g = BucketedGraphs(variants, [x], buckets=BUCKETS, timed_replays=REPLAYS)
    g.capture()
    loser = next(name for name in variants if name != g.winners[8])
    with pytest.raises(ValueError, match="keep_all"):
        g.replay_variant(8, loser)
    assert torch.equal(g.replay_variant(8, g.winners[8]).clone(), variants[g.winners[8]](x[:8]))


def test_failing_variants_are_dropped_with_a_warning():
    w, x = _static(4)

    def broken(t):
        raise RuntimeError("boom")

    def fails_only_in_capture(t):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("not capturable")
        return t @ w

    variants = {"matmul": _toy_variants(w)["matmul"], "broken": broken, "fails_only_in_capture": fails_only_in_capture}
    g = BucketedGraphs(variants, [x], buckets=BUCKETS, timed_replays=REPLAYS)
    with pytest.warns(RuntimeWarning, match="dropping variant") as record:
        report = g.capture()
    dropped = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert sum("'broken' at bucket" in m for m in dropped) == len(BUCKETS)
    assert sum("'fails_only_in_capture' at bucket" in m for m in dropped) == len(BUCKETS)
    for r in report.results:
        assert r.winner == "matmul"
        assert set(r.dropped) == {"broken", "fails_only_in_capture"}
        assert "boom" in r.dropped["broken"] and "not capturable" in r.dropped["fails_only_in_capture"]
        assert set(r.timings_ms) == {"matmul"} and r.margin == 1.0
    assert "failed" in report.table()
    xt = torch.randn(5, HIDDEN, device="cuda")
    out = g.run(xt).clone()
    assert torch.equal(out, variants["matmul"](x[:8])[:5])


def test_all_variants_failing_is_a_runtime_error():
    _, x = _static(5)

    def broken(t):
        raise RuntimeError("boom")

    def also_broken(t):
        raise ValueError("bad shape")

    g = BucketedGraphs({"broken": broken, "also_broken": also_broken}, [x], buckets=(1, 2), timed_replays=REPLAYS)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="every variant failed") as info:
        g.capture()
    assert "boom" in str(info.value) and "bad shape" in str(info.value)


BIG_BYTES = 256 * 2**20


def _lean_and_fat(w: torch.Tensor) -> dict:
    """The same GEMM, once plain and once next to a 256 MiB temporary (which also makes it slower)."""

    def lean(x):
        return x @ w

    def fat(x):
        big = torch.ones(BIG_BYTES // 4, device=x.device)
        return x @ w + big[: x.shape[0], None] * 0.0

    return {"lean": lean, "fat": fat}


def test_recapture_returns_the_losers_memory_and_replays_bitwise():
    w, x = _static(6)
    variants = _lean_and_fat(w)
    g = BucketedGraphs(variants, [x], buckets=BUCKETS, timed_replays=REPLAYS)
    report = g.capture()
    assert g.winners == dict.fromkeys(BUCKETS, "lean")
    assert report.recapture_seconds > 0
    # The fat variant's temporary lived in the scratch pool, which went back to the device.
    assert report.pool_bytes_all_variants >= BIG_BYTES
    assert report.pool_bytes_winners < report.pool_bytes_all_variants - BIG_BYTES // 2
    assert report.memory_winners.reserved < report.memory_all_variants.reserved
    for t in (1, 2, 5, 8, 13, 16):
        out = g.run(torch.randn(t, HIDDEN, device="cuda")).clone()
        bucket = g.bucket_for(t)
        assert torch.equal(out, variants["lean"](x[:bucket])[:t]), f"T={t} bucket={bucket}"
    del g

    # keep_all keeps every variant in the one pool: nothing is re-captured or returned.
    g = BucketedGraphs(variants, [x], buckets=BUCKETS, timed_replays=REPLAYS, keep_all=True)
    report = g.capture()
    assert report.recapture_seconds == 0.0
    assert report.pool_bytes_winners == report.pool_bytes_all_variants >= BIG_BYTES


def test_timing_reads_gpu_time_when_the_host_is_slower_than_the_graph():
    """A call whose host side takes 300 us around a ~10 us graph: the timed GPU time must stay
    near the bare replay's (the GPU-side hold lets the host queue the calls), not read ~300 us."""
    import time

    from graphs import capture, time_callable, time_replays

    w, x = _static()
    stream = torch.cuda.Stream()
    graph = capture(lambda a: a @ w, (x,), torch.cuda.graph_pool_handle(), stream).graph

    def slow_host_replay():
        deadline = time.perf_counter() + 300e-6
        while time.perf_counter() < deadline:
            pass
        graph.replay()

    bare = time_replays(graph, warmup=10, replays=50).median_ms
    slow = time_callable(slow_host_replay, warmup=10, repeats=50).median_ms
    assert bare < 0.1, f"bare replay {bare * 1e3:.1f} us; expected a small graph"
    assert slow < 0.1, f"slow-host replay read {slow * 1e3:.1f} us of GPU time (bare {bare * 1e3:.1f} us)"


def test_interleaved_timing_times_each_callable_for_its_share_of_the_repeats():
    """Two graphs of different cost timed interleaved: each gets the repeats (pooled over rounds)
    and its own time, the larger GEMM the longer."""
    from graphs import capture, time_interleaved

    w, x = _static()
    stream = torch.cuda.Stream()
    small = capture(lambda a: a @ w, (x,), torch.cuda.graph_pool_handle(), stream).graph
    big_x = torch.randn(64 * x.shape[0], x.shape[1], device="cuda", dtype=x.dtype)
    big = capture(lambda a: a @ w, (big_x,), torch.cuda.graph_pool_handle(), stream).graph
    stats = time_interleaved({"small": small.replay, "big": big.replay}, warmup=5, repeats=40, rounds=4)
    assert list(stats) == ["small", "big"] and all(s.samples == 40 for s in stats.values())
    assert stats["big"].median_ms > stats["small"].median_ms, stats
