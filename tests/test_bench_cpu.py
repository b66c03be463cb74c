"""CPU tests of the bench's pure-Python parts: floor arithmetic, result JSON, table, plot."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench import plot as bench_plot
from bench import results, roofline, table
from bench.results import BatchResult, BenchRun, ShardResult, Timing
from bench.roofline import Ceilings
from graphs.timing import ReplayStats
from moe_dispatch.spec import GPT_OSS_SWIGLU, MoESpec, preset

# E=4, k=2, H=8, I=4. Per expert: w13 2*4*8 = 64 + w2 8*4 = 32 -> 96 elements.
TINY = MoESpec(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, name="tiny")
TINY_BIAS = dataclasses.replace(TINY, bias=True, activation=GPT_OSS_SWIGLU, name="tiny-bias")


# ---- roofline ----


def test_moe_bytes_by_hand():
    assert roofline.moe_bytes(TINY, 3) == 3 * 96 * 2  # bf16
    assert roofline.moe_bytes(TINY_BIAS, 3) == 3 * 96 * 2 + 3 * (2 * 4 + 8) * 4  # + float32 biases
    assert roofline.moe_bytes(dataclasses.replace(TINY, dtype=torch.float32), 1) == 96 * 4
    assert roofline.moe_bytes(TINY, 0) == 0


def test_activation_bytes_and_flops_by_hand():
    assert roofline.activation_bytes(TINY, 5) == 2 * 5 * 8 * 2
    assert roofline.moe_flops(TINY, 5) == 2 * 5 * 2 * 8 * 3 * 4 == 1920
    assert roofline.moe_flops(TINY, 0) == 0


def test_floor_memory_bound():
    f = roofline.floor(TINY, 5, 3, Ceilings(hbm_bytes_per_s=1e3, bf16_flops_per_s=1e6))
    assert f.bytes == 576 + 160 and f.flops == 1920
    assert f.memory_s == pytest.approx(0.736) and f.compute_s == pytest.approx(0.00192)
    assert f.seconds == pytest.approx(0.736) and f.bound == "memory"


def test_floor_compute_bound_with_bias():
    f = roofline.floor(TINY_BIAS, 5, 3, Ceilings(hbm_bytes_per_s=1e9, bf16_flops_per_s=1e3))
    assert f.bytes == 576 + 192 + 160
    assert f.memory_s == pytest.approx(928e-9) and f.compute_s == pytest.approx(1.92)
    assert f.seconds == pytest.approx(1.92) and f.bound == "compute"


def test_floor_gpt_oss_preset_magnitude():
    # GPT-OSS-120B tp=2, one token, 4 experts on ~3 TB/s: weights dominate, a few us.
    spec = preset("gpt-oss-120b", tp=2)
    f = roofline.floor(spec, 1, 4, Ceilings(3.0e12, 8.0e14))
    assert f.bound == "memory"
    assert 4 * 3 * 2880 * 1440 * 2 < f.bytes < 4 * 3 * 2880 * 1440 * 2 + 200_000
    assert 5e-6 < f.seconds < 40e-6


def test_touched_experts():
    assert roofline.touched_experts(torch.tensor([[0, 3], [3, 1], [0, 1]])) == 3
    assert roofline.touched_experts(torch.zeros((0, 2), dtype=torch.int32)) == 0
    with pytest.raises(ValueError, match="float32"):
        roofline.touched_experts(torch.tensor([[0.0, 1.0]]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: roofline.moe_flops(TINY, -1), "-1"),
        (lambda: roofline.activation_bytes(TINY, -2), "-2"),
        (lambda: roofline.moe_bytes(TINY, -1), "-1"),
        (lambda: roofline.moe_bytes(TINY, 5), "5 exceeds num_experts=4"),
        (lambda: roofline.floor(TINY, 1, 3, Ceilings(1.0, 1.0)), "1 \\* 2"),
        (lambda: roofline.floor(TINY, -1, 0, Ceilings(1.0, 1.0)), "-1"),
        (lambda: Ceilings(0.0, 1.0), "hbm_bytes_per_s.*0.0"),
        (lambda: Ceilings(1.0, -5.0), "bf16_flops_per_s.*-5.0"),
        (lambda: Ceilings(float("inf"), 1.0), "inf"),
    ],
)
def test_bad_values_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_measuring_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        roofline.measure_hbm_bandwidth("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        roofline.measure_bf16_matmul_rate("cpu")


# ---- results ----

CEILINGS = Ceilings(hbm_bytes_per_s=3.0e12, bf16_flops_per_s=8.0e14)


def _batch(spec: MoESpec, t: int, routing: str, touched: int, **kw) -> BatchResult:
    fields = dict(
        num_tokens=t,
        routing=routing,
        touched_experts=touched,
        kernels={"triton": Timing(0.020, 0.019, 0.022), "triton_kernels": Timing(0.030, 0.028, 0.031)},
        eager={},
        adaptive=Timing(0.021, 0.020, 0.022),
        adaptive_kernel="triton",
        static_rule=Timing(0.020, 0.019, 0.022),
        static_rule_kernel="triton",
        floor=roofline.floor(spec, t, touched, CEILINGS),
    )
    fields.update(kw)
    return BatchResult(**fields)


def _run() -> BenchRun:
    spec = preset("gpt-oss-120b", tp=2)
    batches = (
        _batch(spec, 1, "uniform", 4),
        _batch(spec, 1, "skewed", 4, eager={"triton": Timing(0.1, 0.09, 0.12)}),
        _batch(
            spec,
            64,
            "uniform",
            100,
            kernels={"triton_kernels": Timing(0.05, 0.049, 0.052)},
            errors={"triton": "failed correctness: max rel err 0.5 | at row 3"},
            adaptive=Timing(0.051, 0.05, 0.052),
            adaptive_kernel="triton_kernels",
        ),
        _batch(
            spec,
            4096,
            "uniform",
            128,
            kernels={"triton": Timing(2.0, 1.9, 2.1), "triton_kernels": Timing(1.0, 0.9, 1.1)},
            static_rule=Timing(1.0, 0.95, 1.05),
            static_rule_kernel="triton_kernels",
            adaptive=Timing(1.01, 0.95, 1.05),
            adaptive_kernel="triton_kernels",
        ),
    )
    spec8 = preset("gpt-oss-120b", tp=8)
    return BenchRun(
        gpu="NVIDIA H100 80GB HBM3",
        sm_count=132,
        versions={"torch": "2.11.0+cu130", "triton": "3.6.0"},
        ceilings=CEILINGS,
        seeds={"weights": 0, "routing": 1},
        date="2025-11-27T10:39:00+00:00",
        command="python -m bench --tp 2 8",
        shards=(
            ShardResult(spec_json=spec.to_json(), tp=2, batches=batches),
            ShardResult(spec_json=spec8.to_json(), tp=8, batches=(_batch(spec8, 8, "uniform", 20),)),
        ),
    )


def test_winner_margin_ratio():
    run = _run()
    b1, _, b64, b4096 = run.shards[0].batches
    assert b1.winner == "triton" and b1.margin == pytest.approx(1.5)
    assert b64.winner == "triton_kernels" and b64.margin is None
    assert b4096.winner == "triton_kernels" and b4096.margin == pytest.approx(2.0)
    t = Timing(0.020, 0.019, 0.022)
    assert b1.ratio_to_floor(t) == pytest.approx(0.020e-3 / b1.floor.seconds)
    empty = _batch(TINY, 0, "uniform", 0, kernels={})
    assert empty.winner is None and empty.margin is None and empty.regret is None
    assert b1.regret == pytest.approx(0.0) and b4096.regret == pytest.approx(0.0)  # chose the winners
    chose_slower = dataclasses.replace(b1, adaptive_kernel="triton_kernels")
    assert chose_slower.regret == pytest.approx(0.5)  # triton_kernels 1.5x the winner triton
    with pytest.raises(ValueError, match="zero"):
        empty.ratio_to_floor(t)


def test_timing_from_replay_stats_and_checks():
    t = Timing.from_stats(ReplayStats.from_samples([5.0, 1.0, 3.0, 2.0, 4.0]))
    assert (t.median_ms, t.p20_ms, t.p80_ms) == pytest.approx((3.0, 1.8, 4.2))
    with pytest.raises(ValueError, match="p20 <= median"):
        Timing(1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="median_ms.*-1"):
        Timing(-1.0, -2.0, 0.5)
    with pytest.raises(ValueError, match="'sideways'"):
        _batch(TINY, 1, "sideways", 1)
    with pytest.raises(ValueError, match="both timed and in errors"):
        _batch(TINY, 1, "uniform", 1, errors={"triton": "x"})
    with pytest.raises(ValueError, match="adaptive_kernel"):
        _batch(TINY, 1, "uniform", 1, adaptive_kernel=None)


def test_json_round_trip(tmp_path):
    run = _run()
    dated = results.save(run, tmp_path)
    assert dated == tmp_path / "nvidia-h100-80gb-hbm3" / "2025-11-27t10-39-00-00-00.json"
    latest = dated.parent / "latest.json"
    assert results.load(dated) == run
    assert results.load(latest) == run
    assert json.loads(latest.read_text())["version"] == results.FORMAT_VERSION


def test_load_rejects_other_version_and_missing_keys(tmp_path):
    data = results.to_json(_run())
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        results.load(path)
    broken = json.loads(json.dumps(data))
    del broken["shards"][0]["batches"][2]["floor"]["flops"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"shards\[0\]\.batches\[2\]\.floor: missing key 'flops'"):
        results.load(path)
    broken = {k: v for k, v in data.items() if k != "ceilings"}
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="missing key 'ceilings'"):
        results.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        results.load(path)


# ---- table and plot ----


def test_markdown_table_rows_and_footnote():
    run = _run()
    text = table.markdown_table(run.shards[0], run.ceilings)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0:2] for r in rows] == [
        ["| 1", "uniform"],
        ["| 1", "skewed"],
        ["| 64", "uniform"],
        ["| 4096", "uniform"],
    ]
    header = text.splitlines()[0]
    for column in (
        "triton us",
        "triton_kernels us",
        "triton eager us",
        "adaptive us",
        "1536 rule us",
        "winner",
        "margin",
        "regret",
        "floor us",
        "triton/floor",
        "triton_kernels/floor",
        "rule/floor",
    ):
        assert f"| {column} |" in header
    assert "20.0 (19.0-22.0)" in rows[0] and "1.50x" in rows[0] and "21.0 triton" in rows[0]
    assert "2.00x" in rows[3] and "1000.0 triton_kernels" in rows[3]
    b1 = run.shards[0].batches[0]
    assert f"{b1.ratio_to_floor(b1.kernels['triton']):.2f}x" in rows[0]
    assert f"{b1.floor.seconds * 1e6:.1f} mem" in rows[0]
    assert "error (1)" in rows[2]
    assert "1. T=64 uniform, triton: failed correctness: max rel err 0.5 \\| at row 3" in text
    assert "100.1 (100.0-100.2)" not in text  # no stray cells
    assert all(r.count(" | ") == header.count(" | ") for r in rows)


def test_render_run_header_and_shards():
    text = table.render_run(_run())
    assert "NVIDIA H100 80GB HBM3 (132 SMs)" in text
    assert "torch 2.11.0+cu130, triton 3.6.0" in text
    assert "3.00 TB/s" in text and "800 TFLOP/s" in text
    assert "## gpt-oss-120b tp=2\n" in text and "## gpt-oss-120b tp=8\n" in text
    assert "`python -m bench --tp 2 8`" in text and "2025-11-27T10:39:00+00:00" in text


def test_plot_writes_png(tmp_path):
    out = bench_plot.plot(_run(), tmp_path / "sub" / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_main_defaults_next_to_json(tmp_path, capsys):
    dated = results.save(_run(), tmp_path)
    latest = dated.parent / "latest.json"
    assert bench_plot.main([str(latest)]) == 0
    assert latest.with_suffix(".png").stat().st_size > 0
    assert bench_plot.main([str(latest), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").stat().st_size > 0
    assert str(tmp_path / "x.png") in capsys.readouterr().out


def test_kernel_breakdown_table_names_each_kernel_its_share_and_the_floor():
    from bench.kernel_breakdown import Breakdown, KernelTime, markdown

    parts = (KernelTime("_p_matmul_ogs_" + "x" * 100, 60.0, 1.0), KernelTime("combine_slots_kernel", 20.0, 1.0))
    row = Breakdown("triton_kernels_tuned", 32, 78, floor_us=50.0, total_us=80.0, parts=parts)
    text = markdown("title", [row])
    assert "## triton_kernels_tuned, T=32: 80.0 us of kernels, 1.60x the floor (50.0 us, 78 experts)" in text
    assert "| `combine_slots_kernel` | 20.0 | 25% | 1 |" in text
    assert "x" * 100 not in text, "long template names are cut to the table width"


def test_correctness_check_prepares_each_kernel_once_and_names_the_failing_size(monkeypatch):
    from bench import runner
    from moe_dispatch import ExpertWeights, reference_moe

    spec = dataclasses.replace(TINY, dtype=torch.float32)
    weights = ExpertWeights.random(spec, seed=0)
    prepared: list[str] = []

    def make_kernel(name, spec, weights):
        prepared.append(name)

        def kernel(x, logits):
            out = reference_moe(spec, weights, x, logits)
            return out + 1.0 if name == "wrong_at_5" and x.shape[0] == 5 else out

        return kernel

    monkeypatch.setattr(runner, "make_kernel", make_kernel)
    monkeypatch.setattr(runner, "candidate_at", lambda name, T: True)
    errors = runner.check_correctness(spec, weights, ("right", "wrong_at_5"), (1, 5, 9), seed=3)
    assert prepared == ["right", "wrong_at_5"]
    assert list(errors) == ["wrong_at_5"] and errors["wrong_at_5"].startswith("T=5: wrong result")
