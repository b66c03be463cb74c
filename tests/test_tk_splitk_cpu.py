"""tk_combine's split-K path: the kernel under Triton's interpreter against an in-order float32 sum
followed by the same activation in torch, and which reduce calls take it."""

from __future__ import annotations

import types

import pytest
import torch
import triton
import triton.language as tl

from moe_dispatch.backends import tk_combine
from tests.cases import Recorder, interpreted_results

ALPHA, LIMIT = 1.702, 7.0


@triton.jit
def pairwise_gate(tile, alpha, limit):
    """A stand-in for triton_kernels' SwiGLU: interleaved (gate, linear) column pairs ->
    clamp(gate) * sigmoid(alpha * gate) * (clamp(linear) + 1)."""
    gate, linear = tl.split(tl.reshape(tile, (tile.shape[0], tile.shape[1] // 2, 2)))
    gate = tl.minimum(gate, limit)
    linear = tl.clamp(linear, -limit, limit)
    return gate / (1 + tl.exp(-alpha * gate)) * (linear + 1)


def _pairwise_gate_torch(acc: torch.Tensor) -> torch.Tensor:
    gate, linear = acc[:, 0::2].clamp(max=LIMIT), acc[:, 1::2].clamp(-LIMIT, LIMIT)
    return gate / (1 + torch.exp(-ALPHA * gate)) * (linear + 1)


def _activation(fn=pairwise_gate, reduction_n=2, args=(ALPHA, LIMIT)):
    """A triton_kernels PostprocessFn look-alike: .specs (fn, reduction_n) and .fn_args."""
    return types.SimpleNamespace(specs=types.SimpleNamespace(fn=fn, reduction_n=reduction_n), fn_args=args)


# (slices, rows, columns, output dtype): one row per program, and 4 with a partial last program;
# columns past one 128-wide tile and not a multiple of it.
CASES = {
    "s5-m10-n256-fp32": (5, 10, 256, torch.float32),
    "s11-m3-n200-fp32": (11, 3, 200, torch.float32),
    "s2-m259-n128-fp32": (2, 259, 128, torch.float32),
    "s5-m33-n384-bf16": (5, 33, 384, torch.bfloat16),
}


def _interpreter_worker(out_path: str) -> None:
    """Child process (TRITON_INTERPRET=1): each case through reduce's split-K call pattern."""
    results = {}
    for i, (name, (slices, rows, cols, dtype)) in enumerate(CASES.items()):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(slices, rows, cols, generator=gen) * 3  # float32 partials, some past the clamp
        fast = tk_combine.make_fast_reduce(lambda *a, **k: pytest.fail("delegated"))
        y = torch.full((rows, cols // 2), 7.0, dtype=dtype)
        out, scale = fast(x, dim=0, y=y, y_dtype=dtype, postprocess_fn1=_activation(), postprocess_fn2=None)
        acc = torch.zeros(rows, cols)
        for s in range(slices):
            acc += x[s]
        assert scale is None and fast.splitk_calls == 1 and fast.calls == 0
        results[name] = {"out": out, "expected": _pairwise_gate_torch(acc), "same_y": out.data_ptr() == y.data_ptr()}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    return interpreted_results(__file__, tmp_path_factory)


@pytest.mark.parametrize("name", list(CASES))
def test_splitk_is_the_activation_of_an_in_order_float32_sum(interpreted, name):
    result = interpreted[name]
    out, expected = result["out"], result["expected"]
    assert result["same_y"], "the split-K path must write into reduce's y"
    diff = (out.float() - expected).abs()
    # float32: exp may differ in the last bits between numpy and torch; bf16: one output rounding
    # (the interpreter rounds toward zero: up to 2 bf16 ulps).
    rtol = 1e-5 if out.dtype == torch.float32 else 2**-7
    bound = rtol * expected.abs() + 1e-6
    assert bool((diff <= bound).all()), (
        f"{name}: max abs diff {diff.max():.3g}, rms {diff.pow(2).mean().sqrt():.3g}, dtype {out.dtype}"
    )


def _splitk_call(slices=5, rows=4, cols=16):
    x = torch.zeros(slices, rows, cols)
    return x, {"y": torch.empty(rows, cols // 2), "postprocess_fn1": _activation(), "postprocess_fn2": None}


@pytest.fixture
def fast(monkeypatch):
    """A fast_reduce over a recording original, with splitk_activation recorded instead of launched."""
    launched = []

    def record(x, y, activation, args):
        launched.append((x, y, activation, args))
        return y

    monkeypatch.setattr(tk_combine, "splitk_activation", record)
    original = Recorder()
    return tk_combine.make_fast_reduce(original), original, launched


def test_the_splitk_pattern_takes_the_fast_path(fast):
    fast_reduce, original, launched = fast
    x, options = _splitk_call()
    out, scale = fast_reduce(x, 0, **options)
    assert out is options["y"] and scale is None and fast_reduce.splitk_calls == 1 and not original.calls
    ((_, _, activation, args),) = launched
    assert activation.fn is pairwise_gate and args == (ALPHA, LIMIT)


OTHER_CALLS = {
    "no activation": lambda o: {**o, "postprocess_fn1": None},
    "an activation of one argument": lambda o: {**o, "postprocess_fn1": _activation(args=(ALPHA,))},
    "a reduction not dividing the tile": lambda o: {**o, "postprocess_fn1": _activation(reduction_n=3)},
    "a mask": lambda o: {**o, "mask": torch.ones(5, 4, 16, dtype=torch.bool)},
    "a scale": lambda o: {**o, "scale": torch.ones(1)},
    "micro-scaled output": lambda o: {**o, "y_has_mx": True},
    "saturating flex output": lambda o: {**o, "y_flex_saturate_inf": True},
    "an output flex scale": lambda o: {**o, "y_flex": types.SimpleNamespace(dtype=None, expected_scale=torch.ones(1))},
    "an epilogue": lambda o: {**o, "postprocess_fn2": _activation()},
    "no y": lambda o: {**o, "y": None},
    "a y of the wrong width": lambda o: {**o, "y": torch.empty(4, 16)},
    "a y_dtype cast": lambda o: {**o, "y_dtype": torch.bfloat16},
}


@pytest.mark.parametrize("case", list(OTHER_CALLS))
def test_other_dim0_reduce_calls_go_to_triton_kernels_own(fast, case):
    fast_reduce, original, launched = fast
    x, options = _splitk_call()
    assert fast_reduce(x, 0, **OTHER_CALLS[case](options)) == "original"
    assert len(original.calls) == 1 and not launched and fast_reduce.splitk_calls == 0, case


def test_strided_partials_go_to_triton_kernels_own(fast):
    fast_reduce, original, launched = fast
    x, options = _splitk_call()
    assert fast_reduce(x.transpose(1, 2).contiguous().transpose(1, 2), 0, **options) == "original"
    assert not launched


def test_more_slices_than_unrolled_go_to_triton_kernels_own(fast):
    fast_reduce, original, launched = fast
    x, options = _splitk_call(slices=tk_combine.MAX_SPLITK_SLICES + 1)
    assert fast_reduce(x, 0, **options) == "original"
    assert not launched and len(original.calls) == 1


@pytest.mark.parametrize(
    "rows,block_m", [(1, 1), (32, 1), (63, 1), (64, 1), (128, 2), (255, 2), (256, 4), (512, 8), (4096, 8)]
)
def test_splitk_rows_per_program_grow_with_the_rows(rows, block_m):
    assert tk_combine.splitk_block_m(rows) == block_m


def test_splitk_activation_refuses_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        tk_combine.splitk_activation(torch.zeros(2, 4, 16), torch.zeros(4, 16), _activation().specs, (ALPHA, LIMIT))
    with pytest.raises(ValueError, match="do not fit"):
        tk_combine.splitk_activation(torch.zeros(2, 4, 16), torch.zeros(4, 8), _activation().specs, (ALPHA,))
