"""The torch reference against small cases computed by hand."""

import math

import pytest
import torch

from moe_dispatch import ExpertWeights, MoESpec, Routing, make_kernel, random_inputs, reference_moe, route
from moe_dispatch.reference import activate
from moe_dispatch.spec import GPT_OSS_SWIGLU, SILU, Activation


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_routing_rules_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    w, ids = route(logits, 2, Routing.TOPK_SOFTMAX)
    assert ids.tolist() == [[1, 2]]
    e = math.exp(1.0)
    assert w[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])
    w2, ids2 = route(logits, 2, Routing.SOFTMAX_TOPK_RENORM)
    assert ids2.tolist() == [[1, 2]] and w2[0].tolist() == pytest.approx(w[0].tolist())
    w3, _ = route(logits, 2, Routing.SOFTMAX_TOPK)
    z = sum(math.exp(v) for v in (1.0, 3.0, 2.0, 0.0))
    assert w3[0].tolist() == pytest.approx([math.exp(3) / z, math.exp(2) / z])


def test_silu_activation_by_hand():
    h = torch.tensor([[1.0, -2.0, 3.0, 0.5]])  # gate [1, -2], up [3, 0.5]
    out = activate(h, SILU)
    assert out[0].tolist() == pytest.approx([1 * sigmoid(1) * 3, -2 * sigmoid(-2) * 0.5])


def test_swiglu_activation_by_hand_with_clamps():
    act = Activation("swiglu", alpha=1.702, limit=7.0)
    # interleaved: (gate, up) pairs (9, 8) and (-1, -9): gate clamps to 7, up to +-7
    h = torch.tensor([[9.0, 8.0, -1.0, -9.0]])
    out = activate(h, act)
    expect = [7 * sigmoid(1.702 * 7) * (7 + 1), -1 * sigmoid(-1.702) * (-7 + 1)]
    assert out[0].tolist() == pytest.approx(expect, rel=1e-6)


def test_reference_moe_by_hand():
    # E=2, k=1, H=2, I=1, SiLU, bias. Token 0 goes to expert 1, token 1 to expert 0.
    spec = MoESpec(
        num_experts=2,
        top_k=1,
        hidden_size=2,
        intermediate_size=1,
        activation=SILU,
        bias=True,
        dtype=torch.float32,
        routing=Routing.SOFTMAX_TOPK_RENORM,
    )
    w13 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 0.0]]])  # [E, 2I, H]
    w2 = torch.tensor([[[1.0], [2.0]], [[-1.0], [0.5]]])  # [E, H, I]
    b13 = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    b2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    weights = ExpertWeights(w13, w2, b13, b2)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = reference_moe(spec, weights, x, logits)
    # token 0, expert 1: h = [1+2, 2*1+1] = [3, 3]; a = silu(3)*3; y = [-a + 1, 0.5a]
    a0 = 3 * sigmoid(3) * 3
    # token 1, expert 0: h = [3+0.5, -1] ; a = silu(3.5) * -1; y = [a, 2a + 1]
    a1 = 3.5 * sigmoid(3.5) * -1
    assert out.tolist() == [pytest.approx([-a0 + 1, 0.5 * a0]), pytest.approx([a1, 2 * a1 + 1])]


def test_reference_weights_sum_over_top_k():
    spec = MoESpec(
        num_experts=4,
        top_k=2,
        hidden_size=4,
        intermediate_size=2,
        activation=GPT_OSS_SWIGLU,
        bias=False,
        dtype=torch.float32,
        routing=Routing.TOPK_SOFTMAX,
    )
    weights = ExpertWeights.random(spec, seed=3)
    x, logits = random_inputs(spec, 5, seed=4)
    w, ids = route(logits, 2, spec.routing)
    expect = torch.zeros(5, 4)
    for t in range(5):
        for slot in range(2):
            e = int(ids[t, slot])
            h = weights.w13[e] @ x[t]
            expect[t] += w[t, slot] * (weights.w2[e] @ activate(h[None], spec.activation)[0])
    torch.testing.assert_close(reference_moe(spec, weights, x, logits), expect, rtol=1e-5, atol=1e-5)


def test_torch_backend_equals_reference_and_handles_empty_batch():
    spec = MoESpec(num_experts=8, top_k=2, hidden_size=16, intermediate_size=8, dtype=torch.float32)
    weights = ExpertWeights.random(spec, seed=1)
    kernel = make_kernel("torch", spec, weights)
    x, logits = random_inputs(spec, 7, seed=2)
    assert torch.equal(kernel(x, logits), reference_moe(spec, weights, x, logits))
    empty = kernel(x[:0], logits[:0])
    assert empty.shape == (0, 16) and empty.dtype == torch.float32


def test_random_weights_are_seeded_and_never_zero():
    spec = MoESpec(num_experts=4, top_k=2, hidden_size=16, intermediate_size=8, bias=True)
    a, b = ExpertWeights.random(spec, seed=5), ExpertWeights.random(spec, seed=5)
    for ta, tb in zip(a.tensors(), b.tensors(), strict=False):
        assert torch.equal(ta, tb) and bool((ta != 0).any())
    assert a.nbytes() == 4 * (2 * 8 * 16 + 16 * 8) * 2 + 4 * (2 * 8 + 16) * 4
    assert not torch.equal(ExpertWeights.random(spec, seed=6).w13, a.w13)
    _, skewed = random_inputs(spec, 64, seed=0, skew=8.0)
    top = route(skewed, 2, spec.routing)[1]
    assert (top >= 2).float().mean() > 0.9  # skew sends most tokens to the last experts
