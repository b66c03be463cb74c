"""Which kernel an adaptive MoE layer runs for the call at hand, per process.

One `KernelSwitch` per process (`SWITCH`), read by the TopK hook on every call of an
adaptive layer:

    forced kernel set (decode-graph capture, tests)  -> that kernel
    otherwise (eager: prefill, decode above the captured sizes)
                                                      -> EagerRule.kernel_for(num_tokens)

`EagerRule` is the plan's measured crossover when there is one (a plan file, or this
process's own decode-graph measurement), else the settings' threshold. The switch also
holds the set of TopK modules that are adaptive (paired with an unquantized FusedMoE);
every other TopK runs stock. Pure Python, no SGLang: the hooks translate kernel names to
SGLang's TopK output formats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator, Mapping

from moe_dispatch.policy import (
    DEFAULT_THRESHOLD,
    LARGE_BATCH_KERNEL,
    SMALL_BATCH_KERNEL,
    crossover_from_winners,
    threshold_kernel,
)
from moe_dispatch.sglang_plugin.settings import AdaptiveMoESettings
from moe_dispatch.spec import MoESpec

# The two runners, in the names plans and policies use.
KERNELS: tuple[str, ...] = (SMALL_BATCH_KERNEL, LARGE_BATCH_KERNEL)  # ("triton", "triton_kernels")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    return kernel


@dataclasses.dataclass(frozen=True)
class EagerRule:
    """The kernel for a MoE call that is not replayed from a decode graph.

    threshold: tokens at and above which triton_kernels runs when there is no crossover.
    crossover: the measured one (tokens at and above which triton_kernels won), or None.
    source: where the crossover came from ("threshold", "plan <path>", "measured").
    """

    threshold: int = DEFAULT_THRESHOLD
    crossover: int | None = None
    source: str = "threshold"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold <= 0:
            raise ValueError(f"threshold must be a positive int, got {self.threshold!r}")
        if self.crossover is not None and (not isinstance(self.crossover, int) or self.crossover <= 0):
            raise ValueError(f"crossover must be a positive int or None, got {self.crossover!r}")

    def kernel_for(self, num_tokens: int) -> str:
        if self.crossover is not None:
            return LARGE_BATCH_KERNEL if num_tokens >= self.crossover else SMALL_BATCH_KERNEL
        return threshold_kernel(num_tokens, self.threshold)

    @staticmethod
    def from_winners(winners: Mapping[int, str], threshold: int, source: str) -> EagerRule:
        """The crossover of measured/planned winners; the threshold rule when they show none."""
        crossover = crossover_from_winners(winners)
        if crossover is None:
            return EagerRule(threshold, None, "threshold")
        return EagerRule(threshold, crossover, source)

    def describe(self) -> str:
        if self.crossover is None:
            return f"triton_kernels from {self.threshold} tokens (threshold)"
        return f"triton_kernels from {self.crossover} tokens ({self.source} crossover)"


class KernelSwitch:
    """Per-process switch state: settings, forced override, eager rule, adaptive TopKs."""

    def __init__(self, settings: AdaptiveMoESettings | None = None) -> None:
        self.settings = settings or AdaptiveMoESettings()
        self.rule = EagerRule(self.settings.batch_threshold)
        self._forced: str | None = None
        # Weak: a model that is dropped (tests, weight reload) must not be kept alive here.
        self._adaptive: weakref.WeakSet[object] = weakref.WeakSet()
        # Spec of the first adaptive layer: keys the plan file (layers of one model share it).
        self.first_spec: MoESpec | None = None

    def configure(self, settings: AdaptiveMoESettings) -> None:
        self.settings = settings
        self.rule = EagerRule(settings.batch_threshold)

    @property
    def forced_kernel(self) -> str | None:
        return self._forced

    @contextlib.contextmanager
    def forced(self, kernel: str) -> Iterator[None]:
        """Every adaptive layer runs `kernel` inside the block (nesting restores the outer one)."""
        check_kernel(kernel)
        previous, self._forced = self._forced, kernel
        try:
            yield
        finally:
            self._forced = previous

    def kernel_for(self, num_tokens: int) -> str:
        """The forced kernel if one is set, else the eager rule's choice for `num_tokens`."""
        return self._forced if self._forced is not None else self.rule.kernel_for(num_tokens)

    def add_topk(self, topk: object) -> None:
        self._adaptive.add(topk)

    def is_adaptive(self, topk: object) -> bool:
        return topk in self._adaptive

    @property
    def num_adaptive(self) -> int:
        return len(self._adaptive)


SWITCH = KernelSwitch()
