"""Selection policies: which kernel per bucket, as pure functions of settings and timings.

measure   (default) capture every candidate per bucket, time the replays, keep the fastest.
threshold the seed's static rule: `triton` below the threshold, `triton_kernels` at or above.
fixed     one kernel everywhere.

Above the largest captured bucket the call runs eagerly; `eager_kernel` names the
kernel from the measured winners (the largest bucket's winner: the crossover the
measurements show continues past the captured range) or from the threshold/fixed rule.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

DEFAULT_THRESHOLD = 1536
SMALL_BATCH_KERNEL = "triton"
LARGE_BATCH_KERNEL = "triton_kernels"


class Policy(enum.Enum):
    MEASURE = "measure"
    THRESHOLD = "threshold"
    FIXED = "fixed"

    @staticmethod
    def parse(value: str | Policy) -> Policy:
        if isinstance(value, Policy):
            return value
        try:
            return Policy(value)
        except ValueError:
            known = ", ".join(p.value for p in Policy)
            raise ValueError(f"unknown policy {value!r}; expected one of: {known}") from None


def threshold_kernel(num_tokens: int, threshold: int = DEFAULT_THRESHOLD) -> str:
    """The seed's rule: triton below `threshold` tokens, triton_kernels at or above."""
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    return SMALL_BATCH_KERNEL if num_tokens < threshold else LARGE_BATCH_KERNEL


def static_choice(
    policy: Policy,
    buckets: Sequence[int],
    candidates: Sequence[str],
    threshold: int = DEFAULT_THRESHOLD,
    fixed_kernel: str | None = None,
) -> dict[int, str] | None:
    """bucket -> kernel for the policies that need no measurement; None for MEASURE.

    ValueError when the rule names a kernel that is not among `candidates`.
    """
    if policy is Policy.MEASURE:
        return None
    if policy is Policy.FIXED:
        if fixed_kernel not in candidates:
            raise ValueError(f"fixed kernel {fixed_kernel!r} is not among the candidates {list(candidates)}")
        return {b: fixed_kernel for b in buckets}
    choice = {b: threshold_kernel(b, threshold) for b in buckets}
    missing = sorted(set(choice.values()) - set(candidates))
    if missing:
        raise ValueError(f"threshold policy needs kernel(s) {missing}, not among the candidates {list(candidates)}")
    return choice


def eager_kernel(
    policy: Policy,
    winners: Mapping[int, str],
    threshold: int = DEFAULT_THRESHOLD,
    fixed_kernel: str | None = None,
    num_tokens: int | None = None,
) -> str:
    """The kernel for a batch above the largest bucket."""
    if policy is Policy.FIXED:
        assert fixed_kernel is not None
        return fixed_kernel
    if policy is Policy.THRESHOLD:
        return threshold_kernel(num_tokens if num_tokens is not None else max(winners) + 1, threshold)
    if not winners:
        raise ValueError("no measured winners to derive the eager kernel from")
    return winners[max(winners)]
