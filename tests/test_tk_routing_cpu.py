"""tk_routing: the fused routing kernels under Triton's interpreter, against torch statements of the
top-k (triton_kernels' selection: larger value first, lower expert on ties; experts ascending per
token; softmax over the selected values) and of triton_kernels' metadata (written from its
documented definitions); which routing calls take the fused path, and the scoped swap of
SGLang's `routing`. triton_kernels is GPU-only here, so a stand-in with the signature of its
`streaming_topk` selects the experts; the GPU tier runs triton_kernels' own."""

from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl

from moe_dispatch.backends import tk_routing
from tests.cases import Recorder, interpreted_results

BLOCK_SIZES_LOG2 = range(4, 8)  # triton_kernels' block sizes on CUDA: 16, 32, 64, 128


@triton.jit
def stand_in_topk(X, stride_xm, n_expts_tot, offs_m, mask_m, N_EXPTS_PAD: tl.constexpr, N_EXPTS_ACT: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
    """The k largest of each row (lower expert on ties), experts ascending: (values, experts)."""
    cols = tl.arange(0, N_EXPTS_PAD)
    x = tl.load(X + offs_m[:, None] * stride_xm + cols[None, :], mask=mask_m & (cols < n_expts_tot)[None, :],
                other=float("-inf"))  # fmt: skip
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)
    order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # an int32 in the floats' order
    keys = (order.to(tl.int64) << 32) | (N_EXPTS_PAD - cols).to(tl.int64)[None, :]
    experts = tl.sort((N_EXPTS_PAD - (tl.topk(keys, N_EXPTS_ACT, dim=1) & 0xFFFFFFFF)).to(tl.int32), dim=1)
    return tl.load(X + offs_m[:, None] * stride_xm + experts, mask=mask_m), experts


# name: (tokens, top_k, experts, routing, softmax). Up to 32 tokens one program does everything;
# above, the scatter kernel runs per 32 tokens. "skewed" sends every token to the same few experts,
# so experts span many blocks of every size and many programs.
CASES = {
    "t1-k4-e128": (1, 4, 128, "uniform", True),
    "t5-k2-e8": (5, 2, 8, "uniform", True),
    "t32-k4-e128-no-softmax": (32, 4, 128, "uniform", False),
    "t33-k4-e128": (33, 4, 128, "uniform", True),
    "t100-k8-e16-skewed": (100, 8, 16, "skewed", True),
    "t250-k4-e32-skewed": (250, 4, 32, "skewed", False),
    "t256-k4-e128": (256, 4, 128, "uniform", True),
}
# Cases whose scatter programs read the counts in steps of this many programs (several steps).
COUNT_ROWS = {"t100-k8-e16-skewed": 2, "t256-k4-e128": 4}


def _logits(tokens, top_k, experts, routing, seed):
    """bf16 router logits with ties between experts 2..4 on every third token."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen)
    logits[::3, 2:5] = 1.5
    if routing == "skewed":
        logits[:, : top_k + 1] += 10.0  # every token picks among the first k + 1 experts
    return logits.to(torch.bfloat16)


def _reference(logits, top_k, softmax):
    """The top-k and triton_kernels' routing metadata, from their definitions."""
    num_experts = logits.shape[1]
    chosen = torch.sort(logits.float(), dim=1, descending=True, stable=True).indices[:, :top_k]
    experts = chosen.sort(dim=1).values
    vals = logits.gather(1, experts)
    if softmax:
        vals = torch.softmax(vals.float(), dim=1).to(logits.dtype)
    flat = experts.reshape(-1)
    col_sorted = torch.argsort(flat, stable=True)
    row_sorted = torch.argsort(col_sorted)
    col_sum = torch.bincount(flat, minlength=num_experts)
    zero = torch.zeros(1, dtype=torch.long)
    block_offs, schedules = [], []
    length = tk_routing.max_tiles(num_experts, flat.numel(), 1 << BLOCK_SIZES_LOG2[0])
    for log2 in BLOCK_SIZES_LOG2:
        blocks = (col_sum + (1 << log2) - 1) >> log2
        block_offs.append(torch.cat([zero, blocks.cumsum(0)]))
        entries = [(b << 16) | e for e in range(num_experts) for b in range(int(blocks[e]))]
        schedules.append(torch.tensor((entries + [-1] * length)[:length], dtype=torch.long))
    return {
        "experts": experts,
        "vals": vals,
        "col_sum": col_sum,
        "col_sorted": col_sorted,
        "row_sorted": row_sorted,
        "gate": vals.reshape(-1)[col_sorted],
        "slice_offs": torch.cat([zero, col_sum.cumsum(0)]),
        "block_offs": torch.stack(block_offs),
        "schedule": torch.stack(schedules),
    }


def _interpreter_worker(out_path: str) -> None:
    """Child process (TRITON_INTERPRET=1): each case's routing from the kernels and the reference."""
    results, default_rows = {}, tk_routing.MAX_COUNT_ROWS
    for i, (name, (tokens, top_k, experts, routing, softmax)) in enumerate(CASES.items()):
        logits = _logits(tokens, top_k, experts, routing, seed=i)
        tk_routing.MAX_COUNT_ROWS = COUNT_ROWS.get(name, default_rows)
        meta = tk_routing.fused_routing(logits, top_k, softmax, stand_in_topk, BLOCK_SIZES_LOG2)
        results[name] = {
            "kernel": {f.name: getattr(meta, f.name).clone() for f in tk_routing.dataclasses.fields(meta)},
            "reference": _reference(logits, top_k, softmax),
        }
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    return interpreted_results(__file__, tmp_path_factory)


FIELDS = ["experts", "vals", "col_sum", "col_sorted", "row_sorted", "gate", "slice_offs", "block_offs", "schedule"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("field", FIELDS)
def test_routing_matches_the_definitions(interpreted, name, field):
    got, want = interpreted[name]["kernel"][field], interpreted[name]["reference"][field]
    assert tuple(got.shape) == tuple(want.shape), f"{name} {field}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if field in ("vals", "gate"):
        assert got.dtype == torch.bfloat16
        diff = (got.float() - want.float()).abs()
        # Without softmax the values are copied; with it, numpy's exp may differ from torch's in the
        # last float32 bits and the interpreter rounds to bf16 toward zero: up to 2 bf16 ulps.
        bound = 0.0 if not CASES[name][4] else 2**-7 * want.float().abs()
        assert bool((diff <= bound).all()), (
            f"{name} {field}: max diff {diff.max():.3g}, rms {diff.pow(2).mean().sqrt():.3g}"
        )
        return
    assert got.dtype == torch.int32, f"{name} {field}: {got.dtype}"
    wrong = (got.long() != want).nonzero().flatten()[:5].tolist()
    assert not wrong, (
        f"{name} {field}: differs at {wrong}: {got.flatten()[:12].tolist()} vs {want.flatten()[:12].tolist()}"
    )


@pytest.mark.parametrize(
    ("experts", "rows", "min_block", "expected"),
    [(128, 4, 16, 4), (128, 128, 16, 128), (128, 4096, 16, 376), (32, 1200, 16, 105), (8, 10, 16, 8)],
)
def test_max_tiles(experts, rows, min_block, expected):
    """The bound triton_kernels' RaggedTensorMetadata.max_n_tiles gives (checked against it on the GPU)."""
    assert tk_routing.max_tiles(experts, rows, min_block) == expected


BAD_INPUTS = {
    "1-d logits": (torch.zeros(16), 4, "must be \\[T, E\\]"),
    "strided logits": (torch.zeros(16, 8).t(), 4, "unit column stride"),
    "no tokens": (torch.zeros(0, 16), 4, "rows"),
    "too many tokens": (torch.zeros(tk_routing.MAX_TOKENS + 1, 8), 4, "rows"),
    "top-k not a power of 2": (torch.zeros(4, 16), 3, "power of 2"),
    "top-k above the experts": (torch.zeros(4, 4), 8, "power of 2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_fused_routing_refuses_bad_inputs(case):
    logits, top_k, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        tk_routing.fused_routing(logits, top_k, True, stand_in_topk, BLOCK_SIZES_LOG2)


class CudaLike(torch.Tensor):
    """A CPU tensor that reports itself as CUDA: reaches the fused path's checks on this machine."""

    @property
    def is_cuda(self):
        return True


def _cuda_logits(tokens=8, experts=16):
    return torch.zeros(tokens, experts).as_subclass(CudaLike)


OTHER_CALLS = {
    "positional sm_first": lambda: ((_cuda_logits(), 4, True), {}),
    "provided expert indices": lambda: ((_cuda_logits(), 4), {"expt_indx": torch.zeros(8, 4)}),
    "n_rows": lambda: ((_cuda_logits(), 4), {"n_rows": 6}),
    "simulated ep": lambda: ((_cuda_logits(), 4), {"simulated_ep": 2}),
    "cpu logits": lambda: ((torch.zeros(8, 16), 4), {}),
    "3-d logits": lambda: ((torch.zeros(2, 8, 16).as_subclass(CudaLike), 4), {}),
    "too many tokens": lambda: ((_cuda_logits(tokens=tk_routing.MAX_TOKENS + 1), 4), {}),
    "top-k not a power of 2": lambda: ((_cuda_logits(), 3), {}),
    "strided logits": lambda: ((_cuda_logits(experts=8).t(), 4), {}),
}


@pytest.mark.parametrize("call", list(OTHER_CALLS))
def test_other_calls_run_sglangs_routing(call):
    args, kwargs = OTHER_CALLS[call]()
    original = Recorder()
    fast = tk_routing.make_fast_routing(original, topk_fn=stand_in_topk)
    assert fast(*args, **kwargs) == "original"
    assert fast.calls == 0 and len(original.calls) == 1
    assert original.calls[0][1] == kwargs


def test_the_plain_call_takes_the_fused_path():
    assert tk_routing.takes_fast_path(_cuda_logits(), 4, {"sm_first": True})
    assert tk_routing.takes_fast_path(_cuda_logits(tokens=tk_routing.MAX_TOKENS), 4, {})


def test_without_triton_kernels_top_k_every_call_runs_sglangs_routing(monkeypatch):
    monkeypatch.setattr(tk_routing, "triton_kernels_topk", lambda: None)
    original = Recorder()
    fast = tk_routing.make_fast_routing(original)
    assert fast(_cuda_logits(), 4) == "original" and fast.calls == 0 and len(original.calls) == 1


def test_scoped_swap_restores_sglangs_routing_even_on_error():
    original = Recorder()
    module = types.SimpleNamespace(routing=original)
    with pytest.raises(RuntimeError, match="boom"):
        with tk_routing.scoped_fast_routing(module) as installed:
            assert module.routing is installed and installed.__wrapped__ is original
            raise RuntimeError("boom")
    assert module.routing is original


def test_scoped_swap_without_sglang_yields_none(monkeypatch):
    monkeypatch.setattr(tk_routing, "sglang_topk_module", lambda: None)
    with tk_routing.scoped_fast_routing() as installed:
        assert installed is None
