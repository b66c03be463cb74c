"""Winner selection: a pure function of measured times, plus the cross-rank agreement on those times.

Under tensor parallelism every rank must replay the same variant at a given bucket
(a collective inside one variant would otherwise wait for a peer running another).
Ranks measure independently, so `agree_across_ranks` replaces each rank's table by
the element-wise MAX over ranks: every rank then sees identical numbers and picks the
same winner, and MAX is the right reduction because the slowest rank bounds the layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist


def pick_fastest(timings: Mapping[str, float]) -> str:
    """Name with the lowest time; ties go to the alphabetically first name, so every rank agrees."""
    if not timings:
        raise ValueError("timings is empty; expected at least one variant -> time")
    nan = sorted(name for name, t in timings.items() if math.isnan(t))
    if nan:
        raise ValueError(f"timings for {nan} are NaN; expected numbers")
    return min(timings, key=lambda name: (timings[name], name))


def margin(timings: Mapping[str, float], winner: str) -> float:
    """Runner-up time / winner time: how much slower the best alternative is (>= 1.0 for the fastest).

    1.0 when `winner` is the only variant (no alternative, so no evidence of a gap).
    A zero winner time gives inf (or 1.0 when the runner-up is also zero).
    """
    if winner not in timings:
        raise ValueError(f"winner {winner!r} is not among the timed variants {sorted(timings)}")
    others = [t for name, t in timings.items() if name != winner]
    if not others:
        return 1.0
    best, runner_up = timings[winner], min(others)
    if best == 0:
        return 1.0 if runner_up == 0 else math.inf
    return runner_up / best


def _reduce_device(group: object) -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and a CPU leg of a mixed backend) takes CPU tensors.
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_same_layout(buckets: list[int], variants: list[str], group: object) -> None:
    """RuntimeError on every rank when any rank has other buckets or variant names."""
    layouts: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, (buckets, variants), group=group)
    for rank, layout in enumerate(layouts):
        assert isinstance(layout, tuple)
        other_buckets, other_variants = layout
        if other_buckets == buckets and other_variants == variants:
            continue
        diffs = []
        if other_buckets != buckets:
            diffs.append(f"buckets {other_buckets} vs this rank's {buckets}")
        if other_variants != variants:
            diffs.append(f"variants {other_variants} vs this rank's {variants}")
        raise RuntimeError(f"ranks disagree on what was measured: rank {rank} has " + " and ".join(diffs))


def agree_across_ranks(
    table: Mapping[int, Mapping[str, float]],
    variants: Sequence[str],
    group: object = None,
) -> dict[int, dict[str, float]]:
    """Per-entry MAX of `table` ({bucket: {variant: ms}}) over the ranks of `group`.

    A variant missing on any rank (e.g. its capture failed there) is missing from the
    result on every rank, so no rank can pick a variant another rank lacks. A bucket
    stays in the result even if it ends up with no variant. Without an initialized
    torch.distributed, returns a copy of `table`. Collective: every rank of `group`
    must call it with the same buckets and variant names (RuntimeError otherwise).
    Argument errors (ValueError) are raised before any collective, so they must be
    the same on every rank or the others wait in the collective.
    """
    names = sorted(variants)
    if len(set(names)) != len(names):
        raise ValueError(f"variants {list(variants)} hold duplicate names; expected unique names")
    for bucket, row in table.items():
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ValueError(f"bucket {bucket} times variants {unknown} that are not in variants {names}")
    buckets = sorted(table)
    if not (dist.is_available() and dist.is_initialized()):
        return {b: dict(table[b]) for b in buckets}

    _check_same_layout(buckets, names, group)
    col = {name: j for j, name in enumerate(names)}
    # float64 so times survive the round trip exactly; +inf marks "not measured here".
    grid = torch.full((len(buckets), len(names)), math.inf, dtype=torch.float64)
    for i, b in enumerate(buckets):
        for name, ms in table[b].items():
            grid[i, col[name]] = float(ms)
    if grid.numel():  # the layouts match, so every rank skips (or not) alike
        grid = grid.to(_reduce_device(group))
        dist.all_reduce(grid, op=dist.ReduceOp.MAX, group=group)
    rows = grid.cpu().tolist()
    return {b: _finite(names, row) for b, row in zip(buckets, rows, strict=True)}


def _finite(names: list[str], row: list[float]) -> dict[str, float]:
    return {name: ms for name, ms in zip(names, row, strict=True) if not math.isinf(ms)}
