"""AdaptiveMoE on the GPU: replay correctness, padding, bucket edges, selection, plans."""

import pytest
import torch

from moe_dispatch import ExpertWeights, random_inputs, reference_moe
from moe_dispatch.adaptive import AdaptiveMoE, graph_candidates
from moe_dispatch.testing import assert_close
from tests.cases import Case

pytestmark = pytest.mark.gpu

BUCKETS = (1, 2, 4, 8, 16)


@pytest.fixture(
    scope="module", params=[Case(0, 4, True, "swiglu"), Case(0, 2, False, "silu")], ids=lambda c: c.activation
)
def layer(request):
    spec = request.param.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=11)
    moe = AdaptiveMoE(spec, weights, buckets=BUCKETS, timed_replays=20, warmup_replays=3, keep_all=True)
    moe.capture()
    return moe


def test_default_candidates_are_every_capturable_kernel(layer):
    assert set(layer.kernels) == set(graph_candidates(layer.spec))
    assert {"triton", "triton_kernels"} <= set(layer.kernels)
    assert layer.extra_weight_bytes == 0  # triton_kernels reads transposed views; the others the weights


def test_winner_is_the_measured_fastest(layer):
    for result in layer.report.results:
        medians = {name: s.median_ms for name, s in result.timings_ms.items()}
        assert set(medians) == set(layer.kernels)
        assert result.winner == min(medians, key=medians.get)
        assert result.margin >= 1.0
    assert layer.winners == {r.bucket: r.winner for r in layer.report.results}


@pytest.mark.parametrize("bucket", BUCKETS)
def test_replay_equals_eager_bitwise_at_bucket_size(layer, bucket):
    x, logits = random_inputs(layer.spec, bucket, device="cuda", seed=bucket)
    for name, kernel in layer.kernels.items():
        hidden, static_logits = layer.static_inputs
        hidden[:bucket].copy_(x)
        static_logits[:bucket].copy_(logits)
        replayed = layer.graphs.replay_variant(bucket, name).clone()
        assert torch.equal(replayed, kernel(x, logits)), f"{name} bs={bucket}: replay differs from eager"


@pytest.mark.parametrize("num_tokens", sorted({t for b in BUCKETS for t in (b, b + 1)} - {BUCKETS[-1] + 1}))
def test_every_bucket_edge_matches_reference(layer, num_tokens):
    x, logits = random_inputs(layer.spec, num_tokens, device="cuda", seed=100 + num_tokens)
    before = sum(layer.replay_counts.values())
    out = layer(x, logits).clone()
    assert sum(layer.replay_counts.values()) == before + 1
    assert out.shape == (num_tokens, layer.spec.hidden_size)
    assert_close(out, reference_moe(layer.spec, layer.weights, x, logits), layer.spec.dtype, f"T={num_tokens}")


def test_padding_rows_never_change_real_rows(layer):
    x, logits = random_inputs(layer.spec, 5, device="cuda", seed=7)  # bucket 8: 3 padding rows
    hidden, static_logits = layer.static_inputs
    outs = []
    for garbage_seed in (1, 2):
        gx, gl = random_inputs(layer.spec, 8, device="cuda", seed=garbage_seed, skew=4.0 * garbage_seed)
        hidden[:8].copy_(gx)
        static_logits[:8].copy_(gl)
        outs.append(layer(x, logits).clone())
    assert torch.equal(outs[0], outs[1])


def test_above_largest_bucket_runs_eagerly(layer):
    x, logits = random_inputs(layer.spec, 40, device="cuda", seed=3)
    before = sum(layer.eager_calls.values())
    out = layer(x, logits)
    assert sum(layer.eager_calls.values()) == before + 1
    assert layer.plan.eager_kernel in layer.eager_calls
    assert_close(out, reference_moe(layer.spec, layer.weights, x, logits), layer.spec.dtype, "eager T=40")


def test_empty_batch_and_bad_input(layer):
    x, logits = random_inputs(layer.spec, 0, device="cuda")
    assert layer(x, logits).shape == (0, layer.spec.hidden_size)
    x, logits = random_inputs(layer.spec, 3)
    with pytest.raises(ValueError, match="is on cpu"):
        layer(x, logits)


def test_plan_reuse_skips_measurement(tmp_path):
    spec = Case(0, 4, True, "swiglu").spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=1)
    path = tmp_path / "plan.json"
    first = AdaptiveMoE(spec, weights, buckets=(1, 8), timed_replays=10, plan_path=str(path))
    first.capture()
    assert path.exists() and not first.plan_reused
    second = AdaptiveMoE(spec, weights, buckets=(1, 8), timed_replays=10, plan_path=str(path))
    second.capture()
    assert second.plan_reused and second.winners == first.winners
    assert all(r.timings_ms == {} for r in second.report.results)
    third = AdaptiveMoE(spec, weights, buckets=(1, 4, 8), timed_replays=10, plan_path=str(path))
    with pytest.warns(UserWarning, match="stale plan"):
        third.capture()
    assert not third.plan_reused


def test_threshold_and_fixed_policies_capture_their_rule():
    spec = Case(0, 2, False, "silu").spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=2)
    moe = AdaptiveMoE(spec, weights, policy="threshold", threshold=4, buckets=(1, 2, 4, 8))
    moe.capture()
    assert moe.winners == {1: "triton", 2: "triton", 4: "triton_kernels", 8: "triton_kernels"}
    x, logits = random_inputs(spec, 20, device="cuda", seed=4)
    moe(x, logits)
    assert moe.eager_calls == {"triton_kernels": 1}
    fixed = AdaptiveMoE(spec, weights, policy="fixed", fixed_kernel="triton", buckets=(1, 2))
    fixed.capture()
    assert fixed.winners == {1: "triton", 2: "triton"}
