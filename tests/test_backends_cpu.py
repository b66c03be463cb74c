"""Registry answers and bad-input errors (CPU: the torch backend shows the shared checks)."""

import pytest
import torch

from moe_dispatch import KNOWN_KERNELS, ExpertWeights, MoESpec, available_kernels, get_backend, make_kernel, preset
from moe_dispatch.backends import tk_flags
from moe_dispatch.backends.base import Support
from moe_dispatch.backends.triton_kernels_backend import (
    TritonKernelsBackend,
    top_k_support,
    triton_kernels_generation,
)
from moe_dispatch.spec import GPT_OSS_SWIGLU, SILU

SPEC = MoESpec(num_experts=4, top_k=2, hidden_size=8, intermediate_size=4, dtype=torch.float32)


@pytest.fixture(scope="module")
def kernel():
    return make_kernel("torch", SPEC, ExpertWeights.random(SPEC, seed=0))


def test_support_is_falsy_with_reason():
    assert Support.yes() and not Support.no("because")
    assert Support.no("because").reason == "because"


def test_registry_lists_every_kernel_with_reasons():
    answers = available_kernels()
    expected = (
        "torch",
        "triton",
        "triton_tuned",
        "triton_kernels",
        "triton_kernels_tuned",
        "small_batch",
        "flashinfer_cutlass",
    )
    assert tuple(answers) == KNOWN_KERNELS == expected
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
    known = "torch, triton, triton_tuned, triton_kernels"
    with pytest.raises(ValueError, match=rf"unknown kernel 'cutlass'; known kernels: {known}"):
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


@pytest.mark.parametrize("top_k", [3, 5, 6, 7, 12])
def test_triton_kernels_refuses_top_k_not_a_power_of_two(top_k):
    """triton_kernels' topk kernel compiles only for a power-of-2 k: refused by supports(), with the reason."""
    for bias, activation in ((True, GPT_OSS_SWIGLU), (False, SILU)):
        spec = MoESpec(
            num_experts=64, top_k=top_k, hidden_size=256, intermediate_size=128, bias=bias, activation=activation
        )
        answer = TritonKernelsBackend().supports(spec)
        assert not answer
        assert f"top_k={top_k} is not a power of 2" in answer.reason and "tl.arange" in answer.reason
        assert answer == top_k_support(top_k)


def test_triton_kernels_top_k_limits():
    for top_k in (1, 2, 4, 8, 16, 32):
        assert top_k_support(top_k), top_k
        assert TritonKernelsBackend().supports(MoESpec(num_experts=64, top_k=top_k, hidden_size=8, intermediate_size=4))
    assert "exceeds 32" in top_k_support(64).reason
    assert "not a power of 2" in top_k_support(0).reason


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


# ---- tk_flags: opt-flag steering for triton_kernels on transposed weight views ------------------


def _operands(num_experts: int, hidden: int, inter: int, layout: str = "view"):
    """(w13 [E, H, 2I], w2 [E, I, H]) as the triton_kernels runner receives them (meta tensors: no memory)."""
    w13 = torch.empty(num_experts, 2 * inter, hidden, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    w2 = torch.empty(num_experts, hidden, inter, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    if layout == "copy":
        w13, w2 = w13.contiguous(), w2.contiguous()
    return w13, w2


def test_tk_flags_operand_reads_strides():
    w13, w2 = _operands(128, 2880, 360)
    op = tk_flags.WeightOperand.of(w2)
    assert op == tk_flags.WeightOperand(128, 360, 2880, 360 * 2880, 1, 360, 2)
    assert op.k_major and not op.pointer_loads_vectorize() and op.tma_compliant()
    assert tk_flags.WeightOperand.of(w13).pointer_loads_vectorize()  # K = stride = 2880, multiples of 16
    copy = tk_flags.WeightOperand.of(w2.contiguous())
    assert not copy.k_major and copy.pointer_loads_vectorize()
    odd = tk_flags.WeightOperand.of(torch.empty(4, 8, 100, dtype=torch.bfloat16, device="meta").transpose(1, 2))
    assert not odd.tma_compliant()  # stride 100 elements = 200 bytes, not a multiple of 16
    with pytest.raises(ValueError, match=r"expected a \[E, K, N\] weight"):
        tk_flags.WeightOperand.of(torch.empty(4, 8))


@pytest.mark.parametrize(
    "T, persistent_w13, persistent_w2",
    # GPT-OSS-120B tp=8 on 132 SMs: the split measured on an H200 (slow views at T <= 4, fine from 8).
    [(1, False, False), (2, False, False), (4, False, False), (8, False, True), (16, False, True), (32, True, True)],
)
def test_tk_flags_default_persistence_replica(T, persistent_w13, persistent_w2):
    w13, w2 = (tk_flags.WeightOperand.of(w) for w in _operands(128, 2880, 360))
    assert tk_flags.default_is_persistent(4 * T, w13, 132) is persistent_w13
    assert tk_flags.default_is_persistent(4 * T, w2, 132) is persistent_w2


@pytest.mark.parametrize("tp, steered", [(8, (1, 2, 4)), (4, ()), (2, ())])
def test_tk_flags_decide_gpt_oss(tp, steered):
    inter = 2880 // tp
    view = [tk_flags.WeightOperand.of(w) for w in _operands(128, 2880, inter)]
    copy = [tk_flags.WeightOperand.of(w) for w in _operands(128, 2880, inter, "copy")]
    for T in (1, 2, 4, 8, 16, 64, 256):
        decision = tk_flags.decide(T, 4, *view, num_sms=132, has_tma=True)
        assert bool(decision) is (T in steered), (T, decision.reason)
        assert decision.constraints == ({"is_persistent": True} if T in steered else {})
        assert not tk_flags.decide(T, 4, *copy, num_sms=132, has_tma=True)  # copies are never steered
    if steered:
        assert "w2 view" in tk_flags.decide(1, 4, *view, num_sms=132, has_tma=True).reason
        assert "no TMA" in tk_flags.decide(1, 4, *view, num_sms=132, has_tma=False).reason


def test_tk_flags_no_steering_without_tma_compliant_weights():
    w13, w2 = (tk_flags.WeightOperand.of(w) for w in _operands(16, 256, 100))  # I = 100: 200-byte rows
    decision = tk_flags.decide(1, 4, w13, w2, num_sms=132, has_tma=True)
    assert not decision and "not TMA-compliant" in decision.reason


class _FakeOptFlags:
    """Stands in for triton_kernels.matmul_ogs_details.opt_flags: a module-global constraint dict."""

    class InapplicableConstraint(Exception):
        pass

    def __init__(self, constraints=None, refuse=False):
        self._opt_flags_constraints = dict(constraints or {})
        self._opt_flags = None
        self.refuse = refuse
        self.seen = []

    def update_opt_flags_constraints(self, constraints):
        self._opt_flags_constraints.update(constraints)

    def reset_opt_flags_constraints(self):
        self._opt_flags_constraints = {}

    def matmul(self):
        """What one runner call does: read the constraints when choosing flags."""
        self.seen.append(dict(self._opt_flags_constraints))
        if self.refuse and self._opt_flags_constraints.get("is_persistent"):
            raise self.InapplicableConstraint("cannot enforce `is_persistent=True` constraint")
        return "out"


@pytest.fixture
def fake_tk(monkeypatch):
    def install(**kwargs):
        fake = _FakeOptFlags(**kwargs)
        monkeypatch.setattr(tk_flags, "_opt_flags_module", lambda: fake)
        monkeypatch.setattr(tk_flags, "_device_facts", lambda device: (132, True))
        monkeypatch.setattr(tk_flags, "_warned", set())
        tk_flags._cached_decision.cache_clear()  # decisions cached under the real device facts must not leak in
        return fake

    yield install
    tk_flags._cached_decision.cache_clear()


def test_tk_flags_call_is_scoped_and_restores_constraints(fake_tk):
    fake = fake_tk(constraints={"idle_sms": 2})
    w13, w2 = _operands(128, 2880, 360)
    assert tk_flags.call_with_view_flags(fake.matmul, 1, 4, w13, w2) == "out"
    assert fake.seen[-1] == {"idle_sms": 2, "is_persistent": True}
    assert fake._opt_flags_constraints == {"idle_sms": 2}  # restored, nothing leaked
    tk_flags.call_with_view_flags(fake.matmul, 8, 4, w13, w2)  # T = 8: default is already fine
    assert fake.seen[-1] == {"idle_sms": 2}
    tk_flags.call_with_view_flags(fake.matmul, 1, 4, *_operands(128, 2880, 360, "copy"))
    assert fake.seen[-1] == {"idle_sms": 2}


def test_tk_flags_restores_after_an_error(fake_tk):
    fake = fake_tk()
    w13, w2 = _operands(128, 2880, 360)

    def boom():
        fake.matmul()
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError, match="kernel failed"):
        tk_flags.call_with_view_flags(boom, 2, 4, w13, w2)
    assert fake.seen[-1] == {"is_persistent": True} and fake._opt_flags_constraints == {}


def test_tk_flags_respects_existing_choices(fake_tk):
    w13, w2 = _operands(128, 2880, 360)
    fake = fake_tk(constraints={"is_persistent": False})  # e.g. SGLang's own choice on SM120
    tk_flags.call_with_view_flags(fake.matmul, 1, 4, w13, w2)
    assert fake.seen[-1] == {"is_persistent": False} and fake._opt_flags_constraints == {"is_persistent": False}
    fake = fake_tk()
    fake._opt_flags = object()  # manual flags set: triton_kernels refuses constraints with them
    tk_flags.call_with_view_flags(fake.matmul, 1, 4, w13, w2)
    assert fake.seen[-1] == {}


def test_tk_flags_refused_constraint_runs_again_without(fake_tk):
    fake = fake_tk(refuse=True)
    w13, w2 = _operands(128, 2880, 360)
    with pytest.warns(UserWarning, match=r"triton_kernels refused \{'is_persistent': True\}.*running without it"):
        assert tk_flags.call_with_view_flags(fake.matmul, 1, 4, w13, w2) == "out"
    assert fake.seen == [{"is_persistent": True}, {}] and fake._opt_flags_constraints == {}


def test_tk_flags_without_triton_kernels_is_a_plain_call(monkeypatch):
    monkeypatch.setattr(tk_flags, "_opt_flags_module", lambda: None)
    w13, w2 = _operands(128, 2880, 360)
    assert tk_flags.call_with_view_flags(lambda: 7, 1, 4, w13, w2) == 7
    assert "not installed" in tk_flags.decision_for(1, 4, w13, w2).reason
