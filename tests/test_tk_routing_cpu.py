"""tk_routing: the routing-metadata kernel under Triton's interpreter against a torch statement of
triton_kernels' metadata (written from its documented definitions), which routing calls take the
fused path, and the scoped swap of SGLang's `routing`."""

from __future__ import annotations

import types

import pytest
import torch

from moe_dispatch.backends import tk_routing
from tests.cases import Recorder, interpreted_results

BLOCK_SIZES_LOG2 = range(4, 8)  # triton_kernels' block sizes on CUDA: 16, 32, 64, 128

# name: (tokens, top_k, experts, routing). "skewed" sends every token to the same few experts, so
# experts span many blocks of every size; N > 512 runs 8 warps.
CASES = {
    "t1-k4-e128": (1, 4, 128, "uniform"),
    "t5-k2-e8": (5, 2, 8, "uniform"),
    "t40-k4-e16": (40, 4, 16, "uniform"),
    "t33-k4-e128": (33, 4, 128, "uniform"),
    "t250-k4-e32-skewed": (250, 4, 32, "skewed"),
    "t256-k4-e128": (256, 4, 128, "uniform"),
}


def _top_k_output(tokens, top_k, experts, routing, seed):
    """[T, k] int16 experts, distinct and ascending per token (as triton_kernels' top-k returns
    them), and [T, k] bf16 gate values."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    if routing == "skewed":
        scores[:, : top_k + 1] += 10.0  # every token picks among the first k + 1 experts
    chosen = scores.topk(top_k, dim=1).indices.sort(dim=1).values
    vals = torch.rand(tokens, top_k, generator=gen).to(torch.bfloat16)
    return chosen.to(torch.int16), vals


def _reference(experts, vals, num_experts):
    """triton_kernels' routing metadata, from its definitions (tensor_details docstrings)."""
    flat = experts.reshape(-1).long()
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
        "col_sum": col_sum,
        "col_sorted": col_sorted,
        "row_sorted": row_sorted,
        "gate": vals.reshape(-1)[col_sorted],
        "slice_offs": torch.cat([zero, col_sum.cumsum(0)]),
        "block_offs": torch.stack(block_offs),
        "schedule": torch.stack(schedules),
    }


def _interpreter_worker(out_path: str) -> None:
    """Child process (TRITON_INTERPRET=1): each case's metadata from the kernel and the reference."""
    results = {}
    for i, (name, (tokens, top_k, experts, routing)) in enumerate(CASES.items()):
        chosen, vals = _top_k_output(tokens, top_k, experts, routing, seed=i)
        meta = tk_routing.routing_metadata(chosen, vals, experts, BLOCK_SIZES_LOG2)
        results[name] = {
            "kernel": {f.name: getattr(meta, f.name).clone() for f in tk_routing.dataclasses.fields(meta)},
            "reference": _reference(chosen, vals, experts),
        }
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    return interpreted_results(__file__, tmp_path_factory)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(
    "field", ["col_sum", "col_sorted", "row_sorted", "gate", "slice_offs", "block_offs", "schedule"]
)
def test_metadata_matches_the_definitions(interpreted, name, field):
    got, want = interpreted[name]["kernel"][field], interpreted[name]["reference"][field]
    assert tuple(got.shape) == tuple(want.shape), f"{name} {field}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if field == "gate":
        assert got.dtype == torch.bfloat16
        diff = (got.float() - want.float()).abs()
        assert torch.equal(got, want), f"{name} gate: max diff {diff.max():.3g}, rms {diff.pow(2).mean().sqrt():.3g}"
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


def test_routing_metadata_refuses_mismatched_or_oversized_inputs():
    chosen = torch.zeros(4, 2, dtype=torch.int16)
    with pytest.raises(ValueError, match="must be \\[T, k\\]"):
        tk_routing.routing_metadata(chosen, torch.zeros(4, 3), 8, BLOCK_SIZES_LOG2)
    big = torch.zeros(tk_routing.MAX_ASSIGNMENTS + 1, 1, dtype=torch.int16)
    with pytest.raises(ValueError, match="exceed one program"):
        tk_routing.routing_metadata(big, torch.zeros(big.shape), 8, BLOCK_SIZES_LOG2)


class CudaLike(torch.Tensor):
    """A CPU tensor that reports itself as CUDA: reaches the fused path's checks on this machine."""

    @property
    def is_cuda(self):
        return True


def _logits(tokens=8, experts=16):
    return torch.zeros(tokens, experts).as_subclass(CudaLike)


OTHER_CALLS = {
    "positional sm_first": lambda: ((_logits(), 4, True), {}),
    "provided expert indices": lambda: ((_logits(), 4), {"expt_indx": torch.zeros(8, 4)}),
    "n_rows": lambda: ((_logits(), 4), {"n_rows": 6}),
    "simulated ep": lambda: ((_logits(), 4), {"simulated_ep": 2}),
    "cpu logits": lambda: ((torch.zeros(8, 16), 4), {}),
    "3-d logits": lambda: ((torch.zeros(2, 8, 16).as_subclass(CudaLike), 4), {}),
    "too many assignments": lambda: ((_logits(tokens=tk_routing.MAX_ASSIGNMENTS // 4 + 1), 4), {}),
}


@pytest.mark.parametrize("call", list(OTHER_CALLS))
def test_other_calls_run_sglangs_routing(call):
    args, kwargs = OTHER_CALLS[call]()
    original = Recorder()
    fast = tk_routing.make_fast_routing(original)
    assert fast(*args, **kwargs) == "original"
    assert fast.calls == 0 and len(original.calls) == 1
    assert original.calls[0][1] == kwargs


def test_the_plain_call_takes_the_fused_path():
    assert tk_routing.takes_fast_path(_logits(), 4, {"sm_first": True})
    assert tk_routing.takes_fast_path(_logits(tokens=tk_routing.MAX_ASSIGNMENTS // 4), 4, {})


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
