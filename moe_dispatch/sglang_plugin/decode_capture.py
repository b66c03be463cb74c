"""Decode CUDA graphs captured once per kernel, timed, and the faster one kept, per batch size.

Hooks (scheduler side, adaptive MoE on), following docs/sglang-internals.md plan (c):

    AROUND DecodeCudaGraphRunner.capture            open a MultiKernelCapture for the target model's
      |                                             runner (draft runners pass through); after the stock
      |                                             capture returns (custom all-reduce buffers registered):
      |                                             select() = time, agree across TP ranks, keep winners;
      |                                             save the plan (rank 0), log the start-up table
      +- AROUND DecodeCudaGraphRunner.capture_one_shape   marks "inside a decode shape" (or, for a
      |                                                   non-full backend, forces the static choice)
          +- AROUND FullCudaGraphBackend.capture_one      capture once per candidate kernel under
                                                          SWITCH.forced(kernel); extra graphs wait
                                                          in a side table keyed by the ShapeKey
    AROUND FullCudaGraphBackend.replay                    NVTX range "replay bs=<n> kernel=<k>"

Which kernels a shape is captured with (`MultiKernelCapture.kernels_for`): a valid plan's
winner; else policy "threshold": threshold_kernel(bs); else (policy "measure") both. The
winner is installed under SGLang's own ShapeKey, so replay needs no hook beyond NVTX.

Timing uses a FIXED number of `backend.replay` calls per variant, in the same order on
every rank (the graphs hold collectives), then `graphs.selection.agree_across_ranks` (MAX
over the TP CPU group) so every rank keeps the same winner.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from graphs.selection import agree_across_ranks, margin, pick_fastest
from moe_dispatch.plan import BucketChoice, Plan, PlanMetadata, load_matching_plan
from moe_dispatch.policy import DEFAULT_THRESHOLD, Policy, eager_kernel, threshold_kernel
from moe_dispatch.sglang_plugin import targets
from moe_dispatch.sglang_plugin.kernel_switch import KERNELS, SWITCH, EagerRule, KernelSwitch, check_kernel

logger = logging.getLogger("moe_dispatch.sglang_plugin")

DEFAULT_WARMUP_REPLAYS = 3
DEFAULT_TIMED_REPLAYS = 20
_KERNEL_MAP = "_moe_dispatch_kernels"  # backend attribute: ShapeKey -> installed kernel (NVTX names)


def bucket_of(key: Any) -> int:
    """The batch size a graph key stands for (ShapeKey.size; plain ints accepted for tests)."""
    return int(getattr(key, "size", key))


def _key_order(key: Any) -> tuple[int, str]:
    return bucket_of(key), repr(key)  # same order on every rank


def _key_label(key: Any) -> str:
    extras = [str(v) for v in (getattr(key, "stream_idx", None), getattr(key, "variant_label", None)) if v is not None]
    return f"{bucket_of(key)}" + (f" ({','.join(extras)})" if extras else "")


# --- report -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeRow:
    """One captured decode shape: its agreed median replay times, the kept kernel, capture seconds."""

    key: Any
    times_ms: dict[str, float]  # empty when only one kernel was captured
    winner: str
    margin: float
    capture_s: dict[str, float]

    @property
    def bucket(self) -> int:
        return bucket_of(self.key)


@dataclasses.dataclass(frozen=True)
class CaptureReport:
    """What one decode-graph capture chose. policy: "measure", "threshold" or "plan"."""

    policy: str
    kernels: tuple[str, ...]
    rows: tuple[ShapeRow, ...]
    measure_s: float = 0.0
    timed_replays: int = DEFAULT_TIMED_REPLAYS

    @property
    def measured(self) -> bool:
        return any(row.times_ms for row in self.rows)

    @property
    def capture_s_all(self) -> float:
        return sum(sum(row.capture_s.values()) for row in self.rows)

    @property
    def capture_s_installed(self) -> float:
        """Capture seconds of the kept kernels alone: what a single-kernel capture would have cost."""
        return sum(row.capture_s.get(row.winner, 0.0) for row in self.rows)

    def winners(self) -> dict[int, str]:
        """Bucket -> kept kernel (the first key of a bucket when variants share one)."""
        out: dict[int, str] = {}
        for row in sorted(self.rows, key=lambda r: _key_order(r.key)):
            out.setdefault(row.bucket, row.winner)
        return out


def format_report(report: CaptureReport, extra_weight_bytes: int | None = None, rule: EagerRule | None = None) -> str:
    """The start-up log: the table (bs, each kernel's median us, winner, margin), then the overheads."""
    lines = [
        f"adaptive MoE decode graphs: policy {report.policy}, {len(report.rows)} shape(s)"
        + (f", {report.timed_replays} timed replays per kernel" if report.measured else "")
    ]
    header = f"{'bs':>10}" + "".join(f"{k + ' us':>20}" for k in report.kernels) + f"  {'winner':<16}{'margin':>8}"
    lines.append(header)
    for row in sorted(report.rows, key=lambda r: _key_order(r.key)):
        cells = "".join(
            f"{row.times_ms[k] * 1000:>20.1f}" if k in row.times_ms else f"{'-':>20}" for k in report.kernels
        )
        gap = f"{row.margin:>7.2f}x" if row.times_ms else f"{'-':>8}"
        lines.append(f"{_key_label(row.key):>10}{cells}  {row.winner:<16}{gap}")
    extra = report.capture_s_all - report.capture_s_installed
    lines.append(
        f"capture time: {report.capture_s_all:.2f} s for every captured variant vs "
        f"{report.capture_s_installed:.2f} s for the kept kernels alone (+{extra:.2f} s); "
        f"measuring: {report.measure_s:.2f} s"
    )
    if rule is not None:
        lines.append(f"eager MoE calls (prefill, batches above the captured sizes): {rule.describe()}")
    if extra_weight_bytes is not None:
        lines.append(f"extra MoE weight memory: {extra_weight_bytes} bytes per GPU")
    return "\n".join(lines)


def plan_from_report(report: CaptureReport, metadata: PlanMetadata) -> Plan:
    """A plan file for `metadata.buckets` from a measured report (ValueError if a bucket is missing)."""
    winners = report.winners()
    times = {}
    for row in sorted(report.rows, key=lambda r: _key_order(r.key)):
        times.setdefault(row.bucket, dict(row.times_ms))
    missing = [b for b in metadata.buckets if b not in winners]
    if missing:
        raise ValueError(f"report has no row for bucket(s) {missing} of the plan's buckets {metadata.buckets}")
    choices = tuple(BucketChoice(b, winners[b], times[b]) for b in metadata.buckets)
    plan_winners = {c.bucket: c.kernel for c in choices}
    return Plan(metadata, report.policy, choices, eager_kernel(Policy.MEASURE, plan_winners))


# --- the kernel-agnostic core -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Variant:
    graph: Any  # torch.cuda.CUDAGraph
    output: Any
    capture_s: float


def cuda_median_ms(warmup: int, repeats: int) -> Callable[[Callable[[], object]], float]:
    """A timer: median ms of `repeats` calls after `warmup`, one CUDA event pair per call."""
    from graphs.timing import time_callable

    return lambda fn: time_callable(fn, warmup=warmup, repeats=repeats).median_ms


class MultiKernelCapture:
    """Capture each decode shape once per candidate kernel into a graph backend, then keep the fastest.

    backend: SGLang's FullCudaGraphBackend (or anything with `_graphs`/`_outputs` dicts keyed
        by shape key and `replay(key, batch)`); the winner ends up there under the stock key.
    kernels: candidates, timed in this order; policy: "measure" or "threshold".
    plan_choice: bucket -> kernel from a valid plan; those buckets are captured once.
    group: torch.distributed group (SGLang's TP CPU group) whose ranks must agree; None = one rank.
    timer: fn -> ms for one variant (default: CUDA events over `timed_replays` replays).
    """

    def __init__(
        self,
        backend: Any,
        kernels: Sequence[str] = KERNELS,
        policy: str = "measure",
        plan_choice: Mapping[int, str] | None = None,
        threshold: int = DEFAULT_THRESHOLD,
        timed_replays: int = DEFAULT_TIMED_REPLAYS,
        warmup_replays: int = DEFAULT_WARMUP_REPLAYS,
        group: object = None,
        switch: KernelSwitch = SWITCH,
        timer: Callable[[Callable[[], object]], float] | None = None,
    ) -> None:
        for name in ("_graphs", "_outputs"):
            if not isinstance(getattr(backend, name, None), dict):
                raise TypeError(f"{type(backend).__name__} has no dict {name}; the graph backend changed")
        self.kernels = tuple(check_kernel(k) for k in kernels)
        if not self.kernels or len(set(self.kernels)) != len(self.kernels):
            raise ValueError(f"kernels must be distinct and non-empty, got {kernels!r}")
        if policy not in ("measure", "threshold"):
            raise ValueError(f"policy must be 'measure' or 'threshold', got {policy!r}")
        if timed_replays < 1 or warmup_replays < 0:
            raise ValueError(f"need timed_replays >= 1 and warmup_replays >= 0, got {timed_replays}, {warmup_replays}")
        self.backend = backend
        self.policy = policy
        self.plan_choice = dict(plan_choice) if plan_choice else None
        for bucket, kernel in (self.plan_choice or {}).items():
            if kernel not in self.kernels:
                raise ValueError(f"plan chooses {kernel!r} for bs={bucket}, not among {self.kernels}")
        self.threshold = threshold
        self.timed_replays = timed_replays
        self.group = group
        self.switch = switch
        self._timer = timer or cuda_median_ms(warmup_replays, timed_replays)
        self._variants: dict[Any, dict[str, _Variant]] = {}
        self.active_bucket: int | None = None  # set by the capture_one_shape hook
        if not isinstance(getattr(backend, _KERNEL_MAP, None), dict):
            setattr(backend, _KERNEL_MAP, {})

    @property
    def label(self) -> str:
        return "plan" if self.plan_choice else self.policy

    def static_kernel(self, bucket: int) -> str:
        """The one kernel for `bucket` without measuring: the plan's, else the threshold rule's."""
        if self.plan_choice and bucket in self.plan_choice:
            return self.plan_choice[bucket]
        return threshold_kernel(bucket, self.threshold)

    def kernels_for(self, bucket: int) -> tuple[str, ...]:
        if (self.plan_choice and bucket in self.plan_choice) or self.policy == "threshold":
            return (self.static_kernel(bucket),)
        return self.kernels

    def capture_one(
        self, original: Callable[..., Any], backend: Any, shape_key: Any, forward_fn: Callable[[], Any], *a, **kw
    ) -> None:
        """Call the backend's stock `capture_one` once per candidate kernel; one variant stays installed."""
        variants: dict[str, _Variant] = {}
        for kernel in self.kernels_for(bucket_of(shape_key)):
            start = time.perf_counter()
            with self.switch.forced(kernel):
                original(backend, shape_key, forward_fn, *a, **kw)
            elapsed = time.perf_counter() - start
            variants[kernel] = _Variant(backend._graphs.pop(shape_key), backend._outputs.pop(shape_key), elapsed)
        self._variants[shape_key] = variants
        self._install(shape_key, next(iter(variants)))

    def _install(self, key: Any, kernel: str) -> None:
        variant = self._variants[key][kernel]
        self.backend._graphs[key] = variant.graph
        self.backend._outputs[key] = variant.output
        getattr(self.backend, _KERNEL_MAP)[key] = kernel

    def _barrier(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.group is not None:
            torch.distributed.barrier(group=self.group)

    def select(self) -> CaptureReport:
        """Time every multi-variant shape, agree across ranks, keep each winner, release the rest.

        Collective when `group` is set: every rank must call it after capturing the same shapes.
        """
        start = time.perf_counter()
        keys = sorted(self._variants, key=_key_order)
        measured = [k for k in keys if len(self._variants[k]) > 1]
        table: dict[int, dict[str, float]] = {}
        if measured:
            self._barrier()
            for index, key in enumerate(measured):
                row = {}
                for kernel in self.kernels:
                    self._install(key, kernel)
                    row[kernel] = float(self._timer(functools.partial(self.backend.replay, key, None)))
                table[index] = row
            if self.group is not None:
                table = agree_across_ranks(table, self.kernels, self.group)
        rows = []
        for key in keys:
            variants = self._variants[key]
            times = table.get(measured.index(key), {}) if key in measured else {}
            winner = pick_fastest(times) if times else next(iter(variants))
            self._install(key, winner)
            for kernel, variant in variants.items():
                if kernel != winner and hasattr(variant.graph, "reset"):
                    variant.graph.reset()  # frees the loser's graph now, not at garbage collection
            rows.append(
                ShapeRow(
                    key=key,
                    times_ms=times,
                    winner=winner,
                    margin=margin(times, winner) if times else 1.0,
                    capture_s={k: v.capture_s for k, v in variants.items()},
                )
            )
        self._variants.clear()
        return CaptureReport(self.label, self.kernels, tuple(rows), time.perf_counter() - start, self.timed_replays)

    def installed_kernel(self, key: Any) -> str | None:
        return getattr(self.backend, _KERNEL_MAP).get(key)


# --- SGLang glue ---------------------------------------------------------------------------------


class _ActiveCapture:
    """The decode-graph capture in progress in this process (one at a time), for the inner hooks."""

    def __init__(self) -> None:
        self.session: MultiKernelCapture | None = None
        self.runner: Any = None


_ACTIVE = _ActiveCapture()


def _all_ranks(flag: bool, group: object) -> bool:
    if group is None:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(value.item())


def _is_full_backend(backend: Any) -> bool:
    from sglang.srt.model_executor.runner_backend.full_cuda_graph_backend import FullCudaGraphBackend

    return isinstance(backend, FullCudaGraphBackend)


def _plan_metadata(buckets: tuple[int, ...], world_size: int, switch: KernelSwitch) -> PlanMetadata | None:
    if switch.first_spec is None:
        return None
    return PlanMetadata.current(switch.first_spec, buckets, KERNELS, world_size)


def start_session(runner: Any, switch: KernelSwitch = SWITCH) -> tuple[MultiKernelCapture, PlanMetadata | None]:
    """A MultiKernelCapture for this decode runner, using a valid plan file when every rank has one."""
    settings = switch.settings
    tp = runner.model_runner.tp_group
    group = tp.cpu_group if tp.world_size > 1 else None
    buckets = tuple(sorted({int(b) for b in runner.capture_bs}))
    metadata = _plan_metadata(buckets, tp.world_size, switch)
    plan = load_matching_plan(settings.plan_path, metadata) if (settings.plan_path and metadata) else None
    if not _all_ranks(plan is not None, group):
        plan = None
    if plan is not None:
        switch.rule = EagerRule.from_winners(plan.winners(), settings.batch_threshold, f"plan {settings.plan_path}")
    session = MultiKernelCapture(
        runner.backend,
        policy=settings.policy,
        plan_choice=plan.winners() if plan else None,
        threshold=settings.batch_threshold,
        group=group,
        switch=switch,
    )
    return session, metadata


def finish_session(
    runner: Any, session: MultiKernelCapture, metadata: PlanMetadata | None, switch: KernelSwitch = SWITCH
) -> CaptureReport:
    report = session.select()
    settings = switch.settings
    rank0 = getattr(runner.model_runner, "tp_rank", 0) == 0
    if report.measured and session.plan_choice is None:
        switch.rule = EagerRule.from_winners(report.winners(), settings.batch_threshold, "measured")
        if settings.plan_path and metadata is not None and rank0:
            path = plan_from_report(report, metadata).save(os.path.expanduser(settings.plan_path))
            logger.info("adaptive MoE: plan saved to %s (restarts capture only the winners)", path)
    if rank0:
        pairing = getattr(runner.model_runner, "_moe_dispatch_pairing", None)
        if not _is_full_backend(runner.backend):
            logger.info(
                "adaptive MoE: decode graph backend %s is not measured; captured the plan/threshold choice",
                type(runner.backend).__name__,
            )
        logger.info(format_report(report, getattr(pairing, "extra_bytes", None), switch.rule))
    return report


def _wants_adaptive(runner: Any, switch: KernelSwitch) -> bool:
    model_runner = runner.model_runner
    return switch.settings.enabled and switch.num_adaptive > 0 and not getattr(model_runner, "is_draft_worker", False)


def around_decode_capture(original: Callable[..., Any], runner: Any, *args: Any, **kwargs: Any) -> Any:
    if _ACTIVE.session is not None or not _wants_adaptive(runner, SWITCH):
        return original(runner, *args, **kwargs)
    session, metadata = start_session(runner)
    _ACTIVE.session, _ACTIVE.runner = session, runner
    try:
        result = original(runner, *args, **kwargs)
    finally:
        _ACTIVE.session, _ACTIVE.runner = None, None
    # After the stock capture returned: custom all-reduce buffers are registered, replay is safe.
    finish_session(runner, session, metadata)
    return result


def around_capture_one_shape(
    original: Callable[..., Any],
    runner: Any,
    size: int,
    forward: Callable[..., Any],
    stream_idx: int | None = None,
    variant_label: str | None = None,
) -> Any:
    session = _ACTIVE.session
    if session is None or _ACTIVE.runner is not runner:
        return original(runner, size, forward, stream_idx, variant_label)
    if session.backend is runner.backend and _is_full_backend(runner.backend):
        session.active_bucket = size
        try:
            return original(runner, size, forward, stream_idx, variant_label)
        finally:
            session.active_bucket = None
    with SWITCH.forced(session.static_kernel(size)):  # a backend we cannot measure: one static choice
        return original(runner, size, forward, stream_idx, variant_label)


def around_full_capture_one(
    original: Callable[..., Any],
    backend: Any,
    shape_key: Any,
    forward_fn: Callable[[], Any],
    capture_inputs: Any = None,
    post_warmup_hook: Callable[[], None] | None = None,
) -> Any:
    session = _ACTIVE.session
    if session is None or session.backend is not backend or session.active_bucket is None:
        return original(
            backend, shape_key, forward_fn, capture_inputs=capture_inputs, post_warmup_hook=post_warmup_hook
        )
    return session.capture_one(
        original, backend, shape_key, forward_fn, capture_inputs=capture_inputs, post_warmup_hook=post_warmup_hook
    )


@functools.cache
def _nvtx_ranges() -> Any:
    try:
        from moe_dispatch.profiling import NvtxRanges

        return NvtxRanges()
    except Exception:  # no nvtx package: replays run without ranges
        return None


def around_full_replay(original: Callable[..., Any], backend: Any, shape_key: Any, *args: Any, **kwargs: Any) -> Any:
    kernels = getattr(backend, _KERNEL_MAP, None)
    kernel = kernels.get(shape_key) if kernels else None
    ranges = _nvtx_ranges() if kernel is not None else None
    if ranges is None:
        return original(backend, shape_key, *args, **kwargs)
    with ranges("replay", bucket_of(shape_key), kernel):
        return original(backend, shape_key, *args, **kwargs)


def register() -> None:
    targets.register_hook(targets.DECODE_CAPTURE, around_decode_capture, "AROUND")
    targets.register_hook(targets.DECODE_CAPTURE_ONE_SHAPE, around_capture_one_shape, "AROUND")
    targets.register_hook(targets.FULL_CAPTURE_ONE, around_full_capture_one, "AROUND")
    targets.register_hook(targets.FULL_REPLAY, around_full_replay, "AROUND")
