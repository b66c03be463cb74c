"""Registry answers and bad-input errors (CPU: the torch backend shows the shared checks)."""

import pytest
import torch

from moe_dispatch import KNOWN_KERNELS, ExpertWeights, MoESpec, available_kernels, get_backend, make_kernel, preset
from moe_dispatch.backends.base import Support
from moe_dispatch.backends.triton_kernels_backend import TritonKernelsBackend, triton_kernels_generation

SPEC = MoESpec(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, dtype=torch.float32)


@pytest.fixture(scope="module")
def kernel():
    return make_kernel("torch", SPEC, ExpertWeights.random(SPEC, seed=0))


def test_support_is_falsy_with_reason():
    assert Support.yes() and not Support.no("because")
    assert Support.no("because").reason == "because"


def test_registry_lists_every_kernel_with_reasons():
    answers = available_kernels()
    assert tuple(answers) == KNOWN_KERNELS == ("torch", "triton", "triton_kernels")
    assert answers["torch"]
    for name, answer in answers.items():
        assert answer or answer.reason, f"{name} is unavailable without a reason"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")
def test_gpu_backends_say_why_they_are_unavailable_here():
    answers = available_kernels(preset("gpt-oss-120b", tp=2))
    for name in ("triton", "triton_kernels"):
        assert not answers[name]
        assert any(word in answers[name].reason for word in ("not installed", "no CUDA GPU"))
    with pytest.raises(ValueError, match="kernel 'triton' cannot run"):
        make_kernel("triton", SPEC, ExpertWeights.random(SPEC))


def test_unknown_kernel_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown kernel 'cutlass'; known kernels: torch, triton, triton_kernels"):
        get_backend("cutlass")


def test_triton_kernels_spec_support_rules():
    backend = TritonKernelsBackend()
    assert backend.supports(preset("gpt-oss-120b", tp=2))
    assert backend.supports(preset("mixtral-8x7b"))
    assert "bf16-only" in backend.supports(preset("mixtral-8x7b", dtype=torch.float16)).reason
    bias_silu = MoESpec(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, bias=True)
    assert "not SiLU" in backend.supports(bias_silu).reason
    with pytest.raises(ValueError, match="layout must be one of"):
        TritonKernelsBackend(layout="packed")
    assert triton_kernels_generation() in (None, "matmul_ogs", "matmul")


def test_weights_must_match_spec():
    weights = ExpertWeights.random(SPEC)
    other = MoESpec(num_experts=4, top_k=2, hidden_size=8, intermediate_size=6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weights.w13 has shape \(4, 8, 8\), expected \(4, 12, 8\)"):
        make_kernel("torch", other, weights)
    with pytest.raises(ValueError, match="spec has bias=True but weights.b13 is None"):
        make_kernel("torch", MoESpec(4, 2, 8, 4, bias=True, dtype=torch.float32), weights)
    with pytest.raises(TypeError, match="weights.w13 has dtype torch.float32, expected torch.bfloat16"):
        make_kernel("torch", MoESpec(4, 2, 8, 4), weights)


@pytest.mark.parametrize(
    "x_shape, l_shape, dtype, error, message",
    [
        ((3, 8, 1), (3, 4), torch.float32, ValueError, r"hidden_states must be 2-D, got shape \(3, 8, 1\)"),
        ((3, 6), (3, 4), torch.float32, ValueError, "hidden_states has hidden size 6, expected 8"),
        ((3, 8), (3, 5), torch.float32, ValueError, r"router_logits has shape \(3, 5\), expected \(3, 4\)"),
        ((3, 8), (2, 4), torch.float32, ValueError, r"router_logits has shape \(2, 4\), expected \(3, 4\)"),
        ((3, 8), (3, 4), torch.float16, TypeError, "hidden_states has dtype torch.float16, expected torch.float32"),
    ],
)
def test_bad_inputs_get_clear_errors(kernel, x_shape, l_shape, dtype, error, message):
    x = torch.randn(x_shape).to(dtype)
    logits = torch.randn(l_shape).to(dtype if len(l_shape) == 2 and l_shape[1] != 5 else torch.float32)
    with pytest.raises(error, match=message):
        kernel(x, logits)


def test_non_tensor_and_non_contiguous_inputs(kernel):
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor, got list"):
        kernel([[0.0] * 8], torch.randn(1, 4))
    x = torch.randn(8, 5).t()  # [5, 8], non-contiguous: handled by a copy
    logits = torch.randn(4, 5).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(kernel(x, logits), kernel(x.contiguous(), logits.contiguous()))


def test_gpu_only_kernel_rejects_cpu_tensors():
    from moe_dispatch.backends.base import check_inputs

    weights = ExpertWeights.random(SPEC)
    x, logits = torch.randn(2, 8), torch.randn(2, 4)
    with pytest.raises(ValueError, match="kernel 'triton' runs on CUDA only; hidden_states is on cpu"):
        check_inputs(SPEC, weights, x, logits, "triton", needs_cuda=True)
