"""triton_kernels on transposed weight views at GPT-OSS-120B tp=8 shapes (E=128, top-4, H=2880, I=360).

Views (0 extra bytes) must give the contiguous copies' output at T = 1, 2, 4, 8, eagerly and
under graph replay; at T <= 4 they run under `tk_flags`' per-call is_persistent constraint,
which must reach matmul_ogs and leave triton_kernels' global constraints as they were.
Timing is bench.tk_views_probe's job, not this file's.
"""

import pytest
import torch

from moe_dispatch import ExpertWeights, preset, random_inputs, reference_moe
from moe_dispatch.backends import tk_flags
from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend
from moe_dispatch.testing import TOLERANCES, assert_close

pytestmark = pytest.mark.gpu

TOKENS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def tp8():
    backend = TritonKernelsBackend("view")
    spec = preset("gpt-oss-120b", tp=8)
    if not backend.availability():
        pytest.skip(f"triton_kernels unavailable: {backend.availability().reason}")
    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    kernels = {
        "view": backend.prepare(spec, weights),
        "view-unsteered": TritonKernelsBackend("view", steer_flags=False).prepare(spec, weights),
        "copy": TritonKernelsBackend("copy").prepare(spec, weights),
    }
    return spec, weights, kernels


def _opt_flags():
    from triton_kernels.matmul_ogs_details import opt_flags

    return opt_flags


@pytest.fixture
def chosen_flags(monkeypatch):
    """Records the OptFlags matmul_ogs picks (is_persistent, block sizes, split_k) for each matmul."""
    import triton_kernels.matmul_ogs as matmul_ogs

    seen = []
    original = matmul_ogs.make_opt_flags

    def recording(*args, **kwargs):
        flags = original(*args, **kwargs)
        seen.append(flags)
        return flags

    monkeypatch.setattr(matmul_ogs, "make_opt_flags", recording)
    return seen


@pytest.mark.parametrize("T", TOKENS)
def test_views_equal_copies_at_tp8(tp8, T):
    spec, weights, kernels = tp8
    x, logits = random_inputs(spec, T, device="cuda", seed=100 + T)
    out = {name: kernel(x, logits) for name, kernel in kernels.items()}
    ref = reference_moe(spec, weights, x, logits)
    for name, tensor in out.items():
        assert tensor.shape == (T, spec.hidden_size) and tensor.dtype == spec.dtype
        assert_close(tensor, ref, spec.dtype, f"{name} T={T} vs reference")
    # Same math, possibly another kernel (persistent vs not): within bf16 rounding of each other.
    for name in ("view", "view-unsteered"):
        assert_close(out[name], out["copy"], spec.dtype, f"{name} vs copy T={T}", tol=TOLERANCES[torch.bfloat16])


def test_steering_decisions_on_this_gpu(tp8):
    spec, weights, kernels = tp8
    info = kernels["view"]._quant_info
    decisions = {T: tk_flags.decision_for(T, spec.top_k, info.w13_weight, info.w2_weight) for T in (1, 2, 4, 8, 64)}
    assert decisions[1], decisions[1].reason  # 48 w2 tiles: non-persistent by default on any GPU with > 24 SMs
    assert not decisions[64], decisions[64].reason
    copy = kernels["copy"]._quant_info
    assert not tk_flags.decision_for(1, spec.top_k, copy.w13_weight, copy.w2_weight)


def test_steered_call_runs_persistent_and_restores_constraints(tp8, chosen_flags):
    spec, weights, kernels = tp8
    module = _opt_flags()
    before = dict(module._opt_flags_constraints)
    x, logits = random_inputs(spec, 1, device="cuda", seed=7)
    kernels["view-unsteered"](x, logits)
    unsteered = [f.is_persistent for f in chosen_flags]
    chosen_flags.clear()
    kernels["view"](x, logits)
    steered = [f.is_persistent for f in chosen_flags]
    assert module._opt_flags_constraints == before, "tk_flags leaked constraints into triton_kernels"
    assert len(steered) == 2 and all(steered), f"steered T=1 flags: {chosen_flags}"
    assert unsteered == [False, False], f"unsteered T=1 is_persistent per matmul: {unsteered}"


def test_views_under_graph_replay_match_eager(tp8):
    from moe_dispatch.adaptive import AdaptiveMoE

    spec, weights, kernels = tp8
    constraints = dict(_opt_flags()._opt_flags_constraints)
    moe = AdaptiveMoE(
        spec,
        weights,
        kernels=("triton_kernels",),
        policy="fixed",
        fixed_kernel="triton_kernels",
        buckets=TOKENS,
        progress=lambda line: None,
    )
    moe.capture()
    assert moe.extra_weight_bytes == 0
    assert dict(_opt_flags()._opt_flags_constraints) == constraints
    for T in TOKENS:
        x, logits = random_inputs(spec, T, device="cuda", seed=200 + T)
        replayed = moe(x, logits).clone()
        eager = kernels["view"](x, logits)
        assert torch.equal(replayed, eager), f"T={T}: replay of the steered graph differs from the eager call"
        assert_close(replayed, kernels["copy"](x, logits), spec.dtype, f"replayed view vs copy T={T}")
