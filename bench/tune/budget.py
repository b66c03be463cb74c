"""The tuner's time budget: seconds left, and a running estimate of what a config costs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class OutOfTime(Exception):
    """The time budget leaves no room for the next chunk of timings."""


class Budget:
    """Seconds left, and how long one config takes (running mean per bucket, else overall)."""

    def __init__(
        self,
        seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
        first_estimate_s: float = 2.0,
        start: float | None = None,
    ) -> None:
        """`start`: when the budget began on `clock` (default: now)."""
        if seconds is not None and not seconds > 0:
            raise ValueError(f"time budget {seconds!r} s; expected > 0 (or None for no limit)")
        self.clock = clock
        self.deadline = None if seconds is None else (clock() if start is None else start) + seconds
        self.first_estimate_s = first_estimate_s
        self._spent: dict[int, tuple[int, float]] = {}  # bucket -> (configs, seconds)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def estimate(self, bucket: int, configs: int) -> float:
        n, s = self._spent.get(bucket, (0, 0.0))
        if not n:
            n, s = map(sum, zip(*self._spent.values(), strict=True)) if self._spent else (0, 0.0)
        return configs * (s / n if n else self.first_estimate_s)

    def allows(self, bucket: int, configs: int) -> bool:
        return self.estimate(bucket, configs) <= self.left()

    def spent(self, bucket: int, configs: int, seconds: float) -> None:
        n, s = self._spent.get(bucket, (0, 0.0))
        self._spent[bucket] = (n + configs, s + seconds)


def left_text(budget: Budget) -> str:
    left = budget.left()
    return "no limit" if math.isinf(left) else f"{max(0.0, left):.0f} s"
