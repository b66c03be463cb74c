"""tk_routing on the GPU: the fused routing (triton_kernels' top-k function and our metadata) equals
SGLang's `routing` bit for bit, field by field (GPT-OSS and Qwen3 router shapes, both softmax
orders, ties in the logits, one program and many), the MoE output of the triton_kernels runner is
bit-identical with it, and it runs under CUDA-graph capture."""

import pytest
import torch

from graphs import capture
from moe_dispatch import ExpertWeights, get_backend, random_inputs
from moe_dispatch.backends import tk_routing
from moe_dispatch.spec import preset
from tests.cases import skip_unless_available

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def available():
    skip_unless_available("triton_kernels")


def _stock_routing():
    module = tk_routing.sglang_topk_module()
    assert module is not None, "SGLang's triton_kernels routing was not found"
    return module.routing


def _fields(routing_output) -> dict[str, torch.Tensor]:
    data, gather, scatter = routing_output
    ragged = data.expt_data
    return {
        "gate_scal": data.gate_scal,
        "expt_hist": data.expt_hist,
        "slice_sizes": ragged.slice_sizes,
        "slice_offs": ragged.slice_offs,
        "block_offs": torch.stack([ragged.block_offs(b) for b in ragged.block_sizes()]),
        "block_schedule": torch.stack([ragged.block_schedule(b) for b in ragged.block_sizes()]),
        "gather.src": gather.src_indx,
        "gather.dst": gather.dst_indx,
        "scatter.src": scatter.src_indx,
        "scatter.dst": scatter.dst_indx,
    }


def _assert_same_routing(ours, stock, where: str) -> None:
    assert (ours[0].n_expts_tot, ours[0].n_expts_act) == (stock[0].n_expts_tot, stock[0].n_expts_act), where
    for name, expected in _fields(stock).items():
        got = _fields(ours)[name]
        assert got.dtype == expected.dtype and tuple(got.shape) == tuple(expected.shape), (
            f"{where} {name}: {got.dtype} {tuple(got.shape)} vs stock {expected.dtype} {tuple(expected.shape)}"
        )
        wrong = (got != expected).nonzero().flatten()[:5].tolist()
        assert not wrong, f"{where} {name}: differs from stock at {wrong}"


ROUTER_CASES = [
    *((128, 4, tokens, sm_first) for tokens in (1, 2, 7, 32, 33, 100, 256, 4096) for sm_first in (False, True)),
    *((128, 4, tokens, False) for tokens in (1000, 2048, 8192)),
    *((128, 8, tokens, False) for tokens in (1, 32, 128, 3000)),  # Qwen3-30B-A3B's router
    *((32, 4, tokens, False) for tokens in (5, 64, 256, 5000)),  # GPT-OSS-20B's router
]


@pytest.mark.parametrize("experts,top_k,tokens,sm_first", ROUTER_CASES)
def test_fused_routing_is_bit_identical_to_sglangs(experts, top_k, tokens, sm_first):
    assert tokens <= tk_routing.MAX_TOKENS, "a case past the cap tests nothing fused"
    gen = torch.Generator(device="cuda").manual_seed(tokens * experts + top_k)
    logits = torch.randn(tokens, experts, generator=gen, device="cuda").to(torch.bfloat16)
    logits[::3, 5:9] = 1.5  # ties between experts: the top-k's tie-breaking must be kept
    stock_routing = _stock_routing()
    stock = stock_routing(logits, top_k, sm_first=sm_first)
    fused = tk_routing.make_fast_routing(stock_routing)
    ours = fused(logits, top_k, sm_first=sm_first)
    assert fused.calls == 1
    _assert_same_routing(ours, stock, f"T={tokens} E={experts} k={top_k} sm_first={sm_first}")


def test_calls_past_the_cap_run_sglangs_routing():
    tokens = tk_routing.MAX_TOKENS + 1
    logits = torch.randn(tokens, 128, device="cuda").to(torch.bfloat16)
    stock_routing = _stock_routing()
    fused = tk_routing.make_fast_routing(stock_routing)
    ours = fused(logits, 4)
    assert fused.calls == 0
    _assert_same_routing(ours, stock_routing(logits, 4), f"T={tokens} past the cap")


@pytest.mark.parametrize("tokens,experts", [(1, 128), (1000, 128), (4096, 32)])
def test_schedule_length_is_triton_kernels_bound(tokens, experts):
    from triton_kernels.tensor import RaggedTensorMetadata

    bound = RaggedTensorMetadata.max_n_tiles(experts, tokens)
    assert tk_routing.max_tiles(experts, tokens, min(RaggedTensorMetadata.block_sizes())) == bound


@pytest.mark.parametrize(
    "tp,tokens", [*((8, tokens) for tokens in (1, 8, 64, 256, 1024, 4096)), *((2, tokens) for tokens in (8, 300, 4096))]
)
def test_triton_kernels_is_bit_identical_with_the_fused_routing(tp, tokens):
    spec = preset("gpt-oss-120b", tp=tp)
    weights = ExpertWeights.random(spec, device="cuda", seed=tp)
    kernel = get_backend("triton_kernels").prepare(spec, weights)
    x, logits = random_inputs(spec, tokens, device="cuda", seed=tokens)
    stock = kernel(x, logits)
    with tk_routing.scoped_fast_routing() as installed:
        ours = kernel(x, logits)
    assert installed.calls == 1, f"the routing should take the fused path once per call, took it {installed.calls}"
    diff = (ours.float() - stock.float()).abs()
    assert torch.equal(ours, stock), (
        f"T={tokens} tp={tp}: max abs diff {diff.max():.3g}, rms {diff.pow(2).mean().sqrt():.3g}"
    )


def test_the_fused_routing_is_captured_into_graphs():
    spec = preset("gpt-oss-120b", tp=8)
    weights = ExpertWeights.random(spec, device="cuda", seed=3)
    kernel = get_backend("triton_kernels").prepare(spec, weights)
    x, logits = random_inputs(spec, 48, device="cuda", seed=5)
    static_x, static_logits = x.clone(), logits.clone()
    with tk_routing.scoped_fast_routing() as installed:
        captured = capture(kernel, [static_x, static_logits], torch.cuda.graph_pool_handle(), torch.cuda.Stream())
    assert installed.calls >= 1
    for seed in (7, 8):  # new routing each replay: the metadata is recomputed inside the graph
        x, logits = random_inputs(spec, 48, device="cuda", seed=seed)
        static_x.copy_(x)
        static_logits.copy_(logits)
        captured.graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured.output, kernel(x, logits)), f"replay with inputs of seed {seed}"
