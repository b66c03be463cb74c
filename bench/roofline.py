"""The roofline floor of one MoE call: the least time the hardware could need.

A batch of T tokens must at least (a) move the bytes of every expert it touches plus
its activations through HBM, and (b) do the two expert matmuls' flops. Each divided by
the GPU's measured ceiling gives a time; the larger is the floor, and its name says
whether the batch is memory- or compute-bound.

    bytes = moe_bytes(spec, touched)        weights of the distinct experts touched:
                                            w13 [2I, H] + w2 [H, I] in spec.dtype,
                                            plus b13 [2I] + b2 [H] in float32 when spec.bias
          + activation_bytes(spec, T)       hidden states read + output written: 2*T*H*elem
    flops = moe_flops(spec, T)              2 * T * top_k * H * 3I (w13: 2I x H, w2: H x I)

Ignored as small next to those: router logits, top-k ids and weights, intermediate
activations (they stay in cache or are a few KB), bias adds and the activation function.

The ceilings are measured once per run on the GPU (`measure_hbm_bandwidth`,
`measure_bf16_matmul_rate`); everything else here is plain arithmetic, testable on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from graphs.timing import time_callable
from moe_dispatch.spec import MoESpec

_BIAS_BYTES = 4  # SGLang keeps expert biases in float32 whatever the weight dtype


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured peaks of one GPU: device-copy bandwidth and dense bf16 matmul rate."""

    hbm_bytes_per_s: float
    bf16_flops_per_s: float

    def __post_init__(self) -> None:
        for field in ("hbm_bytes_per_s", "bf16_flops_per_s"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"Ceilings.{field} must be a positive number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Ceilings.{field} must be finite, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Floor:
    """The floor of one batch: its bytes and flops, and each over its ceiling (seconds)."""

    bytes: int
    flops: int
    memory_s: float
    compute_s: float

    def __post_init__(self) -> None:
        for field in ("bytes", "flops"):
            _check_count(f"Floor.{field}", getattr(self, field))
        for field in ("memory_s", "compute_s"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"Floor.{field} must be a finite non-negative number, got {value!r}")

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        """Which term sets the floor: "memory" or "compute" (memory on a tie)."""
        return "memory" if self.memory_s >= self.compute_s else "compute"


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_touched(spec: MoESpec, touched: int) -> None:
    _check_count("touched experts", touched)
    if touched > spec.num_experts:
        raise ValueError(f"touched experts {touched} exceeds num_experts={spec.num_experts} of {spec.name}")


def moe_bytes(spec: MoESpec, touched_experts: int) -> int:
    """Bytes of the weights (and float32 biases, when spec.bias) of `touched_experts` experts."""
    _check_touched(spec, touched_experts)
    H, I = spec.hidden_size, spec.intermediate_size
    weights = touched_experts * (2 * I * H + H * I) * spec.dtype.itemsize
    biases = touched_experts * (2 * I + H) * _BIAS_BYTES if spec.bias else 0
    return weights + biases


def activation_bytes(spec: MoESpec, num_tokens: int) -> int:
    """Bytes of the hidden states read [T, H] plus the output written [T, H], in spec.dtype."""
    _check_count("num_tokens", num_tokens)
    return 2 * num_tokens * spec.hidden_size * spec.dtype.itemsize


def moe_flops(spec: MoESpec, num_tokens: int) -> int:
    """Flops of the two expert matmuls over T tokens, each routed to top_k experts."""
    _check_count("num_tokens", num_tokens)
    H, I = spec.hidden_size, spec.intermediate_size
    return 2 * num_tokens * spec.top_k * H * 3 * I


def touched_experts(topk_ids: torch.Tensor) -> int:
    """Number of distinct expert ids in `topk_ids` (any shape, usually [T, k], integer)."""
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must hold integer expert ids, got dtype {topk_ids.dtype}")
    return int(torch.unique(topk_ids).numel())


def floor(spec: MoESpec, num_tokens: int, touched: int, ceilings: Ceilings) -> Floor:
    """The roofline floor of one call of `spec` on `num_tokens` tokens touching `touched` experts."""
    _check_count("num_tokens", num_tokens)
    _check_touched(spec, touched)
    if touched > num_tokens * spec.top_k:
        raise ValueError(
            f"touched experts {touched} exceeds num_tokens * top_k = {num_tokens} * {spec.top_k}: "
            "each token touches at most top_k experts"
        )
    if not isinstance(ceilings, Ceilings):
        raise TypeError(f"ceilings must be a Ceilings, got {type(ceilings).__name__}")
    nbytes = moe_bytes(spec, touched) + activation_bytes(spec, num_tokens)
    flops = moe_flops(spec, num_tokens)
    return Floor(
        bytes=nbytes,
        flops=flops,
        memory_s=nbytes / ceilings.hbm_bytes_per_s,
        compute_s=flops / ceilings.bf16_flops_per_s,
    )


# ---- measuring the ceilings (CUDA only) ----


def _cuda_device(device: torch.device | str, what: str) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA device, got {device} (cuda available: {torch.cuda.is_available()})")
    return device


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _median_event_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median over `repeats` of fn()'s GPU time in ms, each call bracketed by CUDA events."""
    with torch.cuda.device(device):
        return time_callable(fn, warmup=warmup, repeats=repeats).median_ms


def measure_hbm_bandwidth(device: torch.device | str, nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    Two buffers of `nbytes` (1 GiB default: far beyond L2) so every byte goes through HBM.
    """
    device = _cuda_device(device, "measure_hbm_bandwidth")
    _check_positive("nbytes", nbytes)
    _check_positive("repeats", repeats)
    src = torch.randint(1, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _median_event_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / (ms * 1e-3)


def measure_bf16_matmul_rate(device: torch.device | str, n: int = 8192, repeats: int = 20) -> float:
    """Dense bf16 [n, n] @ [n, n] matmul rate in flop/s (2*n^3 flops per matmul).

    Inputs are random normal: zeros would let the GPU draw less power and clock higher
    than it does on real data.
    """
    device = _cuda_device(device, "measure_bf16_matmul_rate")
    _check_positive("n", n)
    _check_positive("repeats", repeats)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), generator=gen, device=device, dtype=torch.bfloat16)
    b = torch.randn((n, n), generator=gen, device=device, dtype=torch.bfloat16)
    out = torch.empty((n, n), device=device, dtype=torch.bfloat16)
    ms = _median_event_ms(lambda: torch.matmul(a, b, out=out), device, repeats)
    return 2 * n**3 / (ms * 1e-3)


def measure_ceilings(device: torch.device | str) -> Ceilings:
    """Both ceilings of `device`, measured now."""
    return Ceilings(measure_hbm_bandwidth(device), measure_bf16_matmul_rate(device))
