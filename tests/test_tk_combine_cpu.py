"""tk_combine: the combine kernel under Triton's interpreter (bit-identical to an in-order float32
sum), which reduce calls take the fast path, and the scoped swap of matmul_ogs' `reduce`."""

from __future__ import annotations

import types

import pytest
import torch

from moe_dispatch.backends import tk_combine
from tests.cases import Recorder, interpreted_results

# (tokens, slots, columns, dtype, mask): one program per token below 512 tokens, four from 512;
# columns past one 512-wide tile; masks with unused slots whose rows hold NaN.
CASES = {
    "t5-k4-n40-bf16-mask": (5, 4, 40, torch.bfloat16, True),
    "t3-k2-n600-fp16": (3, 2, 600, torch.float16, False),
    "t513-k4-n24-bf16-mask": (513, 4, 24, torch.bfloat16, True),
    "t2-k1-n16-fp32-mask": (2, 1, 16, torch.float32, True),
}


def _case_inputs(tokens, slots, cols, dtype, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(tokens * slots, cols, generator=gen).to(dtype)  # [T * k, N] as matmul_ogs writes it
    used = torch.rand(tokens, slots, generator=gen) > 0.3 if masked else None
    if masked:
        rows.view(tokens, slots, cols)[~used] = float("nan")  # rows no matmul wrote
    return rows.view(tokens, slots, cols), used


def _float32_sum(x: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
    acc = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float32)
    for s in range(x.shape[1]):
        part = x[:, s].float()
        acc += part if used is None else torch.where(used[:, s, None], part, 0.0)
    return acc


def _truncated_bf16(acc: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 rounding toward zero (drop the low 16 bits)."""
    return (acc.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _interpreter_worker(out_path: str) -> None:
    """Child process (TRITON_INTERPRET=1): each case's combine through reduce's call pattern."""
    results = {}
    for i, (name, (tokens, slots, cols, dtype, masked)) in enumerate(CASES.items()):
        x, used = _case_inputs(tokens, slots, cols, dtype, masked, seed=i)
        mask = None if used is None else used.view(tokens, slots, 1).expand_as(x)  # as matmul_ogs builds it
        fast = tk_combine.make_fast_reduce(lambda *a, **k: pytest.fail("delegated"))
        y = torch.full((tokens, cols), 7.0, dtype=dtype)
        out, scale = fast(x, dim=1, mask=mask, y=y, postprocess_fn2=None, x_flex=None, y_has_mx=False)
        acc = _float32_sum(x, used)
        results[name] = {"out": out, "sum": acc, "same_y": out.data_ptr() == y.data_ptr()}
        assert scale is None and fast.calls == 1
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    return interpreted_results(__file__, tmp_path_factory)


@pytest.mark.parametrize("name", list(CASES))
def test_combine_is_bit_identical_to_an_in_order_float32_sum(interpreted, name):
    result = interpreted[name]
    out, acc = result["out"], result["sum"]
    assert result["same_y"], "the combine must write into reduce's y"
    expected = acc.to(out.dtype)
    same = out == expected
    if out.dtype == torch.bfloat16:  # Triton's interpreter casts to bf16 toward zero, the GPU to nearest
        same |= out == _truncated_bf16(acc)
    diff = (out.float() - expected.float()).abs()
    assert bool(same.all()), (
        f"{name}: max abs diff {diff.max().item():.3g}, rms {diff.pow(2).mean().sqrt().item():.3g}; "
        "the combine must be an in-order float32 sum, then one cast"
    )
    assert not torch.isnan(out).any(), f"{name}: NaN from a masked row leaked into the sum"


@pytest.fixture
def fast(monkeypatch):
    """A fast_reduce over a recording original, with combine_slots recorded instead of launched."""
    launched = []
    monkeypatch.setattr(tk_combine, "combine_slots", lambda x, slots, y: launched.append((x, slots, y)) or y)
    original = Recorder()
    return tk_combine.make_fast_reduce(original), original, launched


def _combine_call(tokens=3, slots=2, cols=8, dtype=torch.bfloat16):
    x = torch.zeros(tokens * slots, cols, dtype=dtype).view(tokens, slots, cols)
    used = torch.ones(tokens * slots, dtype=torch.bool).view(tokens, slots, 1).expand_as(x)
    return x, {"mask": used, "y": torch.empty(tokens, cols, dtype=dtype), "x_flex": None, "y_has_mx": False}


def test_the_combine_pattern_takes_the_fast_path(fast):
    fast_reduce, original, launched = fast
    x, options = _combine_call()
    out, scale = fast_reduce(x, dim=1, **options)
    assert out is options["y"] and scale is None and fast_reduce.calls == 1 and not original.calls
    ((_, slots, _),) = launched
    assert tuple(slots.shape) == (3, 2), "the [T, k, N] mask reaches the kernel as its [T, k] slots"


def _flex(**fields):
    base = {"dtype": None, "scale": None, "expected_scale": None, "actual_scale": None, "checksum_scale": None}
    return types.SimpleNamespace(**{**base, **fields})


def _postprocess(fn):
    return types.SimpleNamespace(specs=types.SimpleNamespace(fn=fn))


OTHER_CALLS = {
    "split-k reduce (dim 0)": lambda x, o: ((x, 0), o),
    "positional options": lambda x, o: ((x, 1, o.pop("mask")), o),
    "a scale": lambda x, o: ((x, 1), {**o, "scale": torch.ones(1)}),
    "micro-scaled input": lambda x, o: ((x, 1), {**o, "x_mxscale": torch.ones(1)}),
    "micro-scaled output": lambda x, o: ((x, 1), {**o, "y_has_mx": True}),
    "no y": lambda x, o: ((x, 1), {**o, "y": None}),
    "another y dtype": lambda x, o: ((x, 1), {**o, "y": o["y"].float()}),
    "a y_dtype cast": lambda x, o: ((x, 1), {**o, "y_dtype": torch.float32}),
    "an activation": lambda x, o: ((x, 1), {**o, "postprocess_fn1": _postprocess(lambda: 0)}),
    "an epilogue": lambda x, o: ((x, 1), {**o, "postprocess_fn2": _postprocess(lambda: 0)}),
    "an input flex scale": lambda x, o: ((x, 1), {**o, "x_flex": _flex(scale=torch.ones(1))}),
    "an output flex scale": lambda x, o: ((x, 1), {**o, "y_flex": _flex(actual_scale=torch.ones(1))}),
    "a flex dtype": lambda x, o: ((x, 1), {**o, "x_flex": _flex(dtype=torch.float8_e4m3fn)}),
    "a mask varying by column": lambda x, o: ((x, 1), {**o, "mask": torch.ones(x.shape, dtype=torch.bool)}),
    "strided columns": lambda x, o: ((x.transpose(0, 2), 1), {**o, "mask": None}),
}


@pytest.mark.parametrize("case", list(OTHER_CALLS))
def test_other_reduce_calls_go_to_triton_kernels_own(fast, case):
    fast_reduce, original, launched = fast
    x, options = _combine_call()
    args, kwargs = OTHER_CALLS[case](x, options)
    assert fast_reduce(*args, **kwargs) == "original"
    assert len(original.calls) == 1 and not launched and fast_reduce.calls == 0, case


def test_plain_flex_and_postprocess_objects_still_take_the_fast_path(fast):
    fast_reduce, original, _ = fast
    x, options = _combine_call()
    options.update(x_flex=_flex(), y_flex=_flex(), postprocess_fn2=_postprocess(None), mask=None)
    fast_reduce(x, dim=1, **options)
    assert fast_reduce.calls == 1 and not original.calls


def test_scoped_fast_combine_swaps_reduce_and_restores_it_on_error():
    original = Recorder()
    module = types.SimpleNamespace(reduce=original)
    with pytest.raises(RuntimeError, match="boom"), tk_combine.scoped_fast_combine(module) as installed:
        assert module.reduce is installed and installed.__wrapped__ is original
        raise RuntimeError("boom")
    assert module.reduce is original


def test_scoped_fast_combine_is_a_no_op_without_matmul_ogs(monkeypatch):
    monkeypatch.setattr(tk_combine, "matmul_ogs_module", lambda global_name: None)
    with tk_combine.scoped_fast_combine() as installed:
        assert installed is None


def test_combine_slots_refuses_mismatched_shapes():
    x = torch.zeros(3, 2, 8)
    with pytest.raises(ValueError, match=r"y \[T, N\]"):
        tk_combine.combine_slots(x, None, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="mask has shape"):
        tk_combine.combine_slots(x, torch.ones(3, 3, dtype=torch.bool), torch.zeros(3, 8))
