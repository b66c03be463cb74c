"""Every available kernel against the torch reference over the shared case list (GPU).

Set MOE_DISPATCH_ERROR_TABLE=path to also write the case x kernel error table (JSON
lines) for reports.
"""

import pytest
import torch

from moe_dispatch import ExpertWeights, available_kernels, get_backend, make_kernel, random_inputs, reference_moe
from moe_dispatch.testing import assert_close
from tests.cases import CASES, Case, record_error

pytestmark = pytest.mark.gpu

GPU_KERNELS = ("torch", "triton", "triton_kernels")


def test_seed_kernels_are_available_on_the_gpu_machine():
    answers = available_kernels()
    # flashinfer_cutlass is optional (its package, and a long first build): tested in test_flashinfer_gpu.py.
    seed = {k: v for k, v in answers.items() if k != "flashinfer_cutlass"}
    assert all(seed.values()), {k: v.reason for k, v in seed.items() if not v}


@pytest.mark.parametrize("kernel_name", GPU_KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case, kernel_name: str):
    spec = case.spec()
    backend = get_backend(kernel_name)
    support = backend.supports(spec)
    weights = ExpertWeights.random(spec, device="cuda", seed=case.top_k)
    if not support:  # an unsupported combination must be refused loudly, with the reason
        with pytest.raises(ValueError, match=support.reason):
            make_kernel(kernel_name, spec, weights)
        return
    kernel = make_kernel(kernel_name, spec, weights)
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=1000 + case.num_tokens)
    out = kernel(x, logits)
    assert out.shape == (case.num_tokens, spec.hidden_size) and out.dtype == spec.dtype
    stats = assert_close(out, reference_moe(spec, weights, x, logits), spec.dtype, f"{kernel_name} {case.id}")
    record_error(case.id, kernel_name, stats)


@pytest.mark.parametrize("kernel_name", ("triton", "triton_kernels"))
def test_gpu_kernel_rejects_cpu_input(kernel_name):
    spec = Case(4, 2, True, "swiglu").spec()
    kernel = make_kernel(kernel_name, spec, ExpertWeights.random(spec, device="cuda"))
    x, logits = random_inputs(spec, 4)
    with pytest.raises(ValueError, match="is on cpu but the expert weights are on cuda"):
        kernel(x, logits)


def test_triton_kernels_views_equal_copies():
    """Transposed views of the Triton layout give the same output as contiguous copies."""
    from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend

    for case in (Case(129, 4, True, "swiglu"), Case(37, 2, False, "silu")):
        spec = case.spec()
        weights = ExpertWeights.random(spec, device="cuda", seed=9)
        view = TritonKernelsBackend("view").prepare(spec, weights)
        copy = TritonKernelsBackend("copy").prepare(spec, weights)
        assert view.extra_bytes == 0 and copy.extra_bytes == weights.w13.nbytes + weights.w2.nbytes
        x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=5)
        assert torch.equal(view(x, logits), copy(x, logits))
