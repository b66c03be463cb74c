"""graphs: CUDA-graph machinery for choosing, per batch size, the fastest of several callables.

Kernel-agnostic: a caller supplies named "variants" (callables over static input
tensors) and batch-size "buckets"; this package owns the rest.
Flow (`BucketedGraphs.capture`):
    capture every variant per bucket, largest bucket first, into a scratch pool (capture.py)
    -> time each graph's replays with CUDA events (timing.py)
    -> agree across ranks: element-wise MAX of the timing tables (selection.py)
    -> pick the fastest per bucket (selection.py)
    -> drop every scratch graph (the scratch pool, losers included, goes back to the device)
    -> re-capture the winners, largest first, into a fresh serving pool
    (no re-capture when every bucket is chosen, nothing measured, or with keep_all)
Serving (`BucketedGraphs.run` / `replay`): bucket = smallest captured size >= T
(buckets.py), copy inputs into the static buffers, replay that bucket's winner.
Profiler ranges are named by the caller through a `RangeNamer` (ranges.py).
"""

from graphs.bucketed import BucketedGraphs, CaptureReport, MemoryReading
from graphs.buckets import DEFAULT_BUCKETS, bucket_for, padding_rows, validate_buckets
from graphs.capture import CapturedGraph, CaptureError, capture, require_cuda
from graphs.measure import BucketResult, Measurement, TimingPlan, measure_buckets
from graphs.ranges import STAGES, RangeNamer, no_ranges
from graphs.selection import agree_across_ranks, margin, pick_fastest
from graphs.timing import ReplayStats, interleaved_order, time_callable, time_interleaved, time_replays

__all__ = [
    "DEFAULT_BUCKETS",
    "STAGES",
    "TimingPlan",
    "BucketResult",
    "BucketedGraphs",
    "CaptureError",
    "CaptureReport",
    "CapturedGraph",
    "Measurement",
    "MemoryReading",
    "RangeNamer",
    "ReplayStats",
    "agree_across_ranks",
    "bucket_for",
    "capture",
    "margin",
    "measure_buckets",
    "no_ranges",
    "padding_rows",
    "pick_fastest",
    "require_cuda",
    "interleaved_order",
    "time_callable",
    "time_interleaved",
    "time_replays",
    "validate_buckets",
]
