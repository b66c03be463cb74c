"""AdaptiveMoE's errors that need no GPU."""

import pytest
import torch

from moe_dispatch import ExpertWeights, MoESpec
from moe_dispatch.adaptive import AdaptiveMoE, graph_candidates

SPEC = MoESpec(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_no_candidate_kernel_says_why():
    assert graph_candidates(SPEC) == ()
    with pytest.raises(ValueError, match=r"no kernel can run .* torch: not graph-capturable; triton: "):
        AdaptiveMoE(SPEC, ExpertWeights.random(SPEC))


def test_unknown_kernel_and_bad_settings():
    weights = ExpertWeights.random(SPEC)
    with pytest.raises(ValueError, match="unknown kernel 'cutlass'"):
        AdaptiveMoE(SPEC, weights, kernels=["cutlass"])
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        AdaptiveMoE(SPEC, weights, policy="fast")
    with pytest.raises(ValueError, match="threshold must be a positive int, got 0"):
        AdaptiveMoE(SPEC, weights, policy="threshold", threshold=0)
    with pytest.raises(ValueError, match="not strictly increasing|unsorted|increasing"):
        AdaptiveMoE(SPEC, weights, buckets=(4, 2))
    with pytest.raises(ValueError, match="empty"):
        AdaptiveMoE(SPEC, weights, buckets=())
    with pytest.raises(ValueError, match="kernel 'torch' cannot be captured in a CUDA graph"):
        AdaptiveMoE(SPEC, weights, kernels=["torch"])
    with pytest.raises(ValueError, match="policy 'fixed' needs fixed_kernel"):
        AdaptiveMoE(SPEC, weights, kernels=["triton"], policy="fixed", fixed_kernel="triton_kernels")


def test_eager_kernel_is_never_one_limited_to_small_calls():
    from types import SimpleNamespace

    from graphs.timing import ReplayStats

    moe = object.__new__(AdaptiveMoE)  # only the kernel names matter here
    moe.kernels = dict.fromkeys(("small_batch", "triton", "triton_kernels"))

    def report(**ms):
        timings = {name: ReplayStats(t, t, t, 1) for name, t in ms.items()}
        return SimpleNamespace(results=(SimpleNamespace(timings_ms=timings),))

    assert moe._unlimited_fastest(report(small_batch=0.01, triton=0.05, triton_kernels=0.03)) == "triton_kernels"
    assert moe._unlimited_fastest(report(small_batch=0.01)) == "triton"  # nothing timed: the first unlimited
    moe.kernels = {"small_batch": None}
    with pytest.raises(ValueError, match="token limit"):
        moe._unlimited_fastest(report(small_batch=0.01))
