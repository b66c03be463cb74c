"""`triton_tuned` on the GPU: the shared case list against the torch reference with tables
built in memory, the tile configs SGLang actually launches, CUDA-graph capture and replay,
the stock `triton` kernel unaffected in the same process, and a table found on disk
through $MOE_DISPATCH_TUNED_DIR.

Set MOE_DISPATCH_ERROR_TABLE=path to append the case x kernel error rows (JSON lines), as
tests/test_backends_gpu.py does.
"""

import importlib

import pytest
import torch

from graphs import capture
from moe_dispatch import ExpertWeights, available_kernels, get_backend, make_kernel, random_inputs, reference_moe
from moe_dispatch.adaptive import graph_candidates
from moe_dispatch.backends.sglang_tile_override import fused_moe_module_name
from moe_dispatch.testing import assert_close
from moe_dispatch.tuned_configs import (
    TUNED_DIR_ENV,
    BucketConfig,
    TileConfig,
    TunedKey,
    TunedTable,
    current_key,
    save_table,
)
from tests.cases import CASES, Case, check_replays, record_error, skip_unless_available, spy_fused_moe_configs

KERNEL = "triton_tuned"

pytestmark = pytest.mark.gpu

# Non-default configs (SGLang's defaults leave num_warps/num_stages to Triton), distinct per matmul.
SMALL = BucketConfig(TileConfig(16, 32, 64, 1, 4, 2), TileConfig(16, 64, 64, 1, 4, 3))
LARGE = BucketConfig(TileConfig(64, 64, 64, 8, 4, 3), TileConfig(64, 64, 64, 8, 4, 3))
BUCKETS = {16: SMALL, 128: LARGE}  # nearest: T < 72 -> SMALL, T >= 72 -> LARGE (a tie goes to the larger)


@pytest.fixture(scope="module", autouse=True)
def available():
    skip_unless_available(KERNEL)


def tuned_table(spec) -> TunedTable:
    return TunedTable(current_key(spec), BUCKETS, created="test", notes="tests/test_tuned_gpu.py")


def expected_launches(num_tokens: int, calls: int = 1) -> list[dict[str, int]]:
    """The config of each fused_moe matmul launch: up then down, per call."""
    bucket = TunedTable(TunedKey("-", "-", "-"), BUCKETS, created="-").config_for(num_tokens)
    return [bucket.up.to_sglang(), bucket.down.to_sglang()] * calls


@pytest.fixture
def launched(monkeypatch):
    return spy_fused_moe_configs(monkeypatch)


def sglang_untouched() -> None:
    """The lookup fused_moe calls and SGLang's override are back to SGLang's own."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe_triton_config, get_config

    module = importlib.import_module(fused_moe_module_name)
    assert module.try_get_optimal_moe_config is fused_moe_triton_config.try_get_optimal_moe_config
    assert get_config() is None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference_with_the_tuned_configs(case: Case, launched):
    spec = case.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=case.top_k)
    kernel = get_backend(KERNEL).prepare_with_table(spec, weights, tuned_table(spec))
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=1000 + case.num_tokens)
    out = kernel(x, logits)
    assert out.shape == (case.num_tokens, spec.hidden_size) and out.dtype == spec.dtype
    stats = assert_close(out, reference_moe(spec, weights, x, logits), spec.dtype, f"{KERNEL} {case.id}")
    record_error(case.id, KERNEL, stats)
    assert launched == (expected_launches(case.num_tokens) if case.num_tokens else [])
    sglang_untouched()


@pytest.mark.parametrize("case", [Case(3, 4, True, "swiglu"), Case(129, 2, False, "silu")], ids=lambda c: c.id)
def test_graph_capture_and_replay(case: Case, launched):
    spec = case.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=3)
    kernel = get_backend(KERNEL).prepare_with_table(spec, weights, tuned_table(spec))
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=10)
    static_x, static_logits = x.clone(), logits.clone()
    captured = capture(kernel, [static_x, static_logits], torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    assert launched == expected_launches(case.num_tokens, calls=3)  # 2 warm-up calls + the captured one
    sglang_untouched()
    launched.clear()
    inputs_for = lambda seed: random_inputs(spec, case.num_tokens, device="cuda", seed=seed)  # noqa: E731
    check_replays(captured, (static_x, static_logits), spec, weights, inputs_for, (11, 12), f"replay {case.id}")
    assert launched == []  # replays run the captured kernels: no Python, no config lookup


def test_stock_triton_keeps_sglangs_configs(launched):
    """Tuned and stock kernels side by side in one process, each with its own configs."""
    spec = Case(37, 4, True, "swiglu").spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=4)
    tuned = get_backend(KERNEL).prepare_with_table(spec, weights, tuned_table(spec))
    stock = make_kernel("triton", spec, weights)
    x, logits = random_inputs(spec, 37, device="cuda", seed=5)
    reference = reference_moe(spec, weights, x, logits)
    for name, kernel in (("tuned", tuned), ("stock", stock), ("tuned again", tuned)):
        launched.clear()
        assert_close(kernel(x, logits), reference, spec.dtype, name)
        if kernel is tuned:
            assert launched == expected_launches(37)
        else:  # SGLang's default at M=37 > E=16 is m64n64k32g8, not our m16 configs
            assert len(launched) == 2 and all(c["BLOCK_SIZE_M"] != 16 for c in launched), launched
    sglang_untouched()


def test_prepare_with_table_checks_the_shape():
    spec, other = Case(3, 4, True, "swiglu").spec(), Case(3, 2, True, "swiglu").spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    with pytest.raises(
        ValueError, match="table is for shape 'E=16,H=256,I=192,k=2,.*the spec is 'E=16,H=256,I=192,k=4"
    ):
        get_backend(KERNEL).prepare_with_table(spec, weights, tuned_table(other))


def test_table_file_found_through_the_env_dir(tmp_path, monkeypatch, launched):
    spec = Case(37, 4, True, "swiglu").spec()
    monkeypatch.setenv(TUNED_DIR_ENV, str(tmp_path))
    answer = get_backend(KERNEL).supports(spec)
    assert not answer and "no tuned table" in answer.reason and str(tmp_path) in answer.reason
    assert KERNEL not in graph_candidates(spec)
    save_table(tuned_table(spec), tmp_path)
    assert available_kernels(spec)[KERNEL] and KERNEL in graph_candidates(spec)
    weights = ExpertWeights.random(spec, device="cuda", seed=6)
    kernel = make_kernel(KERNEL, spec, weights)
    x, logits = random_inputs(spec, 37, device="cuda", seed=7)
    stats = assert_close(kernel(x, logits), reference_moe(spec, weights, x, logits), spec.dtype, "from file")
    record_error("T37-k4-swiglu-bias-file", KERNEL, stats)
    assert launched == expected_launches(37)
