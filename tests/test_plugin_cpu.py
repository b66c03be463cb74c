"""The SGLang plugin without SGLang or a GPU: load(), the target table, the kernel switch,
the launcher hooks on plain objects, and the capture/selection core driven by a fake backend.

SGLang is hidden by mapping every `sglang*` module to None in sys.modules (restored after
each test), so these tests behave the same on a machine that has SGLang installed.
"""

import argparse
import gc
import logging
import re
import sys
import types

import pytest

import moe_dispatch.sglang_plugin as plugin
from moe_dispatch.plan import PlanMetadata
from moe_dispatch.policy import crossover_from_winners
from moe_dispatch.sglang_plugin import decode_capture, launcher_hooks, targets
from moe_dispatch.sglang_plugin.decode_capture import (
    CaptureReport,
    MultiKernelCapture,
    ShapeRow,
    format_report,
    plan_from_report,
)
from moe_dispatch.sglang_plugin.kernel_switch import KERNELS, EagerRule, KernelSwitch
from moe_dispatch.sglang_plugin.settings import ENV_VARS, AdaptiveMoESettings
from moe_dispatch.spec import preset


@pytest.fixture
def no_sglang(monkeypatch):
    """Make `import sglang...` fail as on a machine without SGLang."""
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")] + ["sglang"]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# --- load() and the target table -----------------------------------------------------------------


def test_load_without_sglang_logs_and_returns(no_sglang, caplog):
    with caplog.at_level(logging.WARNING, logger="moe_dispatch.sglang_plugin"):
        assert plugin.load() is None
    assert "SGLang is not importable" in caplog.text


def test_target_table_shape():
    assert targets.SUPPORTED_SGLANG == ("0.5.17",)
    assert len(set(targets.ALL_TARGETS)) == len(targets.ALL_TARGETS)
    assert not set(targets.LAUNCHER_TARGETS) & set(targets.SCHEDULER_TARGETS)
    for target in targets.ALL_TARGETS:
        assert target.startswith("sglang.srt."), target
        assert target.count(".") >= 3, f"{target} is not module.Class.attr"
    assert set(targets.SIGNATURES) <= set(targets.LAUNCHER_TARGETS + targets.SCHEDULER_TARGETS)
    hooked = {target.rsplit(".", 1)[1] for target in targets.SCHEDULER_TARGETS}
    assert {"forward_cuda", "create_moe_runner", "load_model", "capture", "capture_one_shape", "replay"} <= hooked


def test_verify_targets_without_sglang_lists_every_target(no_sglang):
    problems = targets.verify_targets()
    assert [p.split(" ", 1)[0] for p in problems] == list(targets.ALL_TARGETS)
    with pytest.raises(RuntimeError) as info:
        targets.require_targets()
    message = str(info.value)
    assert "lacks hook target sglang.srt.server_args.ServerArgs.add_cli_args" in message
    assert message.endswith("supported SGLang versions: 0.5.17")


def _fake_module(monkeypatch):
    module = types.ModuleType("fake_sgl")

    class Method:
        def forward_cuda(self, layer, dispatch_output):
            return layer

        @staticmethod
        def add(parser):
            return parser

        @classmethod
        def build(cls, args):
            return args

    module.Method = Method
    monkeypatch.setitem(sys.modules, "fake_sgl", module)
    return module


def test_verify_targets_detects_changed_signature(monkeypatch):
    _fake_module(monkeypatch)
    monkeypatch.setattr(
        targets,
        "SIGNATURES",
        {
            "fake_sgl.Method.forward_cuda": ("self", "layer", "dispatch_output"),
            "fake_sgl.Method.add": ("parser",),
            "fake_sgl.Method.build": ("cls", "args"),
        },
    )
    ok = ("fake_sgl.Method.forward_cuda", "fake_sgl.Method.add", "fake_sgl.Method.build")
    assert targets.verify_targets(ok) == []
    monkeypatch.setattr(targets, "SIGNATURES", {"fake_sgl.Method.forward_cuda": ("self", "x", "dispatch_output")})
    (problem,) = targets.verify_targets(("fake_sgl.Method.forward_cuda", "fake_sgl.Method.gone"))[:1]
    assert problem.startswith("fake_sgl.Method.forward_cuda (signature changed")
    missing = targets.verify_targets(("fake_sgl.Method.gone",))
    assert missing[0].startswith("fake_sgl.Method.gone (AttributeError")


# --- kernel switch ------------------------------------------------------------------------------


def test_forced_override_nests_and_restores():
    switch = KernelSwitch(AdaptiveMoESettings(enabled=True, batch_threshold=64))
    assert switch.kernel_for(1) == "triton" and switch.kernel_for(64) == "triton_kernels"
    with switch.forced("triton_kernels"):
        assert switch.kernel_for(1) == "triton_kernels"
        with switch.forced("triton"):
            assert switch.kernel_for(4096) == "triton"
        assert switch.forced_kernel == "triton_kernels"
    assert switch.forced_kernel is None
    with pytest.raises(RuntimeError), switch.forced("triton"):
        raise RuntimeError("boom")
    assert switch.forced_kernel is None
    with pytest.raises(ValueError, match="unknown kernel 'cutlass'"), switch.forced("cutlass"):
        pass


def test_threshold_rule_and_configure():
    switch = KernelSwitch()
    assert switch.kernel_for(1535) == "triton" and switch.kernel_for(1536) == "triton_kernels"
    switch.configure(AdaptiveMoESettings(enabled=True, batch_threshold=8))
    assert switch.rule == EagerRule(8) and switch.kernel_for(7) == "triton" and switch.kernel_for(8) == "triton_kernels"


@pytest.mark.parametrize(
    ("winners", "crossover"),
    [
        ({1: "triton", 8: "triton", 256: "triton"}, None),
        ({1: "triton", 8: "triton_kernels", 256: "triton_kernels"}, 8),
        ({1: "triton_kernels", 64: "triton", 128: "triton", 256: "triton_kernels"}, 256),
        ({1: "triton_kernels", 2: "triton_kernels"}, 1),
        ({}, None),
    ],
)
def test_crossover_is_the_trailing_triton_kernels_run(winners, crossover):
    assert crossover_from_winners(winners) == crossover


def test_plan_crossover_replaces_threshold():
    rule = EagerRule.from_winners({1: "triton", 64: "triton_kernels", 256: "triton_kernels"}, 1536, "plan p.json")
    assert (rule.crossover, rule.source) == (64, "plan p.json")
    assert rule.kernel_for(63) == "triton" and rule.kernel_for(64) == "triton_kernels"
    assert rule.kernel_for(4096) == "triton_kernels" and "plan p.json crossover" in rule.describe()
    none = EagerRule.from_winners({1: "triton", 256: "triton"}, 1536, "measured")
    assert none == EagerRule(1536) and none.kernel_for(1000) == "triton" and none.kernel_for(2000) == "triton_kernels"
    with pytest.raises(ValueError, match="threshold must be a positive int, got 0"):
        EagerRule(0)


def test_adaptive_topks_are_held_weakly():
    switch = KernelSwitch()

    class Module:
        pass

    a, b = Module(), Module()
    switch.add_topk(a)
    assert switch.is_adaptive(a) and not switch.is_adaptive(b) and switch.num_adaptive == 1
    del a
    gc.collect()
    assert switch.num_adaptive == 0


# --- launcher hooks (plain objects stand in for ServerArgs) --------------------------------------


def test_cli_hook_adds_flags_and_publishes_env(clean_env):
    parser = argparse.ArgumentParser()
    launcher_hooks.after_add_cli_args(None, parser)
    args = parser.parse_args(["--enable-adaptive-moe", "--adaptive-moe-batch-threshold", "64"])
    seen = {}
    result = launcher_hooks.around_from_cli_args(lambda cls, ns: seen.setdefault("cls", cls), "ServerArgs", args)
    assert result == "ServerArgs"
    import os

    assert os.environ[ENV_VARS["enabled"]] == "1" and os.environ[ENV_VARS["batch_threshold"]] == "64"
    assert os.environ[ENV_VARS["policy"]] == "measure" and ENV_VARS["plan_path"] not in os.environ


def test_cli_hook_leaves_env_alone_without_flags(clean_env):
    import os

    clean_env.setenv(ENV_VARS["plan_path"], "/tmp/p.json")
    parser = argparse.ArgumentParser()
    launcher_hooks.after_add_cli_args(None, parser)
    launcher_hooks.around_from_cli_args(lambda cls, ns: None, "ServerArgs", parser.parse_args([]))
    assert ENV_VARS["enabled"] not in os.environ and os.environ[ENV_VARS["plan_path"]] == "/tmp/p.json"


def _args(**fields):
    base = dict(moe_runner_backend="auto", ep_size=1, moe_a2a_backend="none", enable_lora=None, lora_paths=None)
    return types.SimpleNamespace(**{**base, **fields})


def test_post_init_is_inert_when_off(clean_env):
    args = _args(moe_runner_backend="triton_kernel", ep_size=4)
    assert launcher_hooks.before_post_init(args) is None
    assert args.moe_runner_backend == "triton_kernel"


@pytest.fixture
def enabled_env(clean_env):
    clean_env.setenv(ENV_VARS["enabled"], "1")
    clean_env.setattr(launcher_hooks.targets, "require_targets", lambda: None)
    clean_env.setattr(launcher_hooks, "triton_kernels_importable", lambda: True)
    return clean_env


def test_post_init_pins_auto_to_triton(enabled_env):
    args = _args()
    launcher_hooks.before_post_init(args)
    assert args.moe_runner_backend == "triton"
    explicit = _args(moe_runner_backend="triton")
    launcher_hooks.before_post_init(explicit)
    assert explicit.moe_runner_backend == "triton"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"moe_runner_backend": "triton_kernel"}, "moe_runner_backend='triton_kernel'"),
        ({"moe_runner_backend": "flashinfer_cutlass"}, "moe_runner_backend='flashinfer_cutlass'"),
        ({"ep_size": 2}, "ep_size=2"),
        ({"moe_a2a_backend": "deepep"}, "moe_a2a_backend='deepep'"),
        ({"enable_lora": True}, "enable_lora=True"),
        ({"enable_torch_compile": True}, "enable_torch_compile=True"),
    ],
)
def test_post_init_refuses_unsupported_options(enabled_env, fields, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        launcher_hooks.before_post_init(_args(**fields))


def test_post_init_refuses_without_triton_kernels(enabled_env):
    enabled_env.setattr(launcher_hooks, "triton_kernels_importable", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton_kernels package"):
        launcher_hooks.before_post_init(_args())


def test_post_init_refuses_missing_targets(clean_env, no_sglang):
    clean_env.setenv(ENV_VARS["enabled"], "1")
    with pytest.raises(RuntimeError, match=r"lacks hook target .*supported SGLang versions: 0\.5\.17"):
        launcher_hooks.before_post_init(_args())


def test_post_init_names_a_malformed_env_var(clean_env):
    clean_env.setenv(ENV_VARS["policy"], "fastest")
    with pytest.raises(ValueError, match="SGLANG_ADAPTIVE_MOE_POLICY"):
        launcher_hooks.before_post_init(_args())


# --- the capture/selection core with a fake graph backend ----------------------------------------


class FakeGraph:
    def __init__(self, kernel):
        self.kernel = kernel
        self.was_reset = False

    def reset(self):
        self.was_reset = True


class FakeBackend:
    """Stands in for FullCudaGraphBackend: `_graphs`/`_outputs` by key, `replay` returns the output."""

    def __init__(self):
        self._graphs, self._outputs, self.replayed = {}, {}, []

    def replay(self, key, batch):
        self.replayed.append((key, self._graphs[key].kernel))
        return self._outputs[key]


def fake_capture_one(switch, log):
    """The stock capture_one: records which kernel the switch forces, stores a graph under the key."""

    def original(backend, key, forward_fn, *args, **kwargs):
        kernel = switch.forced_kernel
        log.append((key, kernel))
        backend._graphs[key] = FakeGraph(kernel)
        backend._outputs[key] = f"out-{key}-{kernel}"

    return original


# Median ms per (bs, kernel): triton wins small batches, triton_kernels from 64.
TIMES = {1: (0.010, 0.020), 8: (0.012, 0.020), 64: (0.030, 0.025), 256: (0.090, 0.050)}


def timer_for(backend):
    def timer(replay):
        replay()
        key, kernel = backend.replayed[-1]
        return TIMES[key][KERNELS.index(kernel)]

    return timer


def run_capture(**kwargs):
    switch = KernelSwitch(AdaptiveMoESettings(enabled=True))
    backend, log = FakeBackend(), []
    mkc = MultiKernelCapture(backend, switch=switch, timer=timer_for(backend), **kwargs)
    original = fake_capture_one(switch, log)
    for bs in sorted(TIMES, reverse=True):
        mkc.capture_one(original, backend, bs, lambda: None, capture_inputs=None)
        assert len(backend._graphs) == len({k for k, _ in log}), "one variant stays installed per shape"
    return mkc, backend, log, mkc.select()


def test_measure_keeps_the_fastest_and_releases_the_loser():
    mkc, backend, log, report = run_capture()
    assert [k for _, k in log] == list(KERNELS) * len(TIMES)  # both kernels, forced, per shape
    winners = {bs: KERNELS[min(range(2), key=lambda i: TIMES[bs][i])] for bs in TIMES}
    assert report.winners() == winners == {1: "triton", 8: "triton", 64: "triton_kernels", 256: "triton_kernels"}
    for bs, kernel in winners.items():
        assert backend._graphs[bs].kernel == kernel and backend._outputs[bs] == f"out-{bs}-{kernel}"
        assert mkc.installed_kernel(bs) == kernel
    # every shape timed with every kernel, the same (fixed) number of timer calls
    assert sorted(backend.replayed) == sorted((bs, k) for bs in TIMES for k in KERNELS)
    row = {r.bucket: r for r in report.rows}
    assert row[256].margin == pytest.approx(0.090 / 0.050) and row[1].times_ms == dict(
        zip(KERNELS, TIMES[1], strict=True)
    )
    assert report.policy == "measure" and report.measured
    assert report.capture_s_all >= report.capture_s_installed > 0


def test_losers_are_reset_and_winners_kept():
    switch = KernelSwitch()
    backend, log = FakeBackend(), []
    mkc = MultiKernelCapture(backend, switch=switch, timer=timer_for(backend))
    mkc.capture_one(fake_capture_one(switch, log), backend, 1, lambda: None)
    graphs = dict(mkc._variants[1])
    mkc.select()
    assert graphs["triton_kernels"].graph.was_reset and not graphs["triton"].graph.was_reset


def test_plan_choice_captures_only_winners():
    plan = {1: "triton_kernels", 8: "triton", 64: "triton", 256: "triton_kernels"}
    mkc, backend, log, report = run_capture(plan_choice=plan)
    assert dict(log) == plan and not backend.replayed
    assert report.policy == "plan" and not report.measured and report.winners() == plan
    assert report.capture_s_all == pytest.approx(report.capture_s_installed)


def test_threshold_policy_captures_the_threshold_kernel():
    mkc, backend, log, report = run_capture(policy="threshold", threshold=64)
    assert dict(log) == {1: "triton", 8: "triton", 64: "triton_kernels", 256: "triton_kernels"}
    assert not backend.replayed and report.policy == "threshold"
    assert mkc.static_kernel(63) == "triton" and mkc.kernels_for(64) == ("triton_kernels",)


def test_capture_core_rejects_bad_arguments():
    with pytest.raises(TypeError, match="has no dict _graphs"):
        MultiKernelCapture(object())
    with pytest.raises(ValueError, match="unknown kernel 'cutlass'"):
        MultiKernelCapture(FakeBackend(), kernels=("triton", "cutlass"))
    with pytest.raises(ValueError, match="policy must be"):
        MultiKernelCapture(FakeBackend(), policy="fixed")
    with pytest.raises(ValueError, match="plan chooses 'cutlass' for bs=8"):
        MultiKernelCapture(FakeBackend(), plan_choice={8: "cutlass"})


def test_report_table_and_overheads():
    rows = (
        ShapeRow(
            1,
            {"triton": 0.0412, "triton_kernels": 0.055},
            "triton",
            0.055 / 0.0412,
            {"triton": 1.0, "triton_kernels": 1.5},
        ),
        ShapeRow(256, {}, "triton_kernels", 1.0, {"triton_kernels": 2.0}),
    )
    report = CaptureReport("measure", KERNELS, rows, measure_s=0.5, timed_replays=20)
    text = format_report(report, extra_weight_bytes=0, rule=EagerRule(1536))
    lines = text.splitlines()
    assert "policy measure, 2 shape(s), 20 timed replays per kernel" in lines[0]
    assert lines[1].split() == ["bs", "triton", "us", "triton_kernels", "us", "winner", "margin"]
    assert lines[2].split() == ["1", "41.2", "55.0", "triton", "1.33x"]
    assert lines[3].split() == ["256", "-", "-", "triton_kernels", "-"]
    assert "4.50 s for every captured variant vs 3.00 s for the kept kernels alone (+1.50 s)" in text
    assert "triton_kernels from 1536 tokens (threshold)" in text
    assert text.endswith("extra MoE weight memory: 0 bytes per GPU")


def _metadata(buckets):
    return PlanMetadata(
        gpu="NVIDIA H100 80GB HBM3",
        sm_count=132,
        torch="2.11.0",
        triton="3.6.0",
        sglang="0.5.17",
        triton_kernels="matmul_ogs",
        spec=preset("gpt-oss-20b").to_json(),
        buckets=buckets,
        kernels=KERNELS,
    )


def test_plan_from_report_round_trips(tmp_path):
    _, _, _, report = run_capture()
    plan = plan_from_report(report, _metadata(tuple(sorted(TIMES))))
    assert plan.winners() == report.winners() and plan.eager_kernel == "triton_kernels"
    saved = plan.save(tmp_path / "plan.json")
    from moe_dispatch.plan import Plan

    assert Plan.load(saved) == plan
    assert EagerRule.from_winners(plan.winners(), 1536, "plan").crossover == 64
    with pytest.raises(ValueError, match=r"no row for bucket\(s\) \[512\]"):
        plan_from_report(report, _metadata((1, 8, 64, 256, 512)))


def test_all_ranks_without_group_is_the_local_flag():
    assert decode_capture._all_ranks(True, None) and not decode_capture._all_ranks(False, None)
