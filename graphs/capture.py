"""Capture of one callable into one CUDA graph, and the CUDA availability check.

Warm-up runs on the side stream that capture uses (so lazy initialisation such as
cuBLAS handles or Triton compilation happens outside the capture), then the call is
captured into a caller-owned memory pool. Any failure becomes `CaptureError`, which
callers may treat as "this variant is unavailable here" rather than a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class CaptureError(RuntimeError):
    """A callable could not be warmed up or captured into a CUDA graph."""


@dataclass(frozen=True)
class CapturedGraph:
    """A captured graph and its static output (allocated in the graph's pool, rewritten by each replay)."""

    graph: torch.cuda.CUDAGraph
    output: torch.Tensor


def require_cuda(what: str) -> None:
    """RuntimeError naming `what` when no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU; torch.cuda.is_available() is False")


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _check_tensor(fn: Callable[..., object], out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{_name(fn)} returned {type(out).__name__}; expected a torch.Tensor")
    return out


def capture(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    pool: tuple[int, int],
    stream: torch.cuda.Stream,
    warmup: int = 2,
) -> CapturedGraph:
    """Warm up `fn(*inputs)` on `stream`, then capture one call into a graph using `pool`.

    `pool` is a `torch.cuda.graph_pool_handle()`; graphs sharing it must never replay
    concurrently. Raises CaptureError (cause chained) when warm-up or capture fails and
    TypeError when `fn` returns something other than a tensor.
    """
    require_cuda("graphs.capture")
    if warmup < 0:
        raise ValueError(f"warmup={warmup}; expected >= 0")
    try:
        current = torch.cuda.current_stream()
        # The side stream must see what the current stream wrote to the inputs, and vice versa after.
        stream.wait_stream(current)
        out: object = None
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                out = fn(*inputs)
        current.wait_stream(stream)
        torch.cuda.synchronize()
    except Exception as exc:
        raise CaptureError(f"warm-up of {_name(fn)} failed: {type(exc).__name__}: {exc}") from exc
    if warmup:
        _check_tensor(fn, out)  # a contract error, not a capture failure: TypeError, before capturing
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = fn(*inputs)
    except Exception as exc:
        raise CaptureError(f"capture of {_name(fn)} failed: {type(exc).__name__}: {exc}") from exc
    return CapturedGraph(graph=graph, output=_check_tensor(fn, out))
