"""`AdaptiveMoE`: a MoE layer that replays, per batch bucket, the CUDA graph of the
kernel that measured fastest there.

    capture():  candidates = kernels available for the spec (graph-capturable ones)
                plan file valid?  -> capture only the plan's winners
                policy measure    -> capture all, time replays, keep fastest (graphs/)
                policy threshold  -> capture the seed rule's kernel per bucket
                policy fixed      -> capture one kernel everywhere
    __call__(hidden_states [T, H], router_logits [T, E]) -> [T, H]
                T = 0              -> empty [0, H]
                T <= max bucket    -> copy into static buffers, replay the bucket's graph,
                                      return a VIEW of its static output (see __call__)
                T >  max bucket    -> eager call of the plan's crossover kernel

Counters (`replay_counts`, `eager_calls`) and the capture report (`report`) are there
to read; the start-up table goes to the `moe_dispatch` logger (and `progress`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from graphs import DEFAULT_BUCKETS, BucketedGraphs, CaptureReport, validate_buckets
from moe_dispatch.backends import PreparedKernel, candidate_at, get_backend, kernel_support, make_kernel
from moe_dispatch.backends.base import check_inputs
from moe_dispatch.backends.registry import KNOWN_KERNELS
from moe_dispatch.plan import BucketChoice, Plan, PlanMetadata, load_matching_plan
from moe_dispatch.policy import DEFAULT_THRESHOLD, Policy, eager_kernel, static_choice
from moe_dispatch.profiling import NvtxRanges
from moe_dispatch.spec import MoESpec
from moe_dispatch.weights import ExpertWeights, random_inputs

logger = logging.getLogger("moe_dispatch")


def graph_candidates(spec: MoESpec) -> tuple[str, ...]:
    """Kernels that can run `spec` here and can be captured in a CUDA graph."""
    return tuple(
        name
        for name in KNOWN_KERNELS
        if getattr(get_backend(name), "graph_capturable", True) and kernel_support(name, spec)
    )


def _distributed_world(group: object) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    return 1, 0


class AdaptiveMoE:
    """A MoE layer dispatching between kernels by CUDA graph per batch bucket.

    spec, weights: the layer (weights on the CUDA device the graphs run on).
    kernels: candidate names; default every available graph-capturable kernel.
    policy: "measure" (default), "threshold" or "fixed" (see moe_dispatch.policy).
    threshold: the threshold policy's cut (tokens); fixed_kernel: the fixed policy's kernel.
    buckets: captured batch sizes (default SGLang's decode sizes 1..256).
    plan_path: JSON plan to reuse (if its metadata matches) and to write after measuring.
    group: torch.distributed group whose ranks must agree on every choice.
    """

    def __init__(
        self,
        spec: MoESpec,
        weights: ExpertWeights,
        kernels: Sequence[str] | None = None,
        policy: str | Policy = Policy.MEASURE,
        threshold: int = DEFAULT_THRESHOLD,
        fixed_kernel: str | None = None,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        plan_path: str | None = None,
        warmup_replays: int = 10,
        timed_replays: int = 100,
        keep_all: bool = False,
        group: object = None,
        progress: Callable[[str], None] | None = None,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.weights = weights
        self.policy = Policy.parse(policy)
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold <= 0:
            raise ValueError(f"threshold must be a positive int, got {threshold!r}")
        self.threshold = threshold
        self.buckets = validate_buckets(buckets)
        self.plan_path = plan_path
        self._group = group
        self._progress = progress or logger.info
        names = tuple(kernels) if kernels is not None else graph_candidates(spec)
        for name in names:
            if not getattr(get_backend(name), "graph_capturable", True):  # unknown names fail here too
                raise ValueError(f"kernel {name!r} cannot be captured in a CUDA graph; it is not a candidate")
        if not names:
            raise ValueError(f"no kernel can run {spec.describe()} here: {self._why_none()}")
        if self.policy is Policy.FIXED and fixed_kernel not in names:
            raise ValueError(f"policy 'fixed' needs fixed_kernel among {list(names)}, got {fixed_kernel!r}")
        self.fixed_kernel = fixed_kernel
        self.kernels: dict[str, PreparedKernel] = {name: make_kernel(name, spec, weights) for name in names}
        self.extra_weight_bytes = sum(k.extra_bytes for k in self.kernels.values())

        # Static inputs hold random, finite rows: padding rows route like real traffic,
        # and the timed replays run on realistic (never zero) data.
        max_bucket = self.buckets[-1]
        hidden, logits = random_inputs(spec, max_bucket, device=weights.device, seed=seed)
        self._static_hidden, self._static_logits = hidden, logits
        self._graphs = BucketedGraphs(
            {name: kernel.forward for name, kernel in self.kernels.items()},
            (hidden, logits),
            buckets=self.buckets,
            warmup_replays=warmup_replays,
            timed_replays=timed_replays,
            keep_all=keep_all,
            ranges=NvtxRanges(),
            progress=self._progress,
            group=group,
            eligible=candidate_at,
        )
        self.report: CaptureReport | None = None
        self.plan: Plan | None = None
        self.plan_reused = False
        self._eager: PreparedKernel | None = None
        self.eager_calls: Counter[str] = Counter()

    def _why_none(self) -> str:
        return "; ".join(
            f"{name}: {kernel_support(name, self.spec).reason or 'not graph-capturable'}" for name in KNOWN_KERNELS
        )

    # ---- capture -------------------------------------------------------------------------------

    def capture(self) -> CaptureReport:
        """Capture the graphs (measuring unless a matching plan or a static policy decides)."""
        world, rank = _distributed_world(self._group)
        names = tuple(self.kernels)
        metadata = PlanMetadata.current(self.spec, self.buckets, names, world)
        loaded = load_matching_plan(self.plan_path, metadata)
        if loaded is not None:
            choose = loaded.winners()
            self._progress(f"moe_dispatch: reusing plan {self.plan_path}; capturing winners only")
        else:
            choose = static_choice(self.policy, self.buckets, names, self.threshold, self.fixed_kernel)
        self._progress(
            f"moe_dispatch: capturing {len(self.buckets)} buckets x "
            f"{1 if choose else len(names)} kernel(s) for {self.spec.describe()}"
        )
        report = self._graphs.capture(choose)
        winners = report.winners()
        if loaded is not None:
            self.plan, self.plan_reused = loaded, True
        else:
            eager = eager_kernel(self.policy, winners, self.threshold, self.fixed_kernel)
            if not candidate_at(eager, self.buckets[-1] + 1):
                eager = self._unlimited_fastest(report)
            choices = tuple(
                BucketChoice(r.bucket, r.winner, {n: s.median_ms for n, s in r.timings_ms.items()})
                for r in report.results
            )
            self.plan = Plan(metadata, self.policy.value, choices, eager)
            if self.plan_path and self.policy is Policy.MEASURE and rank == 0:
                self.plan.save(self.plan_path)
                self._progress(f"moe_dispatch: plan saved to {self.plan_path}")
        self._eager = self.kernels[self.plan.eager_kernel] if self.policy is not Policy.THRESHOLD else None
        self.report = report
        logger.info("moe_dispatch capture for %s\n%s", self.spec.describe(), report.table())
        self._progress(
            f"moe_dispatch: captured in {report.seconds:.1f} s; graph pool "
            f"{report.pool_bytes_winners / 2**20:.1f} MiB (winners) / "
            f"{report.pool_bytes_all_variants / 2**20:.1f} MiB (all variants); "
            f"extra weight bytes {self.extra_weight_bytes}"
        )
        return report

    def _unlimited_fastest(self, report: CaptureReport) -> str:
        """The eager kernel when the largest bucket's winner is limited to small calls: the fastest
        kernel there without a token limit (the first such candidate when nothing was timed)."""
        unlimited = [n for n in self.kernels if get_backend(n).max_tokens is None]
        if not unlimited:
            raise ValueError(f"every candidate {list(self.kernels)} has a token limit; none can run large batches")
        timed = report.results[-1].timings_ms
        return min(unlimited, key=lambda n: (timed[n].median_ms if n in timed else float("inf"), unlimited.index(n)))

    # ---- calls ---------------------------------------------------------------------------------

    def eager_kernel_for(self, num_tokens: int) -> PreparedKernel:
        if self.policy is Policy.THRESHOLD:
            return self.kernels[eager_kernel(self.policy, {}, self.threshold, num_tokens=num_tokens)]
        if self._eager is None:
            raise RuntimeError("AdaptiveMoE: call capture() before running batches")
        return self._eager

    def __call__(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """[T, H], [T, E] -> [T, H].

        For T <= the largest bucket the result is a VIEW of the graph's static output:
        the next call overwrites it (clone it to keep it), which is what a decode step
        wants (the next layer consumes it at once). Above the largest bucket the result
        is a fresh tensor from the eager kernel.
        """
        spec = self.spec
        if (
            hidden_states.device != self._static_hidden.device
            or hidden_states.dtype != spec.dtype
            or router_logits.dtype != spec.dtype
            or hidden_states.dim() != 2
            or hidden_states.shape[1] != spec.hidden_size
            or router_logits.shape != (hidden_states.shape[0], spec.num_experts)
        ):
            check_inputs(spec, self.weights, hidden_states, router_logits, "adaptive", needs_cuda=True)
        num_tokens = hidden_states.shape[0]
        if num_tokens == 0:
            return hidden_states.new_empty((0, spec.hidden_size))
        if num_tokens <= self.buckets[-1]:
            return self._graphs.run(hidden_states, router_logits)
        kernel = self.eager_kernel_for(num_tokens)
        self.eager_calls[kernel.name] += 1
        return kernel(hidden_states, router_logits)

    def replay_bucket(self, bucket: int) -> torch.Tensor:
        """Replay `bucket`'s graph on what the static inputs hold (the SGLang-style hot path)."""
        return self._graphs.replay(bucket)

    @property
    def static_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [max_bucket, H], logits [max_bucket, E]): write rows [:T] before replay_bucket."""
        return self._static_hidden, self._static_logits

    @property
    def graphs(self) -> BucketedGraphs:
        return self._graphs

    @property
    def winners(self) -> dict[int, str]:
        return self._graphs.winners

    @property
    def replay_counts(self) -> dict[str, int]:
        return self._graphs.replay_counts
