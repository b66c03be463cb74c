"""`small_batch` on the GPU: the shared case list (T <= 129) in bf16 and fp16 against the torch
reference, real shard shapes (GPT-OSS-120B, Qwen3-30B-A3B, Mixtral-8x7B), determinism, and
CUDA-graph capture + replay on new inputs.

Inputs are `random_inputs` with the seeds test_backends_gpu.py uses, redrawn only where a
row's k-th and (k+1)-th largest logits tie (bf16 logits tie now and then): there the chosen
expert is arbitrary (small_batch takes the lowest id; torch.topk's order is unspecified).
Set MOE_DISPATCH_ERROR_TABLE=path to append the case x kernel error rows (JSON lines), as
tests/test_backends_gpu.py does (bf16 rows under the shared case id, fp16 rows with "-fp16").
"""

import functools

import pytest
import torch

from graphs import capture
from moe_dispatch import ExpertWeights, get_backend, make_kernel, preset, random_inputs, reference_moe
from moe_dispatch.testing import assert_close
from moe_dispatch.testing import untied_inputs as untied_inputs_on
from tests.cases import CASES, Case, check_replays, record_error, skip_unless_available

KERNEL = "small_batch"
GPU_CASES = tuple(case for case in CASES if case.num_tokens <= 129)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

pytestmark = pytest.mark.gpu
untied_inputs = functools.partial(untied_inputs_on, device="cuda")


@pytest.fixture(scope="module", autouse=True)
def available():
    skip_unless_available(KERNEL)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_matches_reference(case: Case, dtype_name: str):
    dtype = DTYPES[dtype_name]
    spec = case.spec(dtype)
    weights = ExpertWeights.random(spec, device="cuda", seed=case.top_k)
    support = get_backend(KERNEL).supports(spec)
    if not support:  # an unsupported combination must be refused loudly, with the reason
        with pytest.raises(ValueError, match=support.reason):
            make_kernel(KERNEL, spec, weights)
        return
    kernel = make_kernel(KERNEL, spec, weights)
    assert kernel.extra_bytes == 0
    x, logits = untied_inputs(spec, case.num_tokens, seed=1000 + case.num_tokens)
    out = kernel(x, logits)
    assert out.shape == (case.num_tokens, spec.hidden_size) and out.dtype == dtype
    stats = assert_close(out, reference_moe(spec, weights, x, logits), dtype, f"{KERNEL} {case.id} {dtype_name}")
    record_error(case.id if dtype == torch.bfloat16 else f"{case.id}-{dtype_name}", KERNEL, stats, dtype)


@pytest.mark.parametrize(
    "name, tp", [("gpt-oss-120b", 8), ("gpt-oss-120b", 2), ("qwen3-30b-a3b", 1), ("mixtral-8x7b", 8)]
)
def test_model_shard_shapes(name: str, tp: int):
    """Real sizes: H=2880 and I=360/1440 are not powers of two; Qwen3 routes top-8 of 128."""
    spec = preset(name, tp=tp)
    weights = ExpertWeights.random(spec, device="cuda", seed=0)
    kernel = make_kernel(KERNEL, spec, weights)
    for T in (1, 7, 32):
        x, logits = untied_inputs(spec, T, seed=T)
        stats = assert_close(
            kernel(x, logits), reference_moe(spec, weights, x, logits), spec.dtype, f"{spec.name} T={T}"
        )
        record_error(f"{name}-tp{tp}-T{T}", KERNEL, stats, spec.dtype)


def test_deterministic():
    """No atomics: the k experts of a token are summed in one program, in slot order."""
    spec = Case(37, 8, True, "swiglu").spec()
    kernel = make_kernel(KERNEL, spec, ExpertWeights.random(spec, device="cuda", seed=1))
    x, logits = untied_inputs(spec, 37, seed=2)
    first = kernel(x, logits)
    for _ in range(3):
        assert torch.equal(kernel(x, logits), first)


@pytest.mark.parametrize(
    "case", [Case(1, 4, True, "swiglu"), Case(5, 8, False, "silu"), Case(32, 2, True, "silu")], ids=lambda c: c.id
)
def test_graph_replay_on_new_inputs(case: Case):
    spec = case.spec()
    weights = ExpertWeights.random(spec, device="cuda", seed=3)
    kernel = make_kernel(KERNEL, spec, weights)
    x, logits = untied_inputs(spec, case.num_tokens, seed=10)
    static_x, static_logits = x.clone(), logits.clone()
    captured = capture(kernel, [static_x, static_logits], torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    inputs_for = lambda seed: untied_inputs(spec, case.num_tokens, seed=seed)  # noqa: E731
    check_replays(captured, (static_x, static_logits), spec, weights, inputs_for, (11, 12), f"replay {case.id}", kernel)


@pytest.mark.parametrize("name, tp", [("gpt-oss-120b", 8), ("qwen3-30b-a3b", 1)])
def test_pdl_launch_matches_without(name: str, tp: int):
    """Down launched with PDL (it waits for gate_up inside): the same bits as without, eager and
    replayed in a graph, and within tolerance of the reference."""
    import dataclasses

    from moe_dispatch.backends.small_batch.backend import SmallBatchBackend
    from moe_dispatch.backends.small_batch.launch import config_for

    spec = preset(name, tp=tp)
    weights = ExpertWeights.random(spec, device="cuda", seed=5)
    for T in (1, 8, 29):
        plain = config_for(T)
        with_pdl = SmallBatchBackend(dataclasses.replace(plain, pdl=True)).prepare(spec, weights)
        without = SmallBatchBackend(dataclasses.replace(plain, pdl=False)).prepare(spec, weights)
        x, logits = untied_inputs(spec, T, seed=20 + T)
        out = with_pdl(x, logits)
        assert torch.equal(out, without(x, logits)), f"{spec.name} T={T}: PDL changed the result"
        assert_close(out, reference_moe(spec, weights, x, logits), spec.dtype, f"{spec.name} T={T} pdl")
        static = (x.clone(), logits.clone())
        captured = capture(with_pdl, list(static), torch.cuda.graph_pool_handle(), torch.cuda.Stream())
        inputs_for = functools.partial(untied_inputs, spec, T)
        check_replays(captured, static, spec, weights, inputs_for, (31, 32), f"pdl replay T={T}", with_pdl)


def test_rejects_cpu_input():
    spec = Case(4, 2, True, "swiglu").spec()
    kernel = make_kernel(KERNEL, spec, ExpertWeights.random(spec, device="cuda"))
    x, logits = random_inputs(spec, 4)
    with pytest.raises(ValueError, match="is on cpu but the expert weights are on cuda"):
        kernel(x, logits)
