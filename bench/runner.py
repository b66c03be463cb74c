"""The GPU side of `make bench`: per shard, time every kernel under CUDA-graph replay
at every batch size, plus the adaptive module's own dispatch and the static 1536 rule.

Per shard (one MoESpec):
  1. correctness: each kernel's eager output at each batch size against the torch
     reference; a kernel that fails anywhere is reported, never timed;
  2. one AdaptiveMoE with buckets = the batch sizes, keep_all=True: it captures a graph
     per (size, kernel) and times the replays (uniform random routing);
  3. per size, side by side: each kernel's graph, the adaptive module's dispatch
     (`replay_bucket`, what a caller runs, using the winner chosen in step 2) and the
     1536 rule's kernel are timed again by replay, interleaved in rounds (graphs.time_interleaved)
     so a clock that drifts over the run weighs on every column alike;
  4. a skewed-routing case at a few sizes: the same graphs on skewed router logits;
  5. optional eager timings (host launch overhead included, as the seed measured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from bench.results import BatchResult, ShardResult, Timing
from bench.roofline import Ceilings, floor, touched_experts
from graphs.timing import time_callable, time_interleaved
from moe_dispatch import ExpertWeights, make_kernel, random_inputs, reference_moe, route
from moe_dispatch.adaptive import AdaptiveMoE, graph_candidates
from moe_dispatch.backends import candidate_at
from moe_dispatch.policy import DEFAULT_THRESHOLD, threshold_kernel
from moe_dispatch.spec import MoESpec
from moe_dispatch.testing import TOLERANCES, error_stats

ADAPTIVE, RULE = "<adaptive>", "<1536 rule>"  # column keys no kernel name can take
SKEW = 6.0  # logit offset across experts: routing concentrates on the highest-index experts


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...]
    kernels: tuple[str, ...] | None = None  # None: every available graph-capturable kernel
    replays: int = 100
    warmup: int = 10
    skewed_sizes: tuple[int, ...] = (64, 1024)
    eager: bool = False
    threshold: int = DEFAULT_THRESHOLD
    seed: int = 0


def check_correctness(
    spec: MoESpec, weights: ExpertWeights, names: Sequence[str], sizes: Sequence[int], seed: int
) -> dict[str, str]:
    """kernel -> why it is not timed (its error vs the reference), for kernels that fail.

    Each kernel is prepared once for all sizes: preparing can be costly (FlashInfer's autotuner
    profiles its tactics for about 20 s per prepare)."""
    tol = TOLERANCES[spec.dtype]
    cases = []
    for T in sizes:
        x, logits = random_inputs(spec, T, device=weights.device, seed=seed + T)
        cases.append((T, x, logits, reference_moe(spec, weights, x, logits)))
    errors: dict[str, str] = {}
    for name in names:
        kernel = None
        for T, x, logits, ref in cases:
            if not candidate_at(name, T):
                continue
            try:
                if kernel is None:
                    kernel = make_kernel(name, spec, weights)
                stats = error_stats(kernel(x, logits), ref)
            except Exception as error:
                errors[name] = f"T={T}: {type(error).__name__}: {error}"
                break
            if not stats.within(tol):
                errors[name] = f"T={T}: wrong result ({stats.describe()})"
                break
        del kernel  # its workspace and weight copies go before the next kernel's
    return errors


def run_shard(
    spec: MoESpec, tp: int, ceilings: Ceilings, settings: BenchSettings, say: Callable[[str], None]
) -> ShardResult:
    device = torch.device("cuda")
    sizes = settings.batch_sizes
    weights = ExpertWeights.random(spec, device=device, seed=settings.seed)
    names = settings.kernels or graph_candidates(spec)
    say(f"[{spec.name}] checking {', '.join(names)} against the reference at {len(sizes)} batch sizes")
    errors = check_correctness(spec, weights, names, sizes, settings.seed)
    for name, why in errors.items():
        say(f"[{spec.name}] {name} NOT timed: {why}")
    good = tuple(n for n in names if n not in errors)
    if not good:
        raise RuntimeError(f"no kernel passed the correctness check for {spec.describe()}: {errors}")

    say(f"[{spec.name}] capturing and timing {len(good)} kernel(s) x {len(sizes)} batch sizes")
    moe = AdaptiveMoE(
        spec,
        weights,
        kernels=good,
        buckets=sizes,
        warmup_replays=settings.warmup,
        timed_replays=settings.replays,
        keep_all=True,
        progress=say,
        seed=settings.seed,
    )
    moe.capture()
    hidden, logits = moe.static_inputs
    uniform_hidden, uniform_logits = hidden.clone(), logits.clone()

    def timed(fn: Callable[[], object]) -> Timing:
        return Timing.from_stats(time_callable(fn, warmup=settings.warmup, repeats=settings.replays))

    batches = []
    for T in sizes:
        rule = threshold_kernel(T, settings.threshold)
        rule_kernel = rule if rule in good else None
        for routing in ("uniform", "skewed") if T in settings.skewed_sizes else ("uniform",):
            if routing == "skewed":
                x, lg = random_inputs(spec, T, device=device, seed=settings.seed + 7, skew=SKEW)
                hidden[:T].copy_(x)
                logits[:T].copy_(lg)
            else:  # the uniform random rows the capture timed on
                hidden.copy_(uniform_hidden)
                logits.copy_(uniform_logits)
                x, lg = hidden[:T].clone(), logits[:T].clone()
            lg_rows = logits[:T]
            # Every column is timed here, in one pass, the same way (the capture's own timings
            # chose the winners; re-timing side by side keeps clock drift out of the comparison).
            columns = {n: partial(moe.graphs.replay_variant, T, n) for n in good if candidate_at(n, T)}
            columns[ADAPTIVE] = partial(moe.replay_bucket, T)
            if rule_kernel:
                columns[RULE] = partial(moe.graphs.replay_variant, T, rule_kernel)
            stats = time_interleaved(columns, warmup=settings.warmup, repeats=settings.replays)
            timings = {name: Timing.from_stats(s) for name, s in stats.items()}
            adaptive, static_rule = timings.pop(ADAPTIVE), timings.pop(RULE, None)
            kernels = timings
            eager = {}
            if settings.eager:
                eager = {n: timed(partial(moe.kernels[n], x, lg)) for n in good if candidate_at(n, T)}
            touched = touched_experts(route(lg_rows, spec.top_k, spec.routing)[1])
            batch = BatchResult(
                num_tokens=T,
                routing=routing,
                touched_experts=touched,
                kernels=kernels,
                eager=eager,
                adaptive=adaptive,
                adaptive_kernel=moe.winners[T],
                static_rule=static_rule,
                static_rule_kernel=rule_kernel,
                floor=floor(spec, T, touched, ceilings),
                errors=dict(errors),
            )
            batches.append(batch)
            say(
                f"[{spec.name}] T={T:5d} {routing:7s} "
                + " ".join(f"{n}={t.median_ms * 1e3:8.1f}us" for n, t in kernels.items())
                + f" adaptive={adaptive.median_ms * 1e3:8.1f}us ({moe.winners[T]})"
            )
    return ShardResult(spec_json=spec.to_json(), tp=tp, batches=tuple(batches))
