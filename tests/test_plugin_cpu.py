"""The SGLang plugin without SGLang or a GPU: load(), the target table, the kernel switch,
the launcher hooks on plain objects, and the start-up (sizes, rules, plan, probe table) driven by fakes.

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
from moe_dispatch.plan import Plan, PlanMetadata
from moe_dispatch.sglang_plugin import launcher_hooks, probe, startup, targets
from moe_dispatch.sglang_plugin.kernel_switch import (
    KERNELS,
    FixedRule,
    KernelSwitch,
    SizeRule,
    ThresholdRule,
    static_rule,
)
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
    assert {"forward_cuda", "create_moe_runner", "load_model", "init_cuda_graphs", "replay"} <= hooked


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
    assert switch.rule == ThresholdRule(8)
    assert switch.kernel_for(7) == "triton" and switch.kernel_for(8) == "triton_kernels"
    with pytest.raises(ValueError, match="threshold must be a positive int, got 0"):
        ThresholdRule(0)


def test_fixed_policy_gives_one_kernel_everywhere():
    settings = AdaptiveMoESettings(enabled=True, policy="fixed", kernel="triton_kernels")
    rule = static_rule(settings)
    assert rule == FixedRule("triton_kernels") and {rule.kernel_for(n) for n in (1, 64, 9000)} == {"triton_kernels"}
    with pytest.raises(ValueError, match="unknown kernel 'cutlass'"):
        FixedRule("cutlass")


def test_size_rule_rounds_up_and_keeps_the_largest_winner_above():
    rule = SizeRule.from_winners(
        {1: "triton", 8: "triton", 32: "triton_kernels", 512: "triton", 8192: "triton_kernels"}
    )
    assert [rule.kernel_for(n) for n in (0, 1, 2, 8, 9, 32, 33, 512, 513, 8192, 20000)] == [
        "triton",
        "triton",
        "triton",
        "triton",
        "triton_kernels",
        "triton_kernels",
        "triton",
        "triton",
        "triton_kernels",
        "triton_kernels",
        "triton_kernels",
    ]
    assert rule.describe() == (
        "triton for 1-8, triton_kernels for 32, triton for 512, triton_kernels for 8192 tokens and above (measured)"
    )


@pytest.mark.parametrize(
    ("sizes", "kernels", "match"),
    [
        ((), (), "one kernel per size"),
        ((1, 2), ("triton",), "one kernel per size"),
        ((2, 1), ("triton", "triton"), "strictly increasing"),
        ((0, 1), ("triton", "triton"), "positive"),
        ((1,), ("cutlass",), "unknown kernel"),
    ],
)
def test_size_rule_rejects_bad_tables(sizes, kernels, match):
    with pytest.raises(ValueError, match=match):
        SizeRule(sizes, kernels)


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


# --- start-up: sizes, plan, probe table, rule choice ---------------------------------------------


def test_sizes_cover_decode_prefill_and_eager_sizes():
    sizes = startup.sizes_to_measure([1, 2, 4, 256], [64, 512, 1024, 9000], 4096)
    assert sizes == (1, 2, 4, 64, 256, 512, 1024, 2048, 4096)  # 9000 is above every eager call
    assert startup.sizes_to_measure([1], [], None)[-1] == startup.DEFAULT_MAX_TOKENS
    assert startup.sizes_to_measure([1], [], 10**6)[-1] == startup.MAX_PROBE_TOKENS
    assert startup.sizes_to_measure([8], [], 600) == (8, 512, 600)


def test_server_sizes_reads_cuda_graph_config():
    ns = types.SimpleNamespace
    args = ns(
        cuda_graph_config=ns(decode=ns(backend="full", bs=[1, 2, 4]), prefill=ns(backend="breakable", bs=[256, 512])),
        chunked_prefill_size=8192,
    )
    assert startup.server_sizes(args) == ((1, 2, 4), (256, 512), 8192)
    args.cuda_graph_config.prefill.backend = "disabled"
    args.chunked_prefill_size = None
    assert startup.server_sizes(args) == ((1, 2, 4), (), None)
    assert startup.server_sizes(ns()) == ((), (), None)


def _probe_result():
    rows = (
        probe.SizeTimes(1, {"triton": 0.030, "triton_kernels": 0.100}, "triton"),
        probe.SizeTimes(64, {"triton": 0.300, "triton_kernels": 0.280}, "triton_kernels"),
        probe.SizeTimes(4096, {"triton": 1.1, "triton_kernels": 0.6}, "triton_kernels"),
    )
    return probe.ProbeResult(rows, layers=4, seconds=2.5)


def _metadata(sizes=(1, 64, 4096)):
    return PlanMetadata("H200", 132, "2.11", "3.6", "0.5.17", "matmul_ogs", {"E": 128}, sizes, KERNELS, 1)


def test_probe_table_and_startup_line():
    text = probe.format_table(_probe_result())
    assert "3 sizes x 2 kernels on 4 layer(s) in 2.50 s" in text
    assert re.search(r"\s1\s+30\.0\s+100\.0\s+triton\s+3\.33x", text)
    assert re.search(r"\s4096\s+1100\.0\s+600\.0\s+triton_kernels\s+1\.83x", text)
    assert startup.startup_line(1.234, 3, "measured") == "adaptive MoE start-up: measure_s=1.23 sizes=3 source=measured"


def test_plan_from_probe_round_trips(tmp_path):
    plan = startup.plan_from_probe(_probe_result(), _metadata())
    assert plan.winners() == {1: "triton", 64: "triton_kernels", 4096: "triton_kernels"}
    assert plan.eager_kernel == "triton_kernels"
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and loaded.choices[0].times_ms == {"triton": 0.030, "triton_kernels": 0.100}


class _FakeModelRunner:
    def __init__(self, server_args):
        self.server_args = server_args
        self.tp_group = types.SimpleNamespace(world_size=1, cpu_group=None)
        self.tp_rank = 0
        self._moe_dispatch_pairs = [("topk", "moe")]


def _server_args():
    ns = types.SimpleNamespace
    return ns(
        cuda_graph_config=ns(decode=ns(backend="full", bs=[1, 64]), prefill=ns(backend="breakable", bs=[4096])),
        chunked_prefill_size=4096,
    )


@pytest.fixture
def fake_switch(monkeypatch):
    switch = KernelSwitch()
    switch.first_spec = preset("gpt-oss-120b", tp=8)
    monkeypatch.setattr(startup, "SWITCH", switch)
    monkeypatch.setattr(
        startup.PlanMetadata, "current", staticmethod(lambda spec, sizes, kernels, world: _metadata(sizes))
    )
    return switch


def test_startup_measures_once_saves_a_plan_and_a_restart_reuses_it(fake_switch, monkeypatch, tmp_path, caplog):
    calls = []

    def fake_probe(pairs, spec, sizes, switch, group=None, kernels=KERNELS, progress=None):
        calls.append(tuple(sizes))
        rows = tuple(probe.SizeTimes(n, {}, "triton" if n < 32 else "triton_kernels") for n in sizes)
        return probe.ProbeResult(rows, layers=1, seconds=0.1)

    monkeypatch.setattr(probe, "probe_sizes", fake_probe)
    plan_path = tmp_path / "plan.json"
    fake_switch.configure(AdaptiveMoESettings(enabled=True, plan_path=str(plan_path)))
    runner = _FakeModelRunner(_server_args())
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(runner)
        startup.before_init_cuda_graphs(runner)  # a second capture of the same runner keeps the rule
    assert calls == [(1, 64, 512, 1024, 2048, 4096)]
    assert isinstance(fake_switch.rule, SizeRule) and fake_switch.rule.kernel_for(32) == "triton_kernels"
    assert "source=measured" in caplog.text and plan_path.exists()

    restarted = _FakeModelRunner(_server_args())
    caplog.clear()
    fake_switch.configure(AdaptiveMoESettings(enabled=True, plan_path=str(plan_path)))
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(restarted)
    assert len(calls) == 1 and "measure_s=0.00 sizes=0 source=plan" in caplog.text
    assert fake_switch.rule.source == f"plan {plan_path}" and fake_switch.rule.kernel_for(1) == "triton"


@pytest.mark.parametrize(
    ("settings", "source", "kernel_at_64"),
    [
        (AdaptiveMoESettings(enabled=True, policy="threshold", batch_threshold=32), "threshold", "triton_kernels"),
        (AdaptiveMoESettings(enabled=True, policy="fixed", kernel="triton"), "fixed", "triton"),
    ],
)
def test_static_policies_measure_nothing(fake_switch, monkeypatch, caplog, settings, source, kernel_at_64):
    monkeypatch.setattr(probe, "probe_sizes", lambda *a, **k: pytest.fail("a static policy must not measure"))
    fake_switch.configure(settings)
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_FakeModelRunner(_server_args()))
    assert f"source={source}" in caplog.text and fake_switch.kernel_for(64) == kernel_at_64


def test_startup_leaves_draft_workers_and_disabled_runs_alone(fake_switch, monkeypatch):
    monkeypatch.setattr(probe, "probe_sizes", lambda *a, **k: pytest.fail("must not measure"))
    fake_switch.configure(AdaptiveMoESettings(enabled=True))
    draft = _FakeModelRunner(_server_args())
    draft.is_draft_worker = True
    startup.before_init_cuda_graphs(draft)
    no_layers = _FakeModelRunner(_server_args())
    no_layers._moe_dispatch_pairs = []
    startup.before_init_cuda_graphs(no_layers)
    assert isinstance(fake_switch.rule, ThresholdRule)


def test_all_ranks_without_group_is_the_local_flag():
    assert startup._all_ranks(True, None) and not startup._all_ranks(False, None)
