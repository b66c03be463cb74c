"""MoESpec validation and the model presets."""

import pytest
import torch

from moe_dispatch.spec import GPT_OSS_SWIGLU, PRESETS, SILU, Activation, MoESpec, Routing, preset


def test_presets_match_published_configs():
    s = preset("gpt-oss-120b", tp=2)
    assert (s.num_experts, s.top_k, s.hidden_size, s.intermediate_size) == (128, 4, 2880, 1440)
    assert s.bias and s.activation == GPT_OSS_SWIGLU and s.routing is Routing.TOPK_SOFTMAX
    assert preset("gpt-oss-120b", tp=8).intermediate_size == 360
    assert preset("gpt-oss-20b").num_experts == 32
    m = preset("mixtral-8x7b", tp=2)
    assert (m.num_experts, m.top_k, m.hidden_size, m.intermediate_size) == (8, 2, 4096, 7168)
    assert not m.bias and m.activation == SILU
    q = preset("qwen3-30b-a3b", tp=4)
    assert (q.num_experts, q.top_k, q.hidden_size, q.intermediate_size) == (128, 8, 2048, 192)
    assert set(PRESETS) == {"gpt-oss-120b", "gpt-oss-20b", "mixtral-8x7b", "qwen3-30b-a3b"}


def test_preset_rejects_tp_that_does_not_divide():
    with pytest.raises(ValueError, match=r"tp=7 does not divide gpt-oss-120b's intermediate size 2880"):
        preset("gpt-oss-120b", tp=7)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="tp must be a positive int"):
            preset("mixtral-8x7b", tp=bad)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets: gpt-oss-120b"):
        preset("llama-moe")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0), "num_experts must be a positive int"),
        (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
        (dict(hidden_size=64.0), "hidden_size must be a positive int"),
        (dict(dtype=torch.int8), "dtype torch.int8 not supported"),
    ],
)
def test_spec_validation(kwargs, message):
    base = dict(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)
    with pytest.raises(ValueError, match=message):
        MoESpec(**{**base, **kwargs})


def test_activation_validation():
    with pytest.raises(ValueError, match="unknown activation kind 'gelu'"):
        Activation("gelu")
    with pytest.raises(ValueError, match="swiglu needs positive alpha and limit"):
        Activation("swiglu", alpha=1.0)
    with pytest.raises(ValueError, match="silu takes no alpha/limit"):
        Activation("silu", alpha=1.0)
    assert GPT_OSS_SWIGLU.gate_up_interleaved and not SILU.gate_up_interleaved


def test_spec_json_round_trip():
    for name in PRESETS:
        s = preset(name, tp=2)
        assert MoESpec.from_json(s.to_json()) == s


def test_routing_renormalize_flag():
    assert Routing.TOPK_SOFTMAX.renormalize and Routing.SOFTMAX_TOPK_RENORM.renormalize
    assert not Routing.SOFTMAX_TOPK.renormalize
