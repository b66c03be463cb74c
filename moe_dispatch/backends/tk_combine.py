"""A faster top-k combine for triton_kernels' matmul_ogs (Triton 3.6 generation).

After the down matmul, matmul_ogs has one row per (token, slot) in `out [T, k, H]` (routing
weights already applied) and sums the k slots of each token with `triton_kernels.reduce`:
    reduce(out, dim=1, mask=(slot used) [T, k, 1 -> H], y=output [T, H], postprocess_fn2=...)
That generic kernel tiles 64 tokens x 128 columns per program, so a decode call has few
programs (T=32, H=2880: 23) and measured 20-22 us at T <= 128 and 215 us at T=4096 for GPT-OSS
tp=8 on the H200 (bench/results/nvidia-h200/kernel-breakdown-tp8.md), up to a third of the call.

`scoped_fast_combine()` replaces matmul_ogs' `reduce` inside the block with `fast_reduce`:
the same sum, with programs of a few tokens x 512 columns, for exactly that call pattern
(dim 1, a per-(token, slot) mask or none, no scale, no micro-scaling, no flex scales, no
post-processing function, unit column strides).

The same swap takes matmul_ogs' split-K reduce: a split-K up matmul writes float32 partials
`[S, rows, 2I]` and `reduce(x, dim=0, y=[rows, I], postprocess_fn1=<fused activation>)` sums
the S slices, then applies the activation (GPT-OSS SwiGLU: interleaved gate/up pairs). Its
64 x 128 tiles give 12 programs at 32 tokens of GPT-OSS tp=8 (7 us; 10 us at 8 tokens,
kernel-breakdown-routing-tp8.md). `splitk_activation` runs the same sum in the same order and
calls triton_kernels' own activation function on each tile, with programs of a few rows.

Every other call (quantized outputs, flex scales, masks) goes to triton_kernels' own `reduce`
unchanged. Sums run in order in float32, as triton_kernels' do, then one cast. Like
`scoped_matmul_flags`, this swaps a module global for the duration of the block: for one
thread issuing MoE calls.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from moe_dispatch.backends.global_swap import swapped_global
from moe_dispatch.backends.tk_matmul_flags import matmul_ogs_module

BLOCK_N = 512  # columns per program: 16-byte loads for bf16 with 2 warps


@triton.jit
def combine_slots_kernel(
    x_ptr,  # [T, TOP_K, N] (strides given; columns contiguous)
    mask_ptr,  # [T, TOP_K] nonzero where the slot holds a row (any tensor when not HAS_MASK)
    y_ptr,  # [T, N] (columns contiguous)
    T,
    N,
    stride_xt,
    stride_xs,
    stride_mt,
    stride_ms,
    stride_yt,
    TOP_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y[t, n] = sum over slots s (in order, float32) of x[t, s, n] where mask[t, s]."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_t < T
    inside = rows[:, None] & (offs_n < N)[None, :]
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_n[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(TOP_K):
        x = tl.load(x_rows + s * stride_xs, mask=inside, other=0.0).to(tl.float32)
        if HAS_MASK:
            used = tl.load(mask_ptr + offs_t.to(tl.int64) * stride_mt + s * stride_ms, mask=rows, other=0)
            x = tl.where(used[:, None] != 0, x, 0.0)  # a where, not a product: unused rows may hold NaN
        acc += x
    y_ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=inside)


def combine_launch(num_tokens: int) -> tuple[int, int]:
    """(tokens per program, warps): one token per program for decode sizes (more programs),
    four from 512 tokens (fewer, fuller programs)."""
    return (1, 2) if num_tokens < 512 else (4, 4)


def combine_slots(x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """y [T, N] = the masked sum of x [T, k, N] over its slots (mask [T, k] or None); returns y."""
    T, top_k, N = x.shape
    if tuple(y.shape) != (T, N) or x.stride(2) != 1 or y.stride(1) != 1:
        raise ValueError(f"combine_slots: x {tuple(x.shape)} / y {tuple(y.shape)} need contiguous columns, y [T, N]")
    if mask is not None and tuple(mask.shape) != (T, top_k):
        raise ValueError(f"combine_slots: mask has shape {tuple(mask.shape)}, expected ({T}, {top_k})")
    block_t, warps = combine_launch(T)
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, BLOCK_N))
    mask_arg = mask if mask is not None else x
    mask_strides = mask.stride() if mask is not None else (0, 0)
    combine_slots_kernel[grid](
        x, mask_arg, y, T, N, x.stride(0), x.stride(1), *mask_strides, y.stride(0),
        TOP_K=top_k, HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_N=BLOCK_N, num_warps=warps,
    )  # fmt: skip
    return y


@triton.jit
def splitk_activation_kernel(
    x_ptr,  # [S, M, N] partial sums (columns contiguous)
    y_ptr,  # [M, N // REDUCTION_N] (columns contiguous)
    M,
    N,
    stride_xs,
    stride_xm,
    stride_ym,
    fn_arg0,
    fn_arg1,
    ACTIVATION: tl.constexpr,  # a jit function (tile [BLOCK_M, BLOCK_N], arg0, arg1) -> [BLOCK_M, OUT_N]
    SLICES: tl.constexpr,  # unrolled, so all slices' loads are in flight at once
    REDUCTION_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y = ACTIVATION(sum over slices s (in order, float32) of x[s])."""
    OUT_N: tl.constexpr = BLOCK_N // REDUCTION_N
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m < M
    x_tile = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_n[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SLICES):
        acc += tl.load(x_tile + s * stride_xs, mask=rows[:, None] & (offs_n < N)[None, :], other=0.0).to(tl.float32)
    out = ACTIVATION(acc, fn_arg0, fn_arg1)
    offs_o = tl.program_id(1) * OUT_N + tl.arange(0, OUT_N)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_o[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=rows[:, None] & (offs_o < N // REDUCTION_N)[None, :])


SPLITK_BLOCK_N = 128  # input columns per program (64 outputs for a pairwise activation)
MAX_SPLITK_SLICES = 16  # the slices' loads are unrolled; more go to triton_kernels' reduce


def splitk_block_m(rows: int) -> int:
    """Rows per program: the largest power of 2 <= rows / 64, within 1..8.

    On the H200 (graph replays of 2-11 slices x 32-512 rows x 720 columns, 4 warps) this was
    within 0.1 us of the best of 1..32 rows x 1..4 warps, and 1.4-1.9 us against 3.5-6.6 us for
    triton_kernels' reduce; 32 rows per program took 3-50 us (one-off probe, 2026-11-29)."""
    per_64 = rows // 64
    return min(8, 1 << (per_64.bit_length() - 1)) if per_64 else 1


def splitk_activation(x: torch.Tensor, y: torch.Tensor, activation: object, args: tuple) -> torch.Tensor:
    """y [M, N / r] = activation(sum of x [S, M, N] over S), for triton_kernels' fused activation
    specs (`activation.fn`, `.reduction_n` = r) and its two arguments; returns y."""
    S, M, N = x.shape
    r = activation.reduction_n
    if tuple(y.shape) != (M, N // r) or N % r or x.stride(2) != 1 or y.stride(1) != 1 or len(args) != 2:
        raise ValueError(f"splitk_activation: x {tuple(x.shape)} / y {tuple(y.shape)} / {len(args)} args do not fit")
    block_m = splitk_block_m(M)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, SPLITK_BLOCK_N))
    splitk_activation_kernel[grid](
        x, y, M, N, x.stride(0), x.stride(1), y.stride(0), *args,
        ACTIVATION=activation.fn, SLICES=S, REDUCTION_N=r, BLOCK_M=block_m, BLOCK_N=SPLITK_BLOCK_N, num_warps=4,
    )  # fmt: skip
    return y


def splitk_pattern(x: object, dim: object, options: dict) -> object | None:
    """The fused activation's specs and arguments (a PostprocessFn) when `fast_reduce` computes
    this split-K reduce(x, dim=0, **options) itself, else None."""
    act, y = options.get("postprocess_fn1"), options.get("y")
    if dim != 0 or options.get("mask") is not None or options.get("y_flex_saturate_inf"):
        return None
    if not _plain_numerics(options):
        return None
    specs = getattr(act, "specs", None)
    r = getattr(specs, "reduction_n", None)
    if getattr(specs, "fn", None) is None or not isinstance(r, int) or r < 1 or SPLITK_BLOCK_N % r:
        return None
    if len(getattr(act, "fn_args", ())) != 2:
        return None
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.stride(2) == 1 and x.shape[2] % r == 0):
        return None
    if x.shape[0] > MAX_SPLITK_SLICES:
        return None
    if not (isinstance(y, torch.Tensor) and y.dim() == 2 and y.stride(1) == 1):
        return None
    if tuple(y.shape) != (x.shape[1], x.shape[2] // r) or options.get("y_dtype") not in (None, y.dtype):
        return None
    return act


def _plain_numerics(options: dict) -> bool:
    """No scales, micro-scaling, flex scales or epilogue: a plain sum (and activation) in float32."""
    if any(options.get(name) is not None for name in ("scale", "x_mxscale")) or options.get("y_has_mx"):
        return False
    if not _plain_postprocess(options.get("postprocess_fn2")):
        return False
    return all(_plain_flex(options.get(name), scales) for name, scales in FLEX_SCALES.items())


def _plain_postprocess(fn: object) -> bool:
    return fn is None or getattr(getattr(fn, "specs", None), "fn", "?") is None


def _plain_flex(flex: object, scales: tuple[str, ...]) -> bool:
    return flex is None or (getattr(flex, "dtype", "?") is None and all(getattr(flex, s, "?") is None for s in scales))


FLEX_SCALES = {"x_flex": ("scale",), "y_flex": ("expected_scale", "actual_scale", "checksum_scale")}


def fast_path_mask(x: object, dim: object, options: dict) -> tuple[bool, torch.Tensor | None]:
    """(True, [T, k] mask or None) when `fast_reduce` computes reduce(x, dim, **options) itself,
    else (False, None)."""
    y = options.get("y")
    if dim != 1 or not _plain_numerics(options) or not _plain_postprocess(options.get("postprocess_fn1")):
        return False, None
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and x.stride(2) == 1 and isinstance(y, torch.Tensor)):
        return False, None
    if y.dtype != x.dtype or y.dim() != 2 or y.stride(1) != 1 or tuple(y.shape) != (x.shape[0], x.shape[2]):
        return False, None
    if options.get("y_dtype") not in (None, y.dtype):
        return False, None
    mask = options.get("mask")  # [T, k, N], broadcast over columns: its [T, k] slots reach the kernel
    if mask is None:
        return True, None
    if mask.dim() != 3 or tuple(mask.shape) != tuple(x.shape) or mask.stride(2) != 0:
        return False, None
    return True, mask[:, :, 0]


def make_fast_reduce(original):
    """triton_kernels' `reduce` (called with keywords after x, dim); the combine pattern runs
    `combine_slots`, the split-K pattern `splitk_activation`, every other call `original`."""

    @functools.wraps(original)
    def fast_reduce(x, dim, *args, **options):
        if args:
            return original(x, dim, *args, **options)
        ours, slots = fast_path_mask(x, dim, options)
        if ours:
            fast_reduce.calls += 1
            return combine_slots(x, slots, options["y"]), None
        activation = splitk_pattern(x, dim, options)
        if activation is None:
            return original(x, dim, *args, **options)
        fast_reduce.splitk_calls += 1
        return splitk_activation(x, options["y"], activation.specs, tuple(activation.fn_args)), None

    fast_reduce.calls = 0  # how many combine calls took the fast path (tests)
    fast_reduce.splitk_calls = 0  # how many split-K reduces did
    return fast_reduce


def scoped_fast_combine(module: object = None) -> contextlib.AbstractContextManager[object | None]:
    """Inside the block, matmul_ogs' top-k combine runs `combine_slots`.

    Yields the installed fast_reduce (its `calls` counts fast-path calls), or None when the
    matmul_ogs generation is not installed. `module`: the matmul_ogs module (tests).
    """
    module = module if module is not None else matmul_ogs_module("reduce")
    return swapped_global(module, "reduce", make_fast_reduce)
