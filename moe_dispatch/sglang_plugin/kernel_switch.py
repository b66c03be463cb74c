"""Which kernel an adaptive MoE layer runs for the call at hand, per process.

One `KernelSwitch` per process (`SWITCH`), read by the TopK hook on every call of an
adaptive layer, with the call's token count:

    forced kernel set (the start-up measurement, tests)  -> that kernel
    otherwise                                             -> rule.kernel_for(num_tokens)

Every MoE call goes through the same rule: decode graphs (the rule is read while SGLang
captures each batch size, so the choice is baked into that graph), prefill graphs, and
eager batches. The rule is one of:
    SizeRule       measured (or read from a plan): the winner of the smallest measured
                   size >= num_tokens; above the largest, the largest's winner
    ThresholdRule  policy "threshold": triton below the threshold, triton_kernels from it
    FixedRule      policy "fixed": one kernel everywhere
The switch also holds the set of TopK modules that are adaptive (paired with an
unquantized FusedMoE); every other TopK runs stock. With `--adaptive-moe-extra-kernels`, more
candidates join the measured ones for the layers given to `enable_tuned` / `enable_tk_tuned` /
`enable_small_batch`: `triton_tuned` (the Triton runner with a tuned table's tile configs),
`triton_kernels_tuned` (the triton_kernels runner with moe-dispatch's routing metadata and top-k
combine and, where a flags table has them, its opt flags) and
`small_batch` (our decode kernel, called with the router logits of SGLang's standard top-k
output). Pure Python, no SGLang.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from moe_dispatch.policy import DEFAULT_THRESHOLD, LARGE_BATCH_KERNEL, SMALL_BATCH_KERNEL, threshold_kernel
from moe_dispatch.sglang_plugin.settings import AdaptiveMoESettings
from moe_dispatch.spec import MoESpec

# The two runners, in the names plans and policies use.
KERNELS: tuple[str, ...] = (SMALL_BATCH_KERNEL, LARGE_BATCH_KERNEL)  # ("triton", "triton_kernels")
# Opt-in candidates: the Triton runner with tuned tile configs (`enable_tuned`), the triton_kernels
# runner with our combine and tuned opt flags (`enable_tk_tuned`), our decode kernel (`enable_small_batch`).
TUNED_KERNEL = "triton_tuned"
TK_TUNED_KERNEL = "triton_kernels_tuned"
SMALL_BATCH_BACKEND = "small_batch"
ALL_KERNELS: tuple[str, ...] = (*KERNELS, TUNED_KERNEL, TK_TUNED_KERNEL, SMALL_BATCH_BACKEND)


def check_kernel(kernel: str) -> str:
    if kernel not in ALL_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {ALL_KERNELS}")
    return kernel


@dataclasses.dataclass(frozen=True)
class SizeRule:
    """Measured choice per MoE call size. sizes: ascending token counts; kernels: the winner at each."""

    sizes: tuple[int, ...]
    kernels: tuple[str, ...]
    source: str = "measured"

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.kernels):
            raise ValueError(f"need one kernel per size, got sizes={self.sizes!r} kernels={self.kernels!r}")
        if any(b <= a for a, b in itertools.pairwise(self.sizes)) or self.sizes[0] <= 0:
            raise ValueError(f"sizes must be positive and strictly increasing, got {self.sizes!r}")
        for kernel in self.kernels:
            check_kernel(kernel)

    @staticmethod
    def from_winners(winners: Mapping[int, str], source: str = "measured") -> SizeRule:
        sizes = tuple(sorted(winners))
        return SizeRule(sizes, tuple(winners[s] for s in sizes), source)

    def kernel_for(self, num_tokens: int) -> str:
        i = bisect.bisect_left(self.sizes, num_tokens)
        return self.kernels[min(i, len(self.kernels) - 1)]

    def describe(self) -> str:
        """Runs of one kernel, e.g. 'triton for 1-24, triton_kernels for 32-8192 and above (measured)'."""
        runs: list[list[object]] = []
        for size, kernel in zip(self.sizes, self.kernels, strict=True):
            if runs and runs[-1][0] == kernel:
                runs[-1][2] = size
            else:
                runs.append([kernel, size, size])
        parts = [f"{k} for {lo}" + (f"-{hi}" if hi != lo else "") for k, lo, hi in runs]
        return ", ".join(parts) + f" tokens and above ({self.source})"


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """The seed's static rule: triton below `threshold` tokens, triton_kernels from it."""

    threshold: int = DEFAULT_THRESHOLD
    source: str = "threshold"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int) or self.threshold <= 0:
            raise ValueError(f"threshold must be a positive int, got {self.threshold!r}")

    def kernel_for(self, num_tokens: int) -> str:
        return threshold_kernel(num_tokens, self.threshold)

    def describe(self) -> str:
        return f"triton below {self.threshold} tokens, triton_kernels from {self.threshold} (threshold)"


@dataclasses.dataclass(frozen=True)
class FixedRule:
    """One kernel for every call (policy "fixed")."""

    kernel: str
    source: str = "fixed"

    def __post_init__(self) -> None:
        check_kernel(self.kernel)

    def kernel_for(self, num_tokens: int) -> str:
        return self.kernel

    def describe(self) -> str:
        return f"{self.kernel} for every size (fixed)"


Rule = SizeRule | ThresholdRule | FixedRule


def static_rule(settings: AdaptiveMoESettings) -> Rule:
    """The rule the settings give before any measurement: fixed kernel or threshold."""
    if settings.policy == "fixed":
        assert settings.kernel is not None  # AdaptiveMoESettings checks it
        return FixedRule(settings.kernel)
    return ThresholdRule(settings.batch_threshold)


class KernelSwitch:
    """Per-process switch state: settings, forced override, the size rule, adaptive TopKs."""

    def __init__(self, settings: AdaptiveMoESettings | None = None) -> None:
        self.settings = settings or AdaptiveMoESettings()
        self.rule: Rule = static_rule(self.settings)
        self._forced: str | None = None
        # Weak: a model that is dropped (tests, weight reload) must not be kept alive here.
        self._adaptive: weakref.WeakSet[object] = weakref.WeakSet()
        # Spec of the first adaptive layer: keys the plan file (layers of one model share it).
        self.first_spec: MoESpec | None = None
        # triton_tuned: the tuned table (a moe_dispatch.tuned_configs.TunedTable) and the
        # UnquantizedFusedMoEMethod objects of the layers it applies to.
        self.tuned_table: Any = None
        self._tuned_methods: weakref.WeakSet[object] = weakref.WeakSet()
        # triton_kernels_tuned: the flags table (a moe_dispatch.tk_flags_table.TkFlagsTable, or None:
        # triton_kernels' own flags) and the UnquantizedFusedMoEMethod objects of the layers it applies to.
        self.tk_table: Any = None
        self._tk_methods: weakref.WeakSet[object] = weakref.WeakSet()
        # small_batch: UnquantizedFusedMoEMethod -> its layer's prepared small_batch kernel.
        self._small_batch: weakref.WeakKeyDictionary[object, Any] = weakref.WeakKeyDictionary()

    @property
    def kernels(self) -> tuple[str, ...]:
        """The candidates the start-up measures: the two runners, plus each enabled extra one."""
        enabled = {
            TUNED_KERNEL: self.tuned_table is not None,
            TK_TUNED_KERNEL: bool(self._tk_methods),
            SMALL_BATCH_BACKEND: bool(self._small_batch),
        }
        return (*KERNELS, *(name for name, on in enabled.items() if on))

    def enable_small_batch(self, kernels: Mapping[object, Any]) -> None:
        """Make small_batch a candidate: {UnquantizedFusedMoEMethod: its layer's small_batch kernel}."""
        self._small_batch = weakref.WeakKeyDictionary(kernels)

    def small_batch_kernel(self, method: object, num_tokens: int) -> Any:
        """`method`'s small_batch kernel when this call of its layer runs small_batch, else None."""
        if not self._small_batch or self.kernel_for(num_tokens) != SMALL_BATCH_BACKEND:
            return None
        return self._small_batch.get(method)

    def enable_tuned(self, table: Any, methods: Iterable[object]) -> None:
        """Make triton_tuned a candidate: `table`'s configs for the layers whose methods are given."""
        self.tuned_table = table
        self._tuned_methods = weakref.WeakSet(methods)

    def tuned_config(self, method: object, num_tokens: int) -> Any:
        """The table's BucketConfig when this call of `method`'s layer runs triton_tuned, else None."""
        if self.tuned_table is None or method not in self._tuned_methods:
            return None
        if self.kernel_for(num_tokens) != TUNED_KERNEL:
            return None
        return self.tuned_table.config_for(num_tokens)

    def enable_tk_tuned(self, table: Any, methods: Iterable[object]) -> None:
        """Make triton_kernels_tuned a candidate for the layers whose methods are given: `table`'s flags
        (None: triton_kernels' own), moe-dispatch's routing metadata (the TopK hook) and top-k combine."""
        self.tk_table = table
        self._tk_methods = weakref.WeakSet(methods)

    def tk_flags(self, method: object, num_tokens: int) -> Any:
        """The table's TkBucket when this call of `method`'s layer runs triton_kernels_tuned, else None
        (also None when no bucket is within 2x: triton_kernels' own flags)."""
        if self.tk_table is None or not self.runs_tk_tuned(method, num_tokens):
            return None
        return self.tk_table.flags_for(num_tokens)

    def runs_tk_tuned(self, method: object, num_tokens: int) -> bool:
        """Whether this call of `method`'s layer runs triton_kernels_tuned (its flags and its combine)."""
        return method in self._tk_methods and self.kernel_for(num_tokens) == TK_TUNED_KERNEL

    def routes_tk_tuned(self, num_tokens: int) -> bool:
        """Whether adaptive TopKs route this call for triton_kernels_tuned (with its fused routing metadata)."""
        return bool(self._tk_methods) and self.kernel_for(num_tokens) == TK_TUNED_KERNEL

    def configure(self, settings: AdaptiveMoESettings) -> None:
        self.settings = settings
        self.rule = static_rule(settings)
        self.tuned_table = None
        self._tuned_methods = weakref.WeakSet()
        self.tk_table = None
        self._tk_methods = weakref.WeakSet()
        self._small_batch = weakref.WeakKeyDictionary()

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
        """The forced kernel if one is set, else the rule's choice for `num_tokens`."""
        return self._forced if self._forced is not None else self.rule.kernel_for(num_tokens)

    def add_topk(self, topk: object) -> None:
        self._adaptive.add(topk)

    def is_adaptive(self, topk: object) -> bool:
        return topk in self._adaptive

    @property
    def num_adaptive(self) -> int:
        return len(self._adaptive)


SWITCH = KernelSwitch()
