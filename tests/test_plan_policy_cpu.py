"""Policies (pure choice from settings and timings) and plan files (round trip, staleness, corruption)."""

import dataclasses
import json
import warnings

import pytest

from moe_dispatch.plan import BucketChoice, Plan, PlanMetadata, load_matching_plan
from moe_dispatch.policy import Policy, eager_kernel, static_choice, threshold_kernel
from moe_dispatch.spec import preset

BUCKETS = (1, 2, 4, 8)
KERNELS = ("triton", "triton_kernels")


def metadata(**changes) -> PlanMetadata:
    base = dict(
        gpu="NVIDIA H100 80GB HBM3",
        sm_count=132,
        torch="2.11.0",
        triton="3.6.0",
        sglang="0.5.17",
        triton_kernels="matmul_ogs",
        spec=preset("gpt-oss-120b", tp=2).to_json(),
        buckets=BUCKETS,
        kernels=KERNELS,
    )
    return PlanMetadata(**{**base, **changes})


def make_plan(meta: PlanMetadata | None = None) -> Plan:
    choices = tuple(
        BucketChoice(b, "triton" if b < 4 else "triton_kernels", {"triton": 0.01 * b, "triton_kernels": 0.03})
        for b in BUCKETS
    )
    return Plan(meta or metadata(), "measure", choices, "triton_kernels")


def test_threshold_rule_is_the_seed_rule():
    assert threshold_kernel(1535) == "triton" and threshold_kernel(1536) == "triton_kernels"
    assert threshold_kernel(31, threshold=32) == "triton" and threshold_kernel(32, threshold=32) == "triton_kernels"
    with pytest.raises(ValueError, match="threshold must be positive"):
        threshold_kernel(4, threshold=0)


def test_static_choices():
    assert static_choice(Policy.MEASURE, BUCKETS, KERNELS) is None
    assert static_choice(Policy.THRESHOLD, BUCKETS, KERNELS, threshold=4) == {
        1: "triton",
        2: "triton",
        4: "triton_kernels",
        8: "triton_kernels",
    }
    assert static_choice(Policy.FIXED, BUCKETS, KERNELS, fixed_kernel="triton") == dict.fromkeys(BUCKETS, "triton")
    with pytest.raises(ValueError, match="needs kernel"):
        static_choice(Policy.THRESHOLD, BUCKETS, ("triton",), threshold=4)
    with pytest.raises(ValueError, match="fixed kernel 'cutlass' is not among"):
        static_choice(Policy.FIXED, BUCKETS, KERNELS, fixed_kernel="cutlass")


def test_policy_parse_and_eager_kernel():
    assert Policy.parse("threshold") is Policy.THRESHOLD
    with pytest.raises(ValueError, match="unknown policy 'fastest'; expected one of: measure, threshold, fixed"):
        Policy.parse("fastest")
    winners = {1: "triton", 8: "triton_kernels"}
    assert eager_kernel(Policy.MEASURE, winners) == "triton_kernels"
    assert eager_kernel(Policy.THRESHOLD, winners, threshold=1536, num_tokens=300) == "triton"
    assert eager_kernel(Policy.FIXED, winners, fixed_kernel="triton") == "triton"
    with pytest.raises(ValueError, match="no measured winners"):
        eager_kernel(Policy.MEASURE, {})


def test_plan_round_trip(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert Plan.load(path) == plan
    assert plan.winners() == {1: "triton", 2: "triton", 4: "triton_kernels", 8: "triton_kernels"}
    assert load_matching_plan(path, metadata()) == plan


def test_stale_plan_is_refused_with_the_mismatch_named(tmp_path):
    path = make_plan().save(tmp_path / "plan.json")
    with pytest.warns(UserWarning, match=r"stale plan .*gpu: plan has 'NVIDIA H100 80GB HBM3', here 'NVIDIA H200'"):
        assert load_matching_plan(path, metadata(gpu="NVIDIA H200")) is None
    with pytest.warns(UserWarning, match=r"triton: plan has '3.6.0', here '3.7.0'.*buckets"):
        assert load_matching_plan(path, metadata(triton="3.7.0", buckets=(1, 2))) is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something-else"}', "not a moe-dispatch plan"),
        ('{"format": "moe-dispatch-plan", "version": 99}', "format version 99"),
        ('{"format": "moe-dispatch-plan", "version": 1, "metadata": {}}', "malformed plan"),
    ],
)
def test_corrupt_plan_is_never_fatal(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        Plan.load(path)
    with pytest.warns(UserWarning, match=message):
        assert load_matching_plan(path, metadata()) is None


def test_plan_choice_must_be_a_known_kernel(tmp_path):
    data = make_plan().to_json()
    data["choices"][0]["kernel"] = "cutlass"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"chosen kernel\(s\) \['cutlass'\]"):
        Plan.load(path)


@pytest.mark.parametrize("eager", ["cutlass", "", "Triton"])
def test_plan_eager_kernel_must_be_a_known_kernel(tmp_path, eager):
    """An unknown eager kernel used to reach capture() and fail there with a bare KeyError."""
    data = make_plan().to_json()
    data["eager_kernel"] = eager
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"malformed plan: eager kernel '{eager}' not among \('triton', "):
        Plan.load(path)
    with pytest.warns(UserWarning, match=rf"ignoring plan .*eager kernel '{eager}' not among.*; measuring again"):
        assert load_matching_plan(path, metadata()) is None


def test_plan_eager_kernel_may_be_any_candidate(tmp_path):
    for eager in KERNELS:
        plan = dataclasses.replace(make_plan(), eager_kernel=eager)
        assert load_matching_plan(plan.save(tmp_path / f"{eager}.json"), metadata()) == plan


def test_missing_plan_is_silent(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_matching_plan(tmp_path / "absent.json", metadata()) is None
        assert load_matching_plan(None, metadata()) is None
