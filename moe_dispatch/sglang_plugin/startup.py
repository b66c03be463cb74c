"""Start-up: decide, once per model runner and before SGLang captures any CUDA graph, which kernel
every MoE call size runs; then SGLang captures its decode and prefill graphs once, as stock does.

    BEFORE ModelRunner.init_cuda_graphs      (prefill graphs, then decode graphs, follow)
      policy fixed / threshold  -> FixedRule / ThresholdRule, nothing measured
      policy measure:
        sizes = decode capture sizes + prefill capture sizes + eager sizes up to the
                chunked-prefill size (`sizes_to_measure`)
        a plan file matching this GPU, versions, layer spec, sizes and TP world (on every rank)
                                -> its SizeRule, nothing measured
        else probe.probe_sizes  -> SizeRule of the winners (agreed across TP ranks); plan saved
      log: the probe table, the rule, and one machine-readable line
          "adaptive MoE start-up: measure_s=<s> sizes=<n> source=<measured|plan|threshold|fixed>"
    AROUND FullCudaGraphBackend.replay       NVTX range "replay bs=<n> kernel=<k>"

While SGLang captures a graph of N tokens, the TopK hook asks the rule for N, so each
captured graph holds its size's winner; eager batches ask the same rule. No graph is
captured twice, so graph memory and capture time are stock's; the probe's own graphs
live in a scratch pool that is returned before SGLang's capture starts.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from moe_dispatch.plan import BucketChoice, Plan, PlanMetadata, load_matching_plan
from moe_dispatch.sglang_plugin import extras, probe, targets
from moe_dispatch.sglang_plugin.kernel_switch import SWITCH, KernelSwitch, SizeRule, static_rule

logger = logging.getLogger("moe_dispatch.sglang_plugin")

# Eager (uncaptured) call sizes are probed at powers of two from here up to the chunked-prefill size.
EAGER_PROBE_FROM = 512
MAX_PROBE_TOKENS = 16384
DEFAULT_MAX_TOKENS = 8192
_DONE = "_moe_dispatch_rule_source"  # model-runner attribute: the start-up already ran


def sizes_to_measure(
    decode_sizes: Iterable[int], prefill_sizes: Iterable[int], max_tokens: int | None
) -> tuple[int, ...]:
    """Every size the server's MoE calls will be served at, ascending, capped at MAX_PROBE_TOKENS.

    Captured decode and prefill sizes, plus powers of two from EAGER_PROBE_FROM up to
    `max_tokens` (the chunked-prefill size: no eager MoE call is larger) and `max_tokens` itself.
    """
    cap = min(max_tokens if max_tokens and max_tokens > 0 else DEFAULT_MAX_TOKENS, MAX_PROBE_TOKENS)
    sizes = {int(s) for s in (*decode_sizes, *prefill_sizes) if 0 < int(s) <= cap}
    size = EAGER_PROBE_FROM
    while size < cap:
        sizes.add(size)
        size *= 2
    sizes.add(cap)
    return tuple(sorted(sizes))


def server_sizes(server_args: Any) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    """(decode capture sizes, prefill capture sizes, chunked-prefill size) from SGLang's ServerArgs."""
    config = getattr(server_args, "cuda_graph_config", None)

    def phase_sizes(name: str) -> tuple[int, ...]:
        phase = getattr(config, name, None)
        if phase is None or getattr(phase, "backend", None) == "disabled":
            return ()
        return tuple(int(s) for s in (getattr(phase, "bs", None) or ()))

    chunked = getattr(server_args, "chunked_prefill_size", None)
    return phase_sizes("decode"), phase_sizes("prefill"), chunked if isinstance(chunked, int) else None


def startup_line(measure_s: float, sizes: int, source: str) -> str:
    """The one line the serving benchmark parses."""
    return f"adaptive MoE start-up: measure_s={measure_s:.2f} sizes={sizes} source={source}"


def plan_from_probe(result: probe.ProbeResult, metadata: PlanMetadata) -> Plan:
    choices = tuple(BucketChoice(row.size, row.winner, dict(row.times_ms)) for row in result.rows)
    return Plan(metadata, "measure", choices, choices[-1].kernel)


def _all_ranks(flag: bool, group: object) -> bool:
    if group is None:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(value.item())


def choose_rule(
    pairs: list[tuple[Any, Any]],
    sizes: tuple[int, ...],
    world_size: int,
    group: object,
    rank0: bool,
    switch: KernelSwitch = SWITCH,
    progress: Callable[[str], None] | None = None,
) -> tuple[str, float]:
    """Set `switch.rule` for policy measure (plan or probe); returns (source, measuring seconds)."""
    settings = switch.settings
    spec = switch.first_spec
    assert spec is not None
    kernels = switch.kernels
    metadata = PlanMetadata.current(spec, sizes, kernels, world_size)
    plan = load_matching_plan(settings.plan_path, metadata) if settings.plan_path else None
    if not _all_ranks(plan is not None, group):
        plan = None
    if plan is not None:
        switch.rule = SizeRule.from_winners(plan.winners(), f"plan {settings.plan_path}")
        return "plan", 0.0
    start = time.perf_counter()
    result = probe.probe_sizes(pairs, spec, sizes, switch, group=group, kernels=kernels, progress=progress)
    switch.rule = SizeRule.from_winners(result.winners(), "measured")
    if rank0:
        logger.info(probe.format_table(result, kernels))
        if settings.plan_path:
            path = plan_from_probe(result, metadata).save(os.path.expanduser(settings.plan_path))
            logger.info("adaptive MoE: plan saved to %s (a restart with it skips the measurement)", path)
    return "measured", time.perf_counter() - start


def before_init_cuda_graphs(model_runner: Any, *args: Any, **kwargs: Any) -> None:
    """Set this process's rule before SGLang captures prefill and decode graphs."""
    switch = SWITCH
    pairs = getattr(model_runner, "_moe_dispatch_pairs", None)
    if getattr(model_runner, "is_draft_worker", False) or not switch.settings.enabled or not pairs:
        return None
    if getattr(model_runner, _DONE, None) is not None:
        return None  # graphs re-captured later (e.g. after a weight update) keep the rule
    tp = model_runner.tp_group
    group = tp.cpu_group if tp.world_size > 1 else None
    rank0 = getattr(model_runner, "tp_rank", 0) == 0
    decode, prefill, chunked = server_sizes(model_runner.server_args)
    sizes = sizes_to_measure(decode, prefill, chunked)
    source, measure_s = "fixed" if switch.settings.policy == "fixed" else "threshold", 0.0
    if switch.settings.policy == "measure":
        extras.enable(switch.settings.extra_kernels, pairs, switch, rank0)
        source, measure_s = choose_rule(pairs, sizes, tp.world_size, group, rank0, switch)
    else:
        switch.rule = static_rule(switch.settings)
    setattr(model_runner, _DONE, source)
    if rank0:
        logger.info("adaptive MoE: MoE calls run %s", switch.rule.describe())
        logger.info(startup_line(measure_s, len(sizes) if source == "measured" else 0, source))
    return None


@functools.cache
def _nvtx_ranges() -> Any:
    try:
        from moe_dispatch.profiling import NvtxRanges

        return NvtxRanges()
    except Exception:  # no nvtx package: replays run without ranges
        return None


def around_full_replay(original: Callable[..., Any], backend: Any, shape_key: Any, *args: Any, **kwargs: Any) -> Any:
    """Decode replays inside an NVTX range naming the batch size and the kernel its graph holds."""
    ranges = _nvtx_ranges() if SWITCH.num_adaptive else None
    if ranges is None or not getattr(ranges, "active", True):  # no profiler attached: no range cost
        return original(backend, shape_key, *args, **kwargs)
    size = int(getattr(shape_key, "size", shape_key))
    with ranges("replay", size, SWITCH.rule.kernel_for(size)):
        return original(backend, shape_key, *args, **kwargs)


def register() -> None:
    targets.register_hook(targets.INIT_CUDA_GRAPHS, before_init_cuda_graphs, "BEFORE")
    targets.register_hook(targets.FULL_REPLAY, around_full_replay, "AROUND")
