"""`triton_kernels_tuned` on the GPU: the shared case list against the torch reference with a
flags table built in memory, the opt flags matmul_ogs actually gets per matmul, CUDA-graph
capture and replay, triton_kernels' own flags outside the table's reach, and a table found
on disk through $MOE_DISPATCH_TUNED_DIR."""

import unittest.mock

import pytest
import torch

from bench.tk_views_probe import recorded_opt_flags
from graphs import capture
from moe_dispatch import ExpertWeights, available_kernels, get_backend, random_inputs, reference_moe
from moe_dispatch.adaptive import graph_candidates
from moe_dispatch.backends import triton_kernels_tuned
from moe_dispatch.backends.tk_matmul_flags import MatmulFlags
from moe_dispatch.testing import assert_close
from moe_dispatch.tk_flags_table import TkBucket, TkFlagsTable, save_tk_table
from moe_dispatch.tuned_configs import TUNED_DIR_ENV, current_key
from tests.cases import CASES, Case, check_replays, record_error, skip_unless_available, steering_then_recording

KERNEL = "triton_kernels_tuned"

pytestmark = pytest.mark.gpu

# Not what triton_kernels picks by itself for these shapes (its block_n is 256, block_k 64, m16).
UP = MatmulFlags(True, 32, 128, 32, 4, 3)
DOWN = MatmulFlags(False, 16, 64, 64, 4, 2)
BUCKETS = {8: TkBucket(UP, DOWN), 64: TkBucket(None, DOWN)}  # T in 4..16 -> 8, 32..128 -> 64, else own


@pytest.fixture(scope="module", autouse=True)
def available():
    skip_unless_available("triton_kernels")


def table(spec) -> TkFlagsTable:
    return TkFlagsTable(current_key(spec), BUCKETS, created="test", notes="tests/test_tk_tuned_gpu.py")


def expected(num_tokens: int) -> list[MatmulFlags | None]:
    entry = table(Case(1, 2, True, "swiglu").spec()).flags_for(num_tokens)
    return [None, None] if entry is None else [entry.up, entry.down]


def launched_flags(kernel, x, logits) -> tuple[torch.Tensor, list[MatmulFlags]]:
    """The kernel's output and the flags its two matmuls ran with (after any steering)."""
    seen: list[list[dict]] = []
    with (
        recorded_opt_flags() as own,
        unittest.mock.patch.object(triton_kernels_tuned, "scoped_matmul_flags", steering_then_recording(seen)),
    ):
        out = kernel(x, logits)
    flags = seen[-1] if seen else own  # the tuned kernel steers; the stock one records through `own`
    assert flags is not None and len(flags) == 2, flags
    return out, [MatmulFlags.of(f) for f in flags]


@pytest.mark.parametrize("case", [c for c in CASES if c.num_tokens > 0], ids=lambda c: c.id)
def test_matches_reference_with_the_tuned_flags(case: Case):
    spec = case.spec()
    backend = get_backend(KERNEL)
    if not get_backend("triton_kernels").supports(spec):
        pytest.skip(f"triton_kernels does not run {case.id}: {get_backend('triton_kernels').supports(spec).reason}")
    weights = ExpertWeights.random(spec, device="cuda", seed=case.top_k)
    kernel = backend.prepare_with_table(spec, weights, table(spec))
    own = get_backend("triton_kernels").prepare(spec, weights)
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=1000 + case.num_tokens)
    out, flags = launched_flags(kernel, x, logits)
    _, own_flags = launched_flags(own, x, logits)
    assert out.shape == (case.num_tokens, spec.hidden_size) and out.dtype == spec.dtype
    stats = assert_close(out, reference_moe(spec, weights, x, logits), spec.dtype, f"{KERNEL} {case.id}")
    record_error(case.id, KERNEL, stats)
    for got, want, theirs in zip(flags, expected(case.num_tokens), own_flags, strict=True):
        assert got == (want or theirs), (case.id, got, want, theirs)


def test_graph_capture_and_replay():
    case = Case(8, 4, True, "swiglu")
    spec = case.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=3)
    kernel = get_backend(KERNEL).prepare_with_table(spec, weights, table(spec))
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=10)
    static_x, static_logits = x.clone(), logits.clone()
    seen: list[list[dict]] = []
    with unittest.mock.patch.object(triton_kernels_tuned, "scoped_matmul_flags", steering_then_recording(seen)):
        captured = capture(kernel, [static_x, static_logits], torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    assert [MatmulFlags.of(f) for f in seen[-1]] == [UP, DOWN]  # the captured call (after 2 warm-ups)
    inputs_for = lambda seed: random_inputs(spec, case.num_tokens, device="cuda", seed=seed)  # noqa: E731
    check_replays(captured, (static_x, static_logits), spec, weights, inputs_for, (11, 12), f"replay {case.id}")


def test_table_file_found_through_the_env_dir(tmp_path, monkeypatch):
    """No file: a candidate all the same (triton_kernels' own flags, our combine); then the file's flags."""
    spec = Case(8, 4, True, "swiglu").spec()
    monkeypatch.setenv(TUNED_DIR_ENV, str(tmp_path))
    assert get_backend(KERNEL).table_for(spec) == (None, get_backend(KERNEL).supports(spec))
    assert available_kernels(spec)[KERNEL] and KERNEL in graph_candidates(spec)
    weights = ExpertWeights.random(spec, device="cuda", seed=6)
    x, logits = random_inputs(spec, 8, device="cuda", seed=7)
    bare = get_backend(KERNEL).prepare(spec, weights)
    assert bare.table is None
    _, bare_flags = launched_flags(bare, x, logits)
    _, own_flags = launched_flags(get_backend("triton_kernels").prepare(spec, weights), x, logits)
    assert bare_flags == own_flags
    save_tk_table(table(spec), tmp_path)
    kernel = get_backend(KERNEL).prepare(spec, weights)
    assert kernel.table is not None
    assert_close(kernel(x, logits), reference_moe(spec, weights, x, logits), spec.dtype, "table from disk")


@pytest.mark.parametrize("split", [2, 8])
def test_a_table_split_k_reaches_the_up_matmul(split):
    """GPT-OSS-120B tp=8 at 32 tokens (triton_kernels' own split there is 5, kernel-breakdown-routing-tp8.md):
    a table entry's split_k is what the up matmul runs, and the output matches the reference."""
    from moe_dispatch.spec import preset

    spec = preset("gpt-oss-120b", tp=8)
    tiles = MatmulFlags(True, 16, 256, 128, 4, 3)
    entry = TkBucket(MatmulFlags(True, 16, 256, 128, 4, 3, split_k=split), None)
    table = TkFlagsTable(current_key(spec), {32: entry}, created="test", notes="tests/test_tk_tuned_gpu.py")
    weights = ExpertWeights.random(spec, device="cuda", seed=split)
    kernel = get_backend(KERNEL).prepare_with_table(spec, weights, table)
    x, logits = random_inputs(spec, 32, device="cuda", seed=32)
    seen: list[list[dict]] = []
    with unittest.mock.patch.object(triton_kernels_tuned, "scoped_matmul_flags", steering_then_recording(seen)):
        out = kernel(x, logits)
    up, _down = seen[-1]
    assert up["split_k"] == split and MatmulFlags.of(up) == tiles, up
    assert_close(out, reference_moe(spec, weights, x, logits), spec.dtype, f"{KERNEL} split_k={split}")
