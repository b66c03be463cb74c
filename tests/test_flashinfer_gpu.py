"""`flashinfer_cutlass` on the GPU: the shared case list against the torch reference, CUDA-graph
capture and replay, autotuning, both routers, a GPT-OSS shard's real shapes.

Skipped, with the reason, where the backend is unavailable (flashinfer not installed or not
importable, no Hopper-or-newer GPU), and where the FlashInfer module the backend picks is not
built yet (`python -m moe_dispatch.backends.flashinfer_slim` builds the bf16 one, 32 units;
bench/flashinfer_gpu.sh builds resumably; MOE_DISPATCH_FLASHINFER_BUILD=1 lets the first test
build it instead). With the bf16 module, fp16 cases are refused by `supports`, with the reason. Set
MOE_DISPATCH_ERROR_TABLE=path to append the case x kernel error rows (JSON lines), as
tests/test_backends_gpu.py does.
"""

import pytest
import torch

from graphs import capture
from moe_dispatch import ExpertWeights, preset, random_inputs, reference_moe
from moe_dispatch.backends.flashinfer_moe import FlashInferCutlassBackend, kernel_weights
from moe_dispatch.testing import assert_close
from tests.cases import CASES, Case, check_replays, record_error, skip_unless_available

KERNEL = "flashinfer_cutlass"

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def available():
    skip_unless_available(KERNEL)


def untuned(router: str = "auto") -> FlashInferCutlassBackend:
    """The heuristic tactic: correctness does not need the autotuner's minutes of profiling."""
    return FlashInferCutlassBackend(router=router, autotune=False)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case: Case):
    spec = case.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=case.top_k)
    backend = untuned()
    support = backend.supports(spec)
    if not support:  # an unsupported combination must be refused loudly, with the reason
        with pytest.raises(ValueError, match=support.reason):
            backend.prepare(spec, weights)
        return
    kernel = backend.prepare(spec, weights)
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=1000 + case.num_tokens)
    out = kernel(x, logits)
    assert out.shape == (case.num_tokens, spec.hidden_size) and out.dtype == spec.dtype
    stats = assert_close(out, reference_moe(spec, weights, x, logits), spec.dtype, f"{KERNEL} {case.id}")
    record_error(case.id, KERNEL, stats)


@pytest.mark.parametrize("case", [Case(37, 4, True, "swiglu"), Case(129, 2, False, "silu")], ids=lambda c: c.id)
def test_fp16_matches_reference(case: Case):
    spec = case.spec(torch.float16)
    weights = ExpertWeights.random(spec, device="cuda", seed=3)
    backend = untuned()
    support = backend.supports(spec)
    if not support:  # the bf16-only module: refused with the reason, never run
        assert "bf16-only" in support.reason
        with pytest.raises(ValueError, match=support.reason):
            backend.prepare(spec, weights)
        return
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=4)
    out = backend.prepare(spec, weights)(x, logits)
    assert_close(out, reference_moe(spec, weights, x, logits), spec.dtype, f"{KERNEL} fp16 {case.id}")


@pytest.mark.parametrize("case", [Case(37, 4, True, "swiglu"), Case(129, 8, False, "silu")], ids=lambda c: c.id)
def test_graph_capture_and_replay_on_new_inputs(case: Case):
    spec = case.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=11)
    kernel = untuned().prepare(spec, weights)
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=12)
    captured = capture(kernel, [x, logits], torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    inputs_for = lambda seed: random_inputs(spec, case.num_tokens, device="cuda", seed=seed)  # noqa: E731
    check_replays(captured, (x, logits), spec, weights, inputs_for, (13, 14), f"{KERNEL} replay {case.id}")


def test_autotuned_kernel_matches_and_captures():
    case = Case(129, 4, True, "swiglu")
    spec = case.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=21)
    kernel = FlashInferCutlassBackend(autotune=True).prepare(spec, weights)
    assert kernel.tune_seconds is not None and kernel.tune_seconds > 0
    x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=22)
    assert_close(kernel(x, logits), reference_moe(spec, weights, x, logits), spec.dtype, "autotuned")
    captured = capture(kernel, [x, logits], torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    captured.graph.replay()
    torch.cuda.synchronize()
    assert_close(captured.output, reference_moe(spec, weights, x, logits), spec.dtype, "autotuned replay")


@pytest.mark.parametrize("router", ["torch", "sglang"])
def test_both_routers(router):
    if router == "sglang":
        from moe_dispatch.backends.sglang_env import sglang_support

        if not sglang_support():
            pytest.skip(f"SGLang router unavailable: {sglang_support().reason}")
    for case in (Case(37, 4, True, "swiglu"), Case(37, 2, False, "silu")):
        spec = case.spec()
        weights = ExpertWeights.random(spec, device="cuda", seed=31)
        kernel = untuned(router).prepare(spec, weights)
        assert kernel.router == router
        x, logits = random_inputs(spec, case.num_tokens, device="cuda", seed=32)
        assert_close(kernel(x, logits), reference_moe(spec, weights, x, logits), spec.dtype, f"router={router}")


@pytest.mark.parametrize("tp", [8, 2])
def test_gpt_oss_shard_shapes_and_extra_bytes(tp):
    spec = preset("gpt-oss-120b", tp=tp)
    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    kernel = untuned().prepare(spec, weights)
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
    assert kernel.extra_bytes == kernel_weights(spec, weights).extra_bytes
    assert kernel.extra_bytes == E * 2 * I * H * 2 + E * (2 * I + H) * 2 + 3 * E * 4
    for T in (1, 8, 300):
        x, logits = random_inputs(spec, T, device="cuda", seed=T)
        assert_close(kernel(x, logits), reference_moe(spec, weights, x, logits), spec.dtype, f"tp={tp} T={T}")


def test_rejects_cpu_input():
    spec = Case(4, 2, True, "swiglu").spec()
    kernel = untuned().prepare(spec, ExpertWeights.random(spec, device="cuda"))
    x, logits = random_inputs(spec, 4)
    with pytest.raises(ValueError, match="is on cpu but the expert weights are on cuda"):
        kernel(x, logits)
