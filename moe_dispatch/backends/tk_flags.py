"""Steering triton_kernels' matmul_ogs opt flags, per call, for transposed weight VIEWS.

Why (triton_kernels `matmul_ogs` generation, Triton 3.6, as shipped in sglang-kernel 0.4.5;
file:line below are that copy's):

- The opt flags do not look at the weight's strides. `make_default_opt_flags_nvidia`
  (matmul_ogs_details/opt_flags.py:166-291) reads dtypes, M, N, K, the routing data and
  `can_use_tma`, which is the same for a transposed view and a contiguous copy whenever
  both are TMA-compliant (tensor.py:31-48; GPT-OSS at every tp is). Views and copies get
  identical flags; what differs is how the chosen kernel reads W.
- With fewer than 2 output tiles per SM the flags pick the NON-persistent kernel
  (opt_flags.py:214-225: tiles_per_sm >= 2.0 else not persistent). Down-projection
  (w2, scattered) at GPT-OSS-120B tp=8, T tokens: M = 4T rows, N = H = 2880, so
  n_blocks(4T, 16) * cdiv(2880, 256) tiles = 48, 96, 192 for T = 1, 2, 4 on 132 SMs:
  non-persistent; 384 at T = 8: persistent. That is the T <= 4 / T >= 8 split measured.
- The non-persistent kernel `_matmul_ogs` loads W through pointers
  (`W + offs_k * stride_w_k + offs_n * stride_w_n`, masked by `offs_k < K_W - ...`;
  matmul_ogs_details/_matmul_ogs.py:307-333). On a transposed view K is the unit-stride
  axis, so loads vectorize along K only if Triton can prove alignment there. Triton
  specializes an integer argument only as "divisible by 16" (tt.divisibility=16;
  triton/backends/compiler.py, BaseBackend.get_int_specialization / parse_attr). The w2
  view at tp=8 has K_W = I = 360 and stride_w_n = I = 360: neither is a multiple of 16, so
  every W element is a separate 2-byte load (no 16-byte vectors, no cp.async pipelining),
  in 1-warp programs (compute_num_warps: max(16 * 256 // 4096, 1);
  opt_flags_nvidia.py:64-68). At tp=2 (I = 1440) and tp=4 (720) the same kernel
  vectorizes, which is why views matched copies there at every T. A contiguous copy is
  N-major (stride_w_n = 1), its K mask is per row, and it vectorizes along N.
- The persistent kernel `_p_matmul_ogs` reads W through a TMA descriptor, which takes
  the transposed view as it is (tensor.py:50-66, make_dense_tma transposes the block),
  so a view costs nothing there: from T = 8 views and copies match.

The fix: for a call whose weight view the non-persistent kernel cannot vectorize, and
whose matmul would get the non-persistent kernel, require `is_persistent=True` through
triton_kernels' own constraint mechanism (`update_opt_flags_constraints`,
opt_flags.py:300-306), only for that call, and restore the previous constraints after
it. Zero extra weight memory. The constraint covers both matmuls of the call (gate/up
and down), as triton_kernels reads one global constraint set per matmul_ogs call.

Graph capture: the flags are chosen on the host when the kernels are launched, so
capturing under the constraint captures the persistent kernel, and replays need nothing.
Threads: triton_kernels keeps its constraints in a module global; set/restore around one
call is safe for one thread issuing MoE calls (SGLang's scheduler, AdaptiveMoE), not for
two threads launching matmul_ogs at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch

R = TypeVar("R")

# Triton proves alignment of an integer kernel argument only when it is a multiple of this.
TRITON_INT_DIVISIBILITY = 16
# TMA descriptors need every stride except the unit one to be a multiple of 16 bytes.
TMA_STRIDE_BYTES = 16
# triton_kernels (3.6) goes persistent only from this many output tiles per SM.
PERSISTENT_TILES_PER_SM = 2.0
# ... and never below this many multiply-adds (m * n * k).
PERSISTENT_MIN_MNK = 131072
PERSISTENT = {"is_persistent": True}


@dataclasses.dataclass(frozen=True)
class WeightOperand:
    """One expert weight as matmul_ogs reads it: [E, K, N], strides in elements."""

    experts: int
    k: int
    n: int
    stride_e: int
    stride_k: int
    stride_n: int
    itemsize: int

    @staticmethod
    def of(weight: torch.Tensor) -> WeightOperand:
        """From a [E, K, N] tensor (a transposed view or a contiguous copy)."""
        if weight.dim() != 3:
            raise ValueError(f"expected a [E, K, N] weight, got shape {tuple(weight.shape)}")
        return WeightOperand(*weight.shape, *weight.stride(), weight.element_size())

    @property
    def k_major(self) -> bool:
        """K is the unit-stride axis (a transposed view of the [E, N, K] Triton layout)."""
        return self.stride_k == 1 and self.stride_n != 1

    def pointer_loads_vectorize(self) -> bool:
        """Whether the non-persistent kernel's pointer loads of W can be vectorized.

        Only a K-major operand is at risk: its vectors run along K, which needs both the
        per-column stride and the K bound to be provably multiples of 16 elements.
        """
        if not self.k_major:
            return True
        return self.stride_n % TRITON_INT_DIVISIBILITY == 0 and self.k % TRITON_INT_DIVISIBILITY == 0

    def tma_compliant(self) -> bool:
        """Every non-unit stride a multiple of 16 bytes (what a TMA descriptor needs)."""
        strides = (self.stride_e, self.stride_k, self.stride_n)
        if 1 not in strides:
            return False
        unit = strides.index(1)
        return all(s * self.itemsize % TMA_STRIDE_BYTES == 0 for i, s in enumerate(strides) if i != unit)


def next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_block_n(n: int) -> int:
    """triton_kernels 3.6's block_n for a bf16 GEMM of N = n (compute_block_n, no microscaling)."""
    return 256 if n > 128 else max(16, min(128, next_power_of_2(n)))


def default_is_persistent(rows: int, weight: WeightOperand, num_sms: int) -> bool:
    """Whether triton_kernels 3.6 picks the persistent kernel by itself for a ragged bf16 matmul.

    rows: M, the routed rows (tokens * top_k). Mirrors opt_flags.py:187-225 for bf16 x bf16
    without microscaling, routing data without expected tokens per expert, TMA usable.
    """
    num_experts = weight.experts
    tokens_per_expert = max(1, rows // num_experts)
    if tokens_per_expert <= 64:
        block_m = max(16, min(next_power_of_2(2 * tokens_per_expert), 64))
    else:
        block_m = max(16, min(next_power_of_2(tokens_per_expert), 128))
    block_n = default_block_n(weight.n)
    if rows <= num_experts:  # RoutingData.n_blocks, matmul_ogs.py:59-63
        grid_m = rows
    else:
        grid_m = -(-max(rows - num_experts + 1, 0) // block_m) + num_experts - 1
    tiles = grid_m * -(-weight.n // block_n)
    if rows * weight.n * weight.k < PERSISTENT_MIN_MNK:
        return False
    return tiles / num_sms >= PERSISTENT_TILES_PER_SM


@dataclasses.dataclass(frozen=True)
class Decision:
    """The opt-flag constraints one MoE call gets (empty: none), and why."""

    constraints: Mapping[str, object]
    reason: str

    def __bool__(self) -> bool:
        return bool(self.constraints)


def decide(num_tokens: int, top_k: int, w13: WeightOperand, w2: WeightOperand, num_sms: int, has_tma: bool) -> Decision:
    """What one MoE call of T = num_tokens tokens needs. Pure; CPU-testable.

    w13 [E, H, 2I] and w2 [E, I, H] as the triton_kernels runner receives them; both
    matmuls see T * top_k routed rows. has_tma: compute capability >= 9.
    """
    rows = num_tokens * top_k
    slow = [
        name
        for name, weight in (("w13", w13), ("w2", w2))
        if not weight.pointer_loads_vectorize() and not default_is_persistent(rows, weight, num_sms)
    ]
    if not slow:
        return Decision({}, "no K-major view with unaligned strides on a non-persistent matmul")
    what = f"{'/'.join(slow)} view (K-major, stride or K not a multiple of 16) on the non-persistent kernel"
    if not has_tma:
        return Decision({}, f"{what}, but no TMA on this GPU: left as is")
    if not (w13.tma_compliant() and w2.tma_compliant()):
        return Decision({}, f"{what}, but the weights are not TMA-compliant: left as is")
    return Decision(dict(PERSISTENT), f"{what} at T={num_tokens}: persistent (TMA) kernel required")


# ---- applying a decision to triton_kernels (needs the matmul_ogs generation) ---------------------


@functools.cache
def _opt_flags_module() -> object | None:
    """triton_kernels.matmul_ogs_details.opt_flags when that generation (Triton 3.6) is installed."""
    try:
        from triton_kernels.matmul_ogs_details import opt_flags
    except Exception:  # absent, broken, or the triton_kernels.matmul generation
        return None
    needed = ("update_opt_flags_constraints", "reset_opt_flags_constraints", "_opt_flags_constraints", "_opt_flags")
    return opt_flags if all(hasattr(opt_flags, name) for name in needed) else None


@functools.cache
def _device_facts(device: torch.device) -> tuple[int, bool]:
    """(SM count, has TMA) of the CUDA device the weights live on."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major >= 9


def decision_for(num_tokens: int, top_k: int, w13: torch.Tensor, w2: torch.Tensor) -> Decision:
    """`decide` for the tensors the triton_kernels runner receives (w13 [E, H, 2I], w2 [E, I, H], on CUDA).

    Cached on (T, top_k, shapes, strides, itemsize, device): an eager call pays a lookup.
    """
    if _opt_flags_module() is None:
        return Decision({}, "triton_kernels matmul_ogs generation not installed: flags left as they are")
    return _cached_decision(
        num_tokens, top_k, w13.shape, w13.stride(), w2.shape, w2.stride(), w13.element_size(), w13.device
    )


@functools.lru_cache(maxsize=4096)
def _cached_decision(
    num_tokens: int,
    top_k: int,
    w13_shape: tuple[int, ...],
    w13_stride: tuple[int, ...],
    w2_shape: tuple[int, ...],
    w2_stride: tuple[int, ...],
    itemsize: int,
    device: torch.device,
) -> Decision:
    if len(w13_shape) != 3 or len(w2_shape) != 3:
        raise ValueError(f"expected [E, K, N] weights, got shapes {tuple(w13_shape)} and {tuple(w2_shape)}")
    num_sms, has_tma = _device_facts(device)
    w13 = WeightOperand(*w13_shape, *w13_stride, itemsize)
    w2 = WeightOperand(*w2_shape, *w2_stride, itemsize)
    return decide(num_tokens, top_k, w13, w2, num_sms, has_tma)


@contextlib.contextmanager
def scoped_constraints(constraints: Mapping[str, object]) -> Iterator[bool]:
    """Add `constraints` to triton_kernels' opt-flag constraints inside the block, then restore them.

    Yields whether they were applied: not when empty, when manual opt flags are set
    (triton_kernels refuses constraints then), or when a constraint already names one of
    the keys (someone else's choice, e.g. SGLang's is_persistent=False on SM120, wins).
    """
    module = _opt_flags_module()
    if not constraints or module is None or module._opt_flags is not None:
        yield False
        return
    saved = dict(module._opt_flags_constraints)  # no public getter in this version
    if any(saved.get(key) is not None for key in constraints):
        yield False
        return
    module.update_opt_flags_constraints(dict(constraints))
    try:
        yield True
    finally:
        module.reset_opt_flags_constraints()
        if saved:
            module.update_opt_flags_constraints(saved)


_warned: set[str] = set()


def call_with_view_flags(fn: Callable[[], R], num_tokens: int, top_k: int, w13: torch.Tensor, w2: torch.Tensor) -> R:
    """Run `fn()` (one triton_kernels MoE call) under the opt-flag constraints its weights need.

    The entry point for every caller of SGLang's triton_kernels runner on weight views:
    num_tokens T rows in the call's hidden states, top_k experts per token, w13 [E, H, 2I]
    and w2 [E, I, H] exactly as passed to the runner. Without a constraint to add this
    is `fn()`. Should triton_kernels refuse the constraint anyway (InapplicableConstraint,
    raised before the refusing matmul launches), the call is repeated without it, with
    one warning per reason.
    """
    decision = decision_for(num_tokens, top_k, w13, w2)
    if not decision:
        return fn()
    inapplicable = getattr(_opt_flags_module(), "InapplicableConstraint", ())
    try:
        with scoped_constraints(decision.constraints):
            return fn()
    except inapplicable as error:
        refused = f"triton_kernels refused {dict(decision.constraints)} ({error}); running without it"
        if refused not in _warned:
            _warned.add(refused)
            warnings.warn(refused, stacklevel=2)
        return fn()
