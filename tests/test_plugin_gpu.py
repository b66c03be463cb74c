"""The SGLang plugin against real SGLang 0.5.17 on a GPU.

Needs the package installed so its entry point exists
(`pip install --no-deps --no-build-isolation -e .`) and SGLang importable
(`source .gpu-deps/env.sh`).

HookRegistry keeps class-level state, and `HookRegistry.reset()` forgets hooks without
un-patching their targets, so applying again after a reset would wrap a target twice.
This module therefore applies every plugin hook ONCE (module fixture `sglang_env`), and the
checks that need an unpatched SGLang (plugin discovery, flag off) run in fresh subprocesses.
"""

import argparse
import functools
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moe_dispatch.backends.tk_routing import MAX_TOKENS
from moe_dispatch.reference import reference_moe
from moe_dispatch.sglang_plugin import standalone
from moe_dispatch.sglang_plugin.settings import ENV_VARS, AdaptiveMoESettings, from_cli_namespace
from moe_dispatch.spec import GPT_OSS_SWIGLU, MoESpec, Routing
from moe_dispatch.testing import TOLERANCES, Tolerance, assert_close
from moe_dispatch.weights import ExpertWeights, random_inputs

pytestmark = pytest.mark.gpu

# A GPT-OSS-shaped layer, small: biases, interleaved SwiGLU(1.702, 7.0), top-k then softmax.
SPEC = MoESpec(16, 4, 512, 256, GPT_OSS_SWIGLU, bias=True, dtype=torch.bfloat16, routing=Routing.TOPK_SOFTMAX)
BATCHES = (1, 7, 64, 300)
CAPTURE_BS = (1, 8, 64)
# Same kernel, same inputs: only launch-config noise is allowed between plugin and stock.
SAME = Tolerance(rms=1e-3, max=1e-2)


init_single_rank = standalone.init_single_rank
forward = standalone.forward


def build_layer(runner_backend: str, weights: ExpertWeights, layer_id: int = 0):
    return standalone.build_layer(SPEC, runner_backend, weights, layer_id)


@pytest.fixture(scope="module")
def weights():
    return ExpertWeights.random(SPEC, device="cuda", seed=0)


@pytest.fixture(scope="module")
def sglang_env():
    """One-rank SGLang state and every plugin hook applied once (see the module docstring)."""
    init_single_rank()
    from sglang.srt.plugins.hook_registry import HookRegistry

    from moe_dispatch.sglang_plugin import launcher_hooks, layer_hooks, startup
    from moe_dispatch.sglang_plugin.kernel_switch import SWITCH

    SWITCH.configure(AdaptiveMoESettings(enabled=True))
    launcher_hooks.register()
    layer_hooks.register()
    startup.register()
    HookRegistry.apply_hooks()
    return SWITCH


@pytest.fixture(scope="module")
def layers(sglang_env, weights):
    """(adaptive pair, stock triton pair, stock triton_kernel pair), all built after the hooks applied."""
    from moe_dispatch.sglang_plugin.layer_hooks import enable_for_layer

    adaptive = build_layer("triton", weights)
    support = enable_for_layer(*adaptive)
    assert support, support.reason
    return adaptive, build_layer("triton", weights), build_layer("triton_kernel", weights)


@pytest.fixture
def env_guard():
    saved = {var: os.environ.get(var) for var in ENV_VARS.values()}
    yield
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


# --- (1) discovery, (5) flag off: fresh processes with SGLang's own plugin loader ----------------

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
from moe_dispatch.sglang_plugin import targets
hooked = targets.LAUNCHER_TARGETS + targets.SCHEDULER_TARGETS
before = {t: targets.resolve(t) for t in hooked}
load_plugins()
after = {t: targets.resolve(t) for t in hooked}
out = {"patched": sorted(t for t in hooked if before[t] is not after[t]), "registered": sorted(HookRegistry._hooks)}
if len(sys.argv) > 2:  # also run a stock layer here and save its output
    import torch
    import test_plugin_gpu as t
    t.init_single_rank()
    w = t.ExpertWeights.random(t.SPEC, device="cuda", seed=0)
    x, logits = t.random_inputs(t.SPEC, 64, device="cuda", seed=64)
    torch.save(t.forward(*t.build_layer("triton", w), x, logits).cpu(), sys.argv[2])
print(json.dumps(out))
"""


def run_probe(adaptive_env: str | None, layer_out: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()}
    env["SGLANG_PLUGINS"] = "moe_dispatch"
    if adaptive_env is not None:
        env[ENV_VARS["enabled"]] = adaptive_env
    argv = [sys.executable, "-c", PROBE, str(Path(__file__).parent)] + ([str(layer_out)] if layer_out else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_entry_point_is_discovered_and_loaded_by_sglang():
    from moe_dispatch import sglang_plugin
    from moe_dispatch.sglang_plugin import targets

    (ep,) = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "moe_dispatch"]
    assert ep.value == "moe_dispatch.sglang_plugin:load" and ep.load() is sglang_plugin.load
    probe = run_probe(adaptive_env="1")  # SGLang's load_plugins() ran our load(): targets patched
    assert set(targets.LAUNCHER_TARGETS + targets.SCHEDULER_TARGETS) <= set(probe["patched"])


def test_flag_off_patches_no_scheduler_target(tmp_path, weights, sglang_env, layers):
    from moe_dispatch.sglang_plugin import targets

    probe = run_probe(adaptive_env=None, layer_out=tmp_path / "stock.pt")
    assert probe["patched"] == sorted(targets.LAUNCHER_TARGETS)  # flags only; inert while off
    assert not set(targets.SCHEDULER_TARGETS) & set(probe["registered"])
    # The truly stock layer (unpatched process) and this process's un-paired layer agree.
    stock = torch.load(tmp_path / "stock.pt")
    x, logits = random_inputs(SPEC, 64, device="cuda", seed=64)
    _, stock_triton, _ = layers
    assert torch.equal(forward(*stock_triton, x, logits).cpu(), stock)


# --- (2) the flags through SGLang's real parser and ServerArgs ---------------------------------


def test_flags_parse_through_sglang_argument_parser(sglang_env, env_guard):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    argv = ["--model-path", "dummy", "--enable-adaptive-moe", "--adaptive-moe-batch-threshold", "512"]
    argv += ["--adaptive-moe-policy", "threshold", "--adaptive-moe-plan", "/tmp/moe-plan.json"]
    ns = parser.parse_args(argv)
    assert from_cli_namespace(ns, {}) == AdaptiveMoESettings(True, 512, "threshold", "/tmp/moe-plan.json")
    assert ns.moe_runner_backend == "auto"  # SGLang's own flags still parse
    assert from_cli_namespace(parser.parse_args(["--model-path", "dummy"]), {}) == AdaptiveMoESettings()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "dummy", "--adaptive-moe-policy", "fastest"])

    # from_cli_args publishes the settings for children; __post_init__ then refuses triton_kernel.
    ns = parser.parse_args(["--model-path", "dummy", "--enable-adaptive-moe", "--moe-runner-backend", "triton_kernel"])
    with pytest.raises(ValueError, match="moe_runner_backend='triton_kernel'"):
        ServerArgs.from_cli_args(ns)
    assert os.environ[ENV_VARS["enabled"]] == "1" and os.environ[ENV_VARS["batch_threshold"]] == "1536"


# --- (3) same result as stock SGLang with each backend forced -----------------------------------


@pytest.mark.parametrize("num_tokens", BATCHES)
def test_layer_matches_stock_with_each_backend(sglang_env, layers, weights, num_tokens):
    from moe_dispatch.sglang_plugin.kernel_switch import SizeRule
    from moe_dispatch.sglang_plugin.layer_hooks import extra_weight_bytes

    switch = sglang_env
    (topk, moe), stock_triton, stock_tk = layers
    x, logits = random_inputs(SPEC, num_tokens, device="cuda", seed=num_tokens)
    ref = reference_moe(SPEC, weights, x, logits)
    expected = {
        "triton": forward(*stock_triton, x, logits),
        "triton_kernels": forward(*stock_tk, x, logits, "triton_kernel"),
    }
    for kernel, stock in expected.items():
        with switch.forced(kernel):
            out = forward(topk, moe, x, logits)
        assert topk.topk_config.output_format is None, "the per-call format must be restored"
        assert_close(out, stock, SPEC.dtype, f"plugin {kernel} vs stock T={num_tokens}", tol=SAME)
        assert_close(out, ref, SPEC.dtype, f"plugin {kernel} vs reference T={num_tokens}", tol=TOLERANCES[SPEC.dtype])
    # Threshold 1536 -> triton here; a size rule with triton_kernels from 64 tokens -> triton_kernels there.
    assert_close(forward(topk, moe, x, logits), expected["triton"], SPEC.dtype, "eager, threshold", tol=SAME)
    saved = switch.rule
    switch.rule = SizeRule.from_winners({32: "triton", 64: "triton_kernels"}, "test")
    try:
        want = expected["triton_kernels" if num_tokens >= 64 else "triton"]
        assert_close(forward(topk, moe, x, logits), want, SPEC.dtype, "eager, size rule", tol=SAME)
    finally:
        switch.rule = saved
    assert extra_weight_bytes(moe) == 0


@pytest.mark.parametrize("num_tokens", (7, 300))
def test_layer_runs_triton_tuned_with_the_tables_configs(sglang_env, layers, weights, num_tokens, monkeypatch):
    """--adaptive-moe-extra-kernels triton_tuned: a tuned layer, forced to triton_tuned, launches the
    table's configs and matches stock Triton; a layer the table was not enabled for keeps SGLang's own."""
    from moe_dispatch.tuned_configs import BucketConfig, TileConfig, TunedKey, TunedTable, shape_key
    from tests.cases import spy_fused_moe_configs

    switch = sglang_env
    (topk, moe), stock_triton, _stock_tk = layers
    small = BucketConfig(TileConfig(16, 32, 64, 1, 4, 2), TileConfig(16, 64, 64, 1, 4, 3))
    large = BucketConfig(TileConfig(64, 64, 64, 8, 4, 3), TileConfig(64, 128, 64, 8, 8, 3))
    table = TunedTable(TunedKey("test", "test", shape_key(SPEC)), {8: small, 256: large}, created="test")
    x, logits = random_inputs(SPEC, num_tokens, device="cuda", seed=num_tokens)
    stock = forward(*stock_triton, x, logits)
    launched = spy_fused_moe_configs(monkeypatch)
    switch.enable_tuned(table, [moe.quant_method])
    try:
        with switch.forced("triton_tuned"):
            out = forward(topk, moe, x, logits)
        bucket = table.config_for(num_tokens)
        assert launched == [bucket.up.to_sglang(), bucket.down.to_sglang()]
        assert_close(out, stock, SPEC.dtype, f"plugin triton_tuned vs stock T={num_tokens}", tol=TOLERANCES[SPEC.dtype])
        switch.enable_tuned(table, [])  # not a tuned layer: triton_tuned runs as triton
        launched.clear()
        with switch.forced("triton_tuned"):
            forward(topk, moe, x, logits)
        assert launched and launched[0] != bucket.up.to_sglang()
    finally:
        switch.enable_tuned(None, [])  # no table: triton_tuned is no candidate again


@pytest.mark.parametrize("num_tokens", (7, 300))
def test_layer_runs_triton_kernels_tuned_with_the_tables_flags(sglang_env, layers, weights, num_tokens):
    """--adaptive-moe-extra-kernels triton_kernels_tuned: a layer forced to it runs the triton_kernels
    runner with the table's flags per matmul (recorded as matmul_ogs uses them) and matches stock."""
    from moe_dispatch.backends.tk_matmul_flags import MatmulFlags
    from moe_dispatch.sglang_plugin import layer_hooks
    from moe_dispatch.tk_flags_table import TkBucket, TkFlagsTable
    from moe_dispatch.tuned_configs import TunedKey, shape_key
    from tests.cases import steering_then_recording

    switch = sglang_env
    (topk, moe), _stock_triton, stock_tk = layers
    up, down = MatmulFlags(True, 32, 128, 32, 4, 3), MatmulFlags(False, 16, 64, 64, 4, 2)
    buckets = {8: TkBucket(up, down), 256: TkBucket(None, down)}
    table = TkFlagsTable(TunedKey("test", "test", shape_key(SPEC)), buckets, "test")
    x, logits = random_inputs(SPEC, num_tokens, device="cuda", seed=num_tokens)
    stock = forward(*stock_tk, x, logits, "triton_kernel")
    seen: list[list[dict]] = []
    switch.enable_tk_tuned(table, [moe.quant_method])
    original = layer_hooks.scoped_matmul_flags
    layer_hooks.scoped_matmul_flags = steering_then_recording(seen)
    try:
        with switch.forced("triton_kernels_tuned"):
            out = forward(topk, moe, x, logits)
    finally:
        layer_hooks.scoped_matmul_flags = original
        switch.enable_tk_tuned(None, [])
    entry = table.flags_for(num_tokens)
    got = [MatmulFlags.of(f) for f in seen[-1]]
    assert got[1] == entry.down and (entry.up is None or got[0] == entry.up), got
    tol = TOLERANCES[SPEC.dtype]
    assert_close(out, stock, SPEC.dtype, f"plugin triton_kernels_tuned vs stock T={num_tokens}", tol=tol)


@pytest.mark.parametrize("num_tokens", (1, 64, 1024, MAX_TOKENS + 1))
def test_layer_runs_triton_kernels_tuned_without_a_table_bit_identical_to_stock(sglang_env, layers, num_tokens):
    """triton_kernels_tuned with no flags table: triton_kernels' own flags, moe-dispatch's routing
    metadata (through the TopK hook, up to its cap) and combine, each taken once per call, and
    bit-identical to the same layer forced to the triton_kernels runner."""
    import contextlib

    from moe_dispatch.backends import tk_routing
    from moe_dispatch.sglang_plugin import layer_hooks

    switch = sglang_env
    (topk, moe), _stock_triton, _stock_tk = layers
    x, logits = random_inputs(SPEC, num_tokens, device="cuda", seed=70 + num_tokens)
    with switch.forced("triton_kernels"):
        stock = forward(topk, moe, x, logits)
    installed: dict[str, list[object]] = {"scoped_fast_combine": [], "scoped_fast_routing": []}
    originals = {name: getattr(layer_hooks, name) for name in installed}

    def recording(name):
        @contextlib.contextmanager
        def scoped():
            with originals[name]() as fast:
                installed[name].append(fast)
                yield fast

        return scoped

    switch.enable_tk_tuned(None, [moe.quant_method])
    for name in installed:
        setattr(layer_hooks, name, recording(name))
    try:
        with switch.forced("triton_kernels_tuned"):
            out = forward(topk, moe, x, logits)
    finally:
        for name, scoped in originals.items():
            setattr(layer_hooks, name, scoped)
        switch.enable_tk_tuned(None, [])
    (combine,), (routing,) = installed["scoped_fast_combine"], installed["scoped_fast_routing"]
    assert combine.calls == 1, "the layer hook should run the combine once per call"
    fused = num_tokens <= tk_routing.MAX_TOKENS
    assert routing.calls == int(fused), f"the TopK hook should run the fused routing {int(fused)} time(s)"
    diff = (out.float() - stock.float()).abs()
    assert torch.equal(out, stock), f"T={num_tokens}: max abs diff {diff.max().item():.3g}"


@pytest.mark.parametrize("num_tokens", (1, 7, 32))
def test_layer_runs_small_batch_on_its_own_weights(sglang_env, layers, weights, num_tokens):
    """--adaptive-moe-extra-kernels small_batch: a layer forced to small_batch reads its own weights and
    the router logits of SGLang's top-k output, and matches stock Triton and the reference."""
    from moe_dispatch.sglang_plugin import extras

    switch = sglang_env
    (topk, moe), stock_triton, _stock_tk = layers
    x, logits = random_inputs(SPEC, num_tokens, device="cuda", seed=50 + num_tokens)
    assert extras.enable_small_batch([(topk, moe)], switch) == (True, "")
    try:
        with switch.forced("small_batch"):
            out = forward(topk, moe, x, logits)
        ref = reference_moe(SPEC, weights, x, logits)
        assert_close(out, ref, SPEC.dtype, f"plugin small_batch vs reference T={num_tokens}")
        assert_close(out, forward(*stock_triton, x, logits), SPEC.dtype, f"plugin small_batch vs stock T={num_tokens}")
    finally:
        switch.enable_small_batch({})


def test_unsupported_layers_are_refused(sglang_env, layers):
    from moe_dispatch.sglang_plugin.layer_hooks import layer_support

    _, _, (tk_topk, tk_moe) = layers
    answer = layer_support(tk_topk, tk_moe)
    assert not answer and "needs triton" in answer.reason
    stock_topk, stock_moe = layers[1]
    assert not layer_support(stock_moe, stock_moe) and layer_support(stock_topk, stock_moe)


# --- (4) start-up probe, and graphs captured under the rule through SGLang's FullCudaGraphBackend ---


def _backend():
    from sglang.srt.distributed.parallel_state import get_tp_group
    from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend

    # FullCudaGraphBackend reads only these two attributes of its runner.
    runner = SimpleNamespace(device_module=torch.cuda, model_runner=SimpleNamespace(tp_group=get_tp_group()))
    return FullCudaGraphBackend(runner)


def _kernels_run(fn) -> set[str]:
    """Which MoE kernel family ran on the GPU during fn(): 'triton' (fused_moe) and/or 'triton_kernels'."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    found = set()
    if any("fused_moe_kernel" in n for n in names):
        found.add("triton")
    if any("matmul_ogs" in n or "_p_matmul" in n for n in names):
        found.add("triton_kernels")
    return found


def test_probe_times_both_kernels_and_returns_its_memory(sglang_env, layers, weights):
    from graphs.selection import pick_fastest
    from moe_dispatch.sglang_plugin import probe

    (topk, moe), _, _ = layers
    second = build_layer("triton", weights, layer_id=1)
    from moe_dispatch.sglang_plugin.layer_hooks import enable_for_layer

    assert enable_for_layer(*second)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    result = probe.probe_sizes([(topk, moe), second], SPEC, (1, 8, 64, 300), sglang_env)
    print(probe.format_table(result))
    assert [row.size for row in result.rows] == [1, 8, 64, 300] and result.layers == 2
    for row in result.rows:
        assert set(row.times_ms) == {"triton", "triton_kernels"} and all(t > 0 for t in row.times_ms.values())
        assert row.winner == pick_fastest(row.times_ms)
    assert moe.reduce_results == second[1].reduce_results  # restored after probing
    assert torch.cuda.memory_reserved() - reserved <= 2**20, "probe graphs were not returned to the device"


def test_graphs_captured_under_the_rule_hold_each_sizes_winner(sglang_env, layers, weights):
    from sglang.srt.model_executor.runner.shape_key import ShapeKey

    from moe_dispatch.sglang_plugin.kernel_switch import FixedRule, SizeRule

    (topk, moe), _, _ = layers
    want = {1: "triton_kernels", 8: "triton", 64: "triton_kernels"}
    backend = _backend()
    x, logits = random_inputs(SPEC, max(want), device="cuda", seed=1)
    saved = sglang_env.rule
    sglang_env.rule = SizeRule.from_winners(want)
    try:
        with backend.capture_session(torch.cuda.Stream()):  # like DecodeCudaGraphRunner: largest first
            for bs in sorted(want, reverse=True):
                backend.capture_one(ShapeKey(bs), functools.partial(forward, topk, moe, x[:bs], logits[:bs]))
        sglang_env.rule = FixedRule("triton")  # replays must not depend on the rule any more
        for bs, kernel in want.items():
            new_x, new_logits = random_inputs(SPEC, bs, device="cuda", seed=100 + bs)
            x[:bs].copy_(new_x)
            logits[:bs].copy_(new_logits)
            assert _kernels_run(lambda b=bs: backend.replay(ShapeKey(b), None)) == {kernel}
            out = backend.replay(ShapeKey(bs), None).clone()  # through the NVTX replay hook
            with sglang_env.forced(kernel):
                eager = forward(topk, moe, new_x, new_logits)
            assert_close(out, eager, SPEC.dtype, f"replay bs={bs} {kernel} vs eager", tol=SAME)
            ref = reference_moe(SPEC, weights, new_x, new_logits)
            assert_close(out, ref, SPEC.dtype, f"replay bs={bs} {kernel} vs reference", tol=TOLERANCES[SPEC.dtype])
    finally:
        sglang_env.rule = saved
