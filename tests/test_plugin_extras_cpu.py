"""The plugin's opt-in candidates (triton_tuned, triton_kernels_tuned, small_batch): start-up, switch,
forward hook (CPU, no SGLang)."""

from __future__ import annotations

import contextlib
import logging
import types

import pytest
import torch

from moe_dispatch import tk_flags_table, tuned_configs
from moe_dispatch.backends.tk_matmul_flags import MatmulFlags
from moe_dispatch.plan import PlanMetadata
from moe_dispatch.sglang_plugin import layer_hooks, probe, startup
from moe_dispatch.sglang_plugin.kernel_switch import (
    KERNELS,
    SMALL_BATCH_BACKEND,
    TK_TUNED_KERNEL,
    TUNED_KERNEL,
    KernelSwitch,
    SizeRule,
)
from moe_dispatch.sglang_plugin.settings import AdaptiveMoESettings
from moe_dispatch.spec import preset
from moe_dispatch.tuned_configs import BucketConfig, TileConfig, TunedConfigError, TunedKey, TunedTable, shape_key
from tests.cases import Case

SPEC = preset("gpt-oss-120b", tp=8)
TINY = Case(0, 4, True, "swiglu").spec()  # GPT-OSS-like (biases, SwiGLU), small enough to fill on the CPU
SMALL = BucketConfig(TileConfig(16, 64, 128, 1, 4, 3), TileConfig(16, 64, 64, 1, 4, 4))
LARGE = BucketConfig(TileConfig(64, 128, 64, 8, 8, 3), TileConfig(64, 64, 64, 8, 4, 3))
TABLE = TunedTable(TunedKey("NVIDIA H200", "3.6.0", shape_key(SPEC)), {8: SMALL, 1024: LARGE}, "2026-11-29")


class _Method:
    """Stands for an UnquantizedFusedMoEMethod (weak-referenceable, hashable by identity)."""


def _runner(pairs):
    ns = types.SimpleNamespace
    server_args = ns(
        cuda_graph_config=ns(decode=ns(backend="full", bs=[1, 8]), prefill=ns(backend="breakable", bs=[1024])),
        chunked_prefill_size=1024,
    )
    return ns(server_args=server_args, tp_group=ns(world_size=1, cpu_group=None), tp_rank=0, _moe_dispatch_pairs=pairs)


@pytest.fixture
def switch(monkeypatch):
    switch = KernelSwitch()
    switch.first_spec = SPEC
    monkeypatch.setattr(startup, "SWITCH", switch)
    monkeypatch.setattr(
        startup.PlanMetadata,
        "current",
        staticmethod(
            lambda spec, sizes, kernels, world: PlanMetadata(
                "H200", 132, "2.11", "3.6", "0.5.17", "tk", {}, sizes, kernels, world
            )
        ),
    )
    return switch


def _fake_probe(seen):
    def fake(pairs, spec, sizes, switch, group=None, kernels=KERNELS, progress=None):
        seen.append(tuple(kernels))
        winner = {1: "triton", 8: TUNED_KERNEL if TUNED_KERNEL in kernels else "triton"}
        rows = tuple(probe.SizeTimes(n, dict.fromkeys(kernels, 0.1), winner.get(n, "triton_kernels")) for n in sizes)
        return probe.ProbeResult(rows, layers=1, seconds=0.1)

    return fake


def test_without_a_table_tuned_adds_no_candidate_and_says_why(switch, monkeypatch, caplog):
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(probe, "probe_sizes", _fake_probe(seen))
    monkeypatch.setattr(tuned_configs, "find_table", lambda spec: None)
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=("triton_tuned",)))
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_runner([("topk", types.SimpleNamespace(quant_method=_Method()))]))
    assert seen == [KERNELS] and switch.kernels == KERNELS and switch.tuned_table is None
    assert "triton_tuned is not a candidate: no tuned table for E=128,H=2880,I=360" in caplog.text


def test_a_broken_table_is_logged_and_ignored(switch, monkeypatch, caplog):
    def broken(spec):
        raise tuned_configs.TunedConfigError("table.json: checksum mismatch")

    monkeypatch.setattr(probe, "probe_sizes", _fake_probe([]))
    monkeypatch.setattr(tuned_configs, "find_table", broken)
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=("triton_tuned",)))
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_runner([("topk", types.SimpleNamespace(quant_method=_Method()))]))
    assert switch.kernels == KERNELS and "tuned table unusable: table.json: checksum mismatch" in caplog.text


def test_with_a_table_triton_tuned_is_measured_and_applies_to_the_probed_layers(switch, monkeypatch, caplog):
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(probe, "probe_sizes", _fake_probe(seen))
    monkeypatch.setattr(tuned_configs, "find_table", lambda spec: TABLE)
    tuned_method, other_method = _Method(), _Method()
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=("triton_tuned",)))
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_runner([("topk", types.SimpleNamespace(quant_method=tuned_method))]))
    assert seen == [(*KERNELS, TUNED_KERNEL)] and switch.kernels == (*KERNELS, TUNED_KERNEL)
    assert isinstance(switch.rule, SizeRule) and switch.rule.kernel_for(8) == TUNED_KERNEL
    assert "triton_tuned is a candidate for 1 layer(s)" in caplog.text
    assert switch.tuned_config(tuned_method, 8) == SMALL  # the rule runs triton_tuned at 8
    assert switch.tuned_config(tuned_method, 1) is None  # triton at 1: stock configs
    assert switch.tuned_config(other_method, 8) is None  # not a probed layer
    with switch.forced(TUNED_KERNEL):
        assert switch.tuned_config(tuned_method, 1000) == LARGE
    switch.configure(AdaptiveMoESettings(enabled=True))  # a new configuration forgets the table
    assert switch.kernels == KERNELS and switch.tuned_config(tuned_method, 8) is None


def test_tuned_needs_policy_measure_and_static_policies_never_look(switch, monkeypatch):
    monkeypatch.setattr(tuned_configs, "find_table", lambda spec: pytest.fail("threshold must not look for a table"))
    switch.configure(AdaptiveMoESettings(enabled=True, policy="threshold"))
    startup.before_init_cuda_graphs(_runner([("topk", types.SimpleNamespace(quant_method=_Method()))]))
    assert switch.kernels == KERNELS


@pytest.fixture
def hook_env(monkeypatch):
    """layer_hooks with a fake SGLang checker (standard-format routing) and a recording tile-config context."""
    switch = KernelSwitch()
    monkeypatch.setattr(layer_hooks, "SWITCH", switch)
    checker = types.SimpleNamespace(format_is_triton_kernels=lambda topk_output: False)
    monkeypatch.setattr(layer_hooks, "_sgl", lambda: types.SimpleNamespace(TopKOutputChecker=checker))
    active: list[BucketConfig] = []
    entered: list[BucketConfig] = []

    @contextlib.contextmanager
    def recording(bucket):
        entered.append(bucket)
        active.append(bucket)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(layer_hooks, "sglang_tile_configs", recording)
    return switch, active, entered


def _dispatch(num_tokens):
    return types.SimpleNamespace(hidden_states=types.SimpleNamespace(shape=(num_tokens, 2880)), topk_output=None)


def test_forward_hook_runs_the_stock_path_inside_the_tuned_configs(hook_env):
    switch, active, entered = hook_env
    method = _Method()
    switch.rule = SizeRule((8, 1024), (TUNED_KERNEL, "triton"))
    switch.enable_tuned(TABLE, [method])
    during: list[list[BucketConfig]] = []

    def original(m, layer, dispatch):
        during.append(list(active))
        return "out"

    assert layer_hooks.around_unquant_forward_cuda(original, method, "layer", _dispatch(5)) == "out"
    assert during == [[SMALL]] and entered == [SMALL] and active == []
    layer_hooks.around_unquant_forward_cuda(original, method, "layer", _dispatch(600))  # rule: triton
    layer_hooks.around_unquant_forward_cuda(original, _Method(), "layer", _dispatch(5))  # not a tuned layer
    assert during[1:] == [[], []] and entered == [SMALL]


def test_forward_hook_without_a_table_is_stock(hook_env):
    switch, _active, entered = hook_env
    switch.rule = SizeRule((8,), ("triton",))
    calls = []
    layer_hooks.around_unquant_forward_cuda(lambda *a: calls.append(a), _Method(), "layer", _dispatch(3))
    assert len(calls) == 1 and entered == []


def test_the_serving_benchmarks_extra_mode_gives_valid_settings():
    from bench.serving import modes
    from moe_dispatch.sglang_plugin.settings import from_env

    settings = from_env(modes.overrides("extra", "/tmp/plan.json"))
    assert settings.enabled and settings.extra_kernels == ("triton_tuned", "triton_kernels_tuned", "small_batch")
    assert settings.policy == "measure"
    assert settings.plan_path == "/tmp/plan.json"


# --- triton_kernels_tuned -----------------------------------------------------------------------

TK_UP = MatmulFlags(True, 16, 256, 128, 4, 3)
TK_TABLE = tk_flags_table.TkFlagsTable(
    TABLE.key, {128: tk_flags_table.TkBucket(TK_UP, TK_UP), 1024: tk_flags_table.TkBucket(None, None)}, "2026-11-29"
)


def test_tk_tuned_is_measured_with_or_without_a_flags_table(switch, monkeypatch, caplog):
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(probe, "probe_sizes", _fake_probe(seen))
    monkeypatch.setattr(tk_flags_table, "find_tk_table", lambda spec: None)
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=(TK_TUNED_KERNEL,)))
    bare = _Method()
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_runner([("topk", types.SimpleNamespace(quant_method=bare))]))
    assert switch.kernels == (*KERNELS, TK_TUNED_KERNEL)
    assert "triton_kernels_tuned is a candidate for 1 layer(s) (no triton_kernels flags table" in caplog.text
    assert "triton_kernels' own flags with moe-dispatch's routing and combine" in caplog.text
    with switch.forced(TK_TUNED_KERNEL):
        assert switch.runs_tk_tuned(bare, 128) and switch.tk_flags(bare, 128) is None
    assert not switch.runs_tk_tuned(bare, 128)  # the rule runs another kernel there

    def broken(spec):
        raise TunedConfigError("sha256 mismatch")

    monkeypatch.setattr(tk_flags_table, "find_tk_table", broken)
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=(TK_TUNED_KERNEL,)))
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_runner([("topk", types.SimpleNamespace(quant_method=_Method()))]))
    assert switch.kernels == KERNELS
    assert "triton_kernels_tuned is not a candidate: triton_kernels flags table unusable: sha256" in caplog.text
    monkeypatch.setattr(tk_flags_table, "find_tk_table", lambda spec: TK_TABLE)
    method, other = _Method(), _Method()
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=(TK_TUNED_KERNEL,)))
    startup.before_init_cuda_graphs(_runner([("topk", types.SimpleNamespace(quant_method=method))]))
    assert seen[-1] == (*KERNELS, TK_TUNED_KERNEL) and switch.kernels == (*KERNELS, TK_TUNED_KERNEL)
    with switch.forced(TK_TUNED_KERNEL):
        assert switch.tk_flags(method, 128).up == TK_UP and switch.tk_flags(other, 128) is None
        assert switch.tk_flags(method, 1) is None  # no bucket within 2x: triton_kernels' own flags
    assert switch.tk_flags(method, 128) is None  # the rule runs another kernel there


def _marking(active: list[bool]):
    """A stand-in for a scoped swap (scoped_fast_combine, scoped_fast_routing): `active` is
    non-empty inside its block."""

    @contextlib.contextmanager
    def scoped():
        active.append(True)
        try:
            yield None
        finally:
            active.pop()

    return scoped


def test_forward_hook_steers_the_triton_kernels_runner_with_the_tables_flags(monkeypatch):
    switch = KernelSwitch()
    monkeypatch.setattr(layer_hooks, "SWITCH", switch)
    checker = types.SimpleNamespace(format_is_triton_kernels=lambda topk_output: True)
    monkeypatch.setattr(layer_hooks, "_sgl", lambda: types.SimpleNamespace(TopKOutputChecker=checker))
    info = types.SimpleNamespace(w13_weight="w13", w2_weight="w2")
    monkeypatch.setattr(layer_hooks, "tk_quant_info", lambda layer: info)
    monkeypatch.setattr(layer_hooks, "call_with_view_flags", lambda fn, *args: fn())
    steering: list[dict] = []
    active: list[dict] = []

    @contextlib.contextmanager
    def recording(flags):
        steering.append(dict(flags))
        active.append(dict(flags))
        try:
            yield bool(flags)
        finally:
            active.pop()

    combining: list[bool] = []
    monkeypatch.setattr(layer_hooks, "scoped_matmul_flags", recording)
    monkeypatch.setattr(layer_hooks, "scoped_fast_combine", _marking(combining))
    during: list[list[dict]] = []
    combined: list[bool] = []

    def run(dispatch, quant_info):
        during.append(list(active))
        combined.append(bool(combining))
        return "out"

    runner = types.SimpleNamespace(run=run)
    method = _Method()
    setattr(method, layer_hooks._TK_RUNNER, runner)
    layer = types.SimpleNamespace(w2_weight=torch.empty(128, 2880, 360, device="meta"))
    switch.rule = SizeRule((128, 8192), (TK_TUNED_KERNEL, "triton_kernels"))
    switch.enable_tk_tuned(TK_TABLE, [method])
    routing = types.SimpleNamespace(routing_data=types.SimpleNamespace(n_expts_act=4))
    dispatch = lambda n: types.SimpleNamespace(hidden_states=torch.empty(n, 2880, device="meta"), topk_output=routing)  # noqa: E731
    assert layer_hooks.around_unquant_forward_cuda(None, method, layer, dispatch(100)) == "out"
    assert during == [[{(720, 2880): TK_UP, (2880, 360): TK_UP}]] and combined == [True]
    layer_hooks.around_unquant_forward_cuda(None, method, layer, dispatch(4000))  # rule: triton_kernels
    assert during[-1] == [{}] and active == [] and combined[-1] is False  # stock: triton_kernels' reduce
    switch.enable_tk_tuned(None, [method])  # no flags table: own flags, still our combine
    layer_hooks.around_unquant_forward_cuda(None, method, layer, dispatch(100))
    assert during[-1] == [{}] and combined[-1] is True


def test_topk_hook_routes_tk_tuned_calls_with_the_fused_metadata(monkeypatch):
    switch = KernelSwitch()
    monkeypatch.setattr(layer_hooks, "SWITCH", switch)
    formats = {"triton": "STANDARD", "triton_kernels": "TRITON_KERNEL", TK_TUNED_KERNEL: "TRITON_KERNEL"}
    monkeypatch.setattr(layer_hooks, "_sgl", lambda: types.SimpleNamespace(formats=formats))
    fused: list[bool] = []
    monkeypatch.setattr(layer_hooks, "scoped_fast_routing", _marking(fused))
    seen: list[tuple[str, bool]] = []

    def original(topk, hidden, logits, **kwargs):
        seen.append((topk.topk_config.output_format, bool(fused)))
        return "routed"

    topk, other = _Method(), _Method()
    topk.topk_config = types.SimpleNamespace(output_format=None)
    switch.add_topk(topk)
    switch.rule = SizeRule((128, 8192), (TK_TUNED_KERNEL, "triton"))
    method = _Method()  # held: the switch keeps its layers weakly
    switch.enable_tk_tuned(None, [method])
    hidden = lambda n: torch.empty(n, 8, device="meta")  # noqa: E731
    assert layer_hooks.around_topk_forward_cuda(original, topk, hidden(100), None) == "routed"
    layer_hooks.around_topk_forward_cuda(original, topk, hidden(4000), None)  # rule: triton
    assert seen == [("TRITON_KERNEL", True), ("STANDARD", False)]
    assert topk.topk_config.output_format is None and not fused, "format and routing restored after each call"
    switch.enable_tk_tuned(None, [])  # tk_tuned not enabled: stock routing even where the rule names it
    layer_hooks.around_topk_forward_cuda(original, topk, hidden(100), None)
    layer_hooks.around_topk_forward_cuda(lambda *a, **k: seen.append("stock"), other, hidden(100), None)
    assert seen[2:] == [("TRITON_KERNEL", False), "stock"]


# --- small_batch --------------------------------------------------------------------------------


def _layer(spec, bias_dtype=torch.float32):
    """A FusedMoE stand-in: SGLang's Triton-layout parameters (w13 [E, 2I, H], w2 [E, H, I], fp32 biases)."""
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
    moe = types.SimpleNamespace(
        w13_weight=torch.randn(E, 2 * I, H, dtype=spec.dtype),
        w2_weight=torch.randn(E, H, I, dtype=spec.dtype),
        quant_method=_Method(),
    )
    if spec.bias:
        moe.w13_weight_bias = torch.randn(E, 2 * I, dtype=bias_dtype)
        moe.w2_weight_bias = torch.randn(E, H, dtype=bias_dtype)
    return moe


class _FakeSmallBatch:
    """Records what it was prepared with and called with; returns a recognisable output."""

    def __init__(self):
        self.prepared = []

    def prepare(self, spec, weights):
        weights.check(spec)  # the real backend's first step: shapes and dtypes as SGLang holds them
        self.prepared.append((spec, weights))
        return lambda hidden, logits: hidden * 0 + logits.sum()


def test_small_batch_is_prepared_over_each_layers_own_weights(switch, monkeypatch, caplog):
    import moe_dispatch.backends as backends

    fake = _FakeSmallBatch()
    monkeypatch.setattr(backends, "get_backend", lambda name: fake if name == SMALL_BATCH_BACKEND else None)
    monkeypatch.setattr(probe, "probe_sizes", _fake_probe([]))
    layers = [_layer(TINY), _layer(TINY)]
    switch.first_spec = TINY
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=("small_batch",)))
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_runner([("topk", moe) for moe in layers]))
    assert switch.kernels == (*KERNELS, SMALL_BATCH_BACKEND)
    assert "small_batch is a candidate for 2 layer(s)" in caplog.text
    for (spec, weights), moe in zip(fake.prepared, layers, strict=True):
        assert spec == TINY and weights.w13 is moe.w13_weight and weights.b2 is moe.w2_weight_bias  # no copies


def test_small_batch_refused_by_a_layer_is_logged_and_left_out(switch, monkeypatch, caplog):
    import moe_dispatch.backends as backends

    monkeypatch.setattr(backends, "get_backend", lambda name: _FakeSmallBatch())
    monkeypatch.setattr(probe, "probe_sizes", _fake_probe([]))
    switch.first_spec = TINY
    switch.configure(AdaptiveMoESettings(enabled=True, extra_kernels=("small_batch",)))
    with caplog.at_level(logging.INFO, logger="moe_dispatch.sglang_plugin"):
        startup.before_init_cuda_graphs(_runner([("topk", _layer(TINY, bias_dtype=torch.bfloat16))]))
    assert switch.kernels == KERNELS
    assert "small_batch is not a candidate: weights.b13 has dtype torch.bfloat16, expected torch.float32" in caplog.text


def test_forward_hook_runs_small_batch_on_the_router_logits(hook_env, monkeypatch):
    switch, _active, entered = hook_env
    combined = []
    sgl = types.SimpleNamespace(
        TopKOutputChecker=types.SimpleNamespace(format_is_triton_kernels=lambda topk_output: False),
        StandardCombineInput=lambda hidden_states: combined.append(hidden_states) or "combined",
    )
    monkeypatch.setattr(layer_hooks, "_sgl", lambda: sgl)
    method, calls = _Method(), []
    switch.rule = SizeRule((8, 64), (SMALL_BATCH_BACKEND, "triton"))
    switch.enable_small_batch({method: lambda hidden, logits: calls.append((hidden, logits)) or hidden + 1})
    hidden, logits = torch.zeros(5, 4, dtype=torch.bfloat16), torch.randn(5, 16, dtype=torch.bfloat16)
    dispatch = types.SimpleNamespace(hidden_states=hidden, topk_output=types.SimpleNamespace(router_logits=logits))

    def stock(*args):
        return "stock"

    assert layer_hooks.around_unquant_forward_cuda(stock, method, "layer", dispatch) == "combined"
    assert calls[0][1] is logits and torch.equal(combined[0], hidden + 1)
    assert layer_hooks.around_unquant_forward_cuda(stock, _Method(), "layer", dispatch) == "stock"  # not enabled
    wide = types.SimpleNamespace(hidden_states=torch.zeros(40, 4, dtype=torch.bfloat16), topk_output=None)
    assert layer_hooks.around_unquant_forward_cuda(stock, method, "layer", wide) == "stock"  # rule: triton
    fp32 = types.SimpleNamespace(hidden_states=hidden, topk_output=types.SimpleNamespace(router_logits=logits.float()))
    assert layer_hooks.around_unquant_forward_cuda(stock, method, "layer", fp32) == "stock"  # logged, stock path
    assert len(calls) == 1 and entered == []
