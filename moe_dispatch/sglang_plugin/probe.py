"""Time both runners on the model's own MoE layers, inside CUDA graphs, at every size a server will run.

    sizes (decode + prefill capture sizes, eager sizes)   hidden [max, H], logits [max, E]: random
      |                                                   (realistic routing, never zeros)
      +- per kernel, a variant: for each of the first PROBE_LAYERS adaptive layers
      |      TopK(hidden, logits) -> FusedMoE(hidden.clone(), topk_output)   under SWITCH.forced(kernel)
      +- graphs.measure.measure_buckets: capture each (size, kernel) into a scratch pool,
         time the replays, MAX across TP ranks, pick the faster
      -> {size: kernel} + times; every graph and the scratch pool go back to the device

Why several layers: one layer's touched experts fit in L2 at small sizes (GPT-OSS tp=8,
1 token: 4 experts x 6 MB), so timing one layer over and over would measure a warm
cache a server never sees; four distinct layers in one graph do not fit.
Why the layer's own modules: the measured code is the code SGLang runs, with SGLang's
router, runners and weights. The layer's tensor-parallel all-reduce is switched off
while probing (`reduce_results`), so a probe graph holds no collective; it is the same
for both kernels and so cannot change the choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from graphs.measure import Measurement, TimingPlan, measure_buckets
from moe_dispatch.backends.registry import candidate_at
from moe_dispatch.sglang_plugin.kernel_switch import KERNELS, KernelSwitch
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import random_inputs

logger = logging.getLogger("moe_dispatch.sglang_plugin")

PROBE_LAYERS = 4
# Fewer timed replays for large sizes: their graphs take milliseconds and vary less.
SMALL_SIZE_TIMING = TimingPlan(warmup=3, replays=20)
LARGE_SIZE_TIMING = TimingPlan(warmup=2, replays=8, rounds=2)  # two interleaved rounds of 4
LARGE_SIZE = 1024


def timing_for(size: int) -> TimingPlan:
    return SMALL_SIZE_TIMING if size < LARGE_SIZE else LARGE_SIZE_TIMING


@dataclasses.dataclass(frozen=True)
class SizeTimes:
    """One probed size: each kernel's median ms (agreed across ranks where measured) and the winner."""

    size: int
    times_ms: dict[str, float]
    winner: str


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    rows: tuple[SizeTimes, ...]
    layers: int
    seconds: float

    def winners(self) -> dict[int, str]:
        return {row.size: row.winner for row in self.rows}


@contextlib.contextmanager
def _no_all_reduce(moes: Sequence[Any]) -> Iterator[None]:
    saved = [moe.reduce_results for moe in moes]
    try:
        for moe in moes:
            moe.reduce_results = False
        yield
    finally:
        for moe, value in zip(moes, saved, strict=True):
            moe.reduce_results = value


def make_variant(pairs: Sequence[tuple[Any, Any]], kernel: str, switch: KernelSwitch) -> Callable[..., torch.Tensor]:
    """fn(hidden [T, H], logits [T, E]) -> [T, H]: each pair's router and experts, run with `kernel`.

    The input is cloned per layer because SGLang's Triton runner may write its output in place.
    """

    def run(hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = hidden
        with switch.forced(kernel):
            for topk, moe in pairs:
                out = moe(hidden.clone(), topk(hidden, logits))
        return out

    run.__qualname__ = f"probe[{kernel}]"
    return run


def probe_sizes(
    pairs: Sequence[tuple[Any, Any]],
    spec: MoESpec,
    sizes: Sequence[int],
    switch: KernelSwitch,
    group: object = None,
    kernels: Sequence[str] = KERNELS,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
) -> ProbeResult:
    """Measure `kernels` on the first PROBE_LAYERS `pairs` at each size; collective over `group`."""
    used = tuple(pairs[:PROBE_LAYERS])
    if not used:
        raise ValueError("no adaptive MoE layer to probe")
    device = used[0][1].w13_weight.device
    hidden, logits = random_inputs(spec, max(sizes), device=device, seed=seed)
    variants = {k: make_variant(used, k, switch) for k in kernels}
    try:
        with _no_all_reduce([moe for _topk, moe in used]), torch.no_grad():
            measurement: Measurement = measure_buckets(
                variants,
                (hidden, logits),
                sorted(sizes),
                torch.cuda.graph_pool_handle(),
                torch.cuda.Stream(device=device),
                timing=timing_for,
                progress=progress,
                group=group,
                eligible=candidate_at,  # small_batch only up to its max_tokens
            )
            rows = tuple(
                SizeTimes(r.bucket, {k: s.median_ms for k, s in r.timings_ms.items()}, r.winner)
                for r in measurement.results
            )
            seconds = measurement.seconds
            del measurement  # the only references to the probe graphs: their pool goes back below
    finally:
        del hidden, logits, variants
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return ProbeResult(rows, len(used), seconds)


def format_table(result: ProbeResult, kernels: Sequence[str] = KERNELS) -> str:
    """The start-up log table: size, each kernel's us (for PROBE_LAYERS layers), winner, margin."""
    widths = {k: max(10, len(k) + 3) for k in kernels}  # "<kernel> us", two spaces apart
    name_width = max(16, *(len(k) + 2 for k in kernels))
    lines = [
        f"adaptive MoE probe: {len(result.rows)} sizes x {len(kernels)} kernels on {result.layers} layer(s) "
        f"in {result.seconds:.2f} s (median us per graph of {result.layers} layer(s), max over TP ranks)",
        f"{'tokens':>8}"
        + "".join(f"  {k + ' us':>{width}}" for k, width in widths.items())
        + f"  {'winner':<{name_width}}{'margin':>8}",
    ]
    for row in result.rows:
        cells = "".join(
            f"  {row.times_ms[k] * 1000:>{width}.1f}" if k in row.times_ms else f"  {'-':>{width}}"
            for k, width in widths.items()
        )
        others = [t for k, t in row.times_ms.items() if k != row.winner]
        gap = f"{min(others) / row.times_ms[row.winner]:>7.2f}x" if others else f"{'-':>8}"
        lines.append(f"{row.size:>8}{cells}  {row.winner:<{name_width}}{gap}")
    return "\n".join(lines)
