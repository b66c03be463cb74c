"""tk_combine on the GPU: the combine kernel is bit-identical to an in-order float32 sum; the
triton_kernels runner gives bit-identical outputs with and without `scoped_fast_combine`,
takes the fast path once per call with top-k > 1, and does so under CUDA-graph capture; the
split-K path is bit-identical to triton_kernels' reduce with GPT-OSS SwiGLU and taken by the runner."""

import pytest
import torch

from graphs import capture
from moe_dispatch import ExpertWeights, get_backend, random_inputs
from moe_dispatch.backends import tk_combine
from moe_dispatch.backends.tk_combine import combine_slots, scoped_fast_combine
from moe_dispatch.spec import preset
from tests.cases import skip_unless_available

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def available():
    skip_unless_available("triton_kernels")


@pytest.mark.parametrize("tokens", [1, 33, 511, 512, 2049])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_combine_slots_is_an_in_order_float32_sum(tokens, dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 4, 2880, generator=gen, device="cuda").to(dtype)
    used = torch.rand(tokens, 4, generator=gen, device="cuda") > 0.2
    x[~used] = float("nan")
    acc = torch.zeros(tokens, 2880, device="cuda")
    for s in range(4):
        acc += torch.where(used[:, s, None], x[:, s].float(), 0.0)
    out = combine_slots(x, used, torch.empty(tokens, 2880, device="cuda", dtype=dtype))
    diff = (out.float() - acc).abs()
    assert torch.equal(out, acc.to(dtype)), f"max abs diff {diff.max().item():.3g}, rms {diff.pow(2).mean().sqrt():.3g}"


@pytest.mark.parametrize("tp", [8, 2])
@pytest.mark.parametrize("tokens", [1, 8, 32, 300, 1024, 4096])
def test_triton_kernels_is_bit_identical_with_the_fast_combine(tp, tokens):
    spec = preset("gpt-oss-120b", tp=tp)
    weights = ExpertWeights.random(spec, device="cuda", seed=tp)
    kernel = get_backend("triton_kernels").prepare(spec, weights)
    x, logits = random_inputs(spec, tokens, device="cuda", seed=tokens)
    stock = kernel(x, logits)
    with scoped_fast_combine() as installed:
        assert installed is not None, "matmul_ogs' reduce was not found"
        ours = kernel(x, logits)
    assert installed.calls == 1, f"the top-k combine should take the fast path once per call, took it {installed.calls}"
    diff = (ours.float() - stock.float()).abs()
    where = f"T={tokens} tp={tp}"
    assert torch.equal(ours, stock), f"{where}: max abs diff {diff.max().item():.3g}, rms {diff.pow(2).mean():.3g}^0.5"


def test_the_fast_combine_is_captured_into_graphs():
    spec = preset("gpt-oss-120b", tp=8)
    weights = ExpertWeights.random(spec, device="cuda", seed=3)
    kernel = get_backend("triton_kernels").prepare(spec, weights)
    x, logits = random_inputs(spec, 64, device="cuda", seed=5)
    stock = kernel(x, logits)
    static_x, static_logits = x.clone(), logits.clone()
    with scoped_fast_combine() as installed:
        captured = capture(kernel, [static_x, static_logits], torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    assert installed.calls >= 1
    captured.graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.output, stock)


@pytest.mark.parametrize("slices,rows", [(11, 32), (5, 128), (2, 256), (3, 7)])
def test_splitk_path_is_bit_identical_to_triton_kernels_reduce(slices, rows):
    """The split-K reduce with GPT-OSS SwiGLU, as matmul_ogs calls it, against triton_kernels' own."""
    from triton_kernels.reduce import PostprocessFn, reduce
    from triton_kernels.specialize import FnSpecs
    from triton_kernels.swiglu import swiglu_fn

    activation = PostprocessFn(
        specs=FnSpecs("swiglu", swiglu_fn, ("alpha", "limit"), reduction_n=2), fn_args=(1.702, 7.0)
    )
    gen = torch.Generator(device="cuda").manual_seed(slices * rows)
    x = torch.randn(slices, rows, 720, generator=gen, device="cuda") * 4  # float32 partials, some past the limit
    stock = torch.empty(rows, 360, device="cuda", dtype=torch.bfloat16)
    ours = torch.empty_like(stock)
    reduce(x, 0, y=stock, y_dtype=torch.bfloat16, postprocess_fn1=activation)
    fast = tk_combine.make_fast_reduce(lambda *a, **k: pytest.fail("delegated"))
    fast(x, 0, y=ours, y_dtype=torch.bfloat16, postprocess_fn1=activation)
    assert fast.splitk_calls == 1
    diff = (ours.float() - stock.float()).abs()
    assert torch.equal(ours, stock), (
        f"S={slices} M={rows}: max abs diff {diff.max():.3g}, rms {diff.pow(2).mean().sqrt():.3g}"
    )


def test_the_runner_takes_the_splitk_path_at_decode_sizes():
    """triton_kernels' own flags split K for GPT-OSS tp=8 at 8 tokens on the H200 (11 slices,
    kernel-breakdown-routing-tp8.md): the swap takes that reduce, bit-identically."""
    spec = preset("gpt-oss-120b", tp=8)
    weights = ExpertWeights.random(spec, device="cuda", seed=8)
    kernel = get_backend("triton_kernels").prepare(spec, weights)
    x, logits = random_inputs(spec, 8, device="cuda", seed=8)
    stock = kernel(x, logits)
    with scoped_fast_combine() as installed:
        ours = kernel(x, logits)
    assert installed.splitk_calls == 1, "expected triton_kernels' flags to split K at 8 tokens (see the docstring)"
    assert torch.equal(ours, stock)
